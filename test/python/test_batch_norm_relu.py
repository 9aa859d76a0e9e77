"""custom_bn.batch_norm_relu and BatchNormReLU2d against torch's batch norm, add and ReLU.

Where the pre-activation is within rounding of 0, ours and torch's ReLU may disagree on an
element (and so on its gradient): the mask is checked against float64 away from 0, and the
gradients against torch's backward of grad_output masked by our output.
"""

import copy
import itertools

import custom_bn
import pytest
import torch
from samples import (
    DTYPES,
    SHAPES,
    layouts_for,
    make_input,
    make_sample,
    reference_batch_norm,
    tolerance,
)

ops = torch.ops.custom_bn


def fused_cases():
    for dim in (2, 3, 4, 5):
        for layout, dtype_name, training, with_residual in itertools.product(
            layouts_for(dim), DTYPES, (True, False), (True, False)
        ):
            yield (
                f"{dim}d-{layout}-{dtype_name}-{'train' if training else 'eval'}-"
                f"{'residual' if with_residual else 'noresidual'}",
                dict(
                    dim=dim,
                    layout=layout,
                    dtype_name=dtype_name,
                    training=training,
                    with_residual=with_residual,
                    affine=True,
                ),  # fmt: skip
            )
        for layout in layouts_for(dim):
            yield (
                f"{dim}d-{layout}-bare",
                dict(
                    dim=dim,
                    layout=layout,
                    dtype_name="float32",
                    training=True,
                    with_residual=True,
                    affine=False,
                ),
            )


CASES = list(fused_cases())


def widened(sample):
    wide = sample.clone()
    for name in ("input", "weight", "bias", "running_mean", "running_var"):
        t = getattr(sample, name)
        if t is not None:
            setattr(
                wide, name, t.detach().double().requires_grad_(name in ("input", "weight", "bias"))
            )
    return wide


@pytest.mark.parametrize("case", [c for _, c in CASES], ids=[n for n, _ in CASES])
def test_parity_with_torch_bn_add_relu(case):
    shape = SHAPES[case["dim"]]
    sample = make_sample(
        shape,
        case["dtype_name"],
        case["layout"],
        training=case["training"],
        affine=case["affine"],
        running_stats=case["affine"] or not case["training"],
    )
    dtype = sample.input.dtype
    residual = make_input(shape, dtype, case["layout"]) if case["with_residual"] else None
    tol = tolerance(dtype)

    ours, ref = sample.clone(requires_grad=True), sample.clone(requires_grad=True)
    our_residual = residual.clone().requires_grad_() if residual is not None else None
    out = ops.batch_norm_relu(*ours.args(), our_residual)
    normalized = reference_batch_norm(ref)
    expected = torch.relu(normalized + residual if residual is not None else normalized)
    assert out.stride() == expected.stride()
    if ours.running_mean is not None:
        torch.testing.assert_close(ours.running_mean, ref.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, ref.running_var, **tol)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()

    # float64 from the same values. In bfloat16/float16, torch rounds the batch norm's output
    # before adding the residual, which can be off by more than an ulp of the sum: the output
    # is compared with float64 there.
    reduced = dtype in (torch.bfloat16, torch.float16)
    wide = widened(sample)
    wide_residual = residual.double().requires_grad_() if residual is not None else None
    pre_activation = reference_batch_norm(wide)
    if wide_residual is not None:
        pre_activation = pre_activation + wide_residual
    torch.testing.assert_close(
        out, torch.relu(pre_activation).to(dtype) if reduced else expected, **tol
    )
    clear = pre_activation.detach().abs() > 8 * tol["atol"]
    assert torch.equal((out > 0)[clear], (pre_activation > 0)[clear]), "ReLU mask"

    grad = torch.randn_like(out)
    masked = grad * (out > 0).to(grad.dtype)
    out.backward(grad)
    if residual is not None:
        assert torch.equal(our_residual.grad, masked)
    if reduced:
        pre_activation.backward(masked.double())
        reference = wide
    else:
        reference = sample.clone(requires_grad=True)
        pre = reference_batch_norm(reference)
        (pre + residual if residual is not None else pre).backward(masked)
    torch.testing.assert_close(ours.input.grad, reference.input.grad.to(dtype), **tol)
    for name in ("weight", "bias"):
        if getattr(ours, name) is not None:
            expected_grad = getattr(reference, name).grad.to(getattr(ours, name).dtype)
            torch.testing.assert_close(
                getattr(ours, name).grad, expected_grad, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4
            )


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_gradcheck_and_gradgradcheck(training, with_residual):
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True) if with_residual else None
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def fn(x, w, b, *residual):
        return ops.batch_norm_relu(
            x,
            w,
            b,
            rm.clone(),
            rv.clone(),
            training,
            0.1,
            1e-5,
            None,
            residual[0] if residual else None,
        )

    inputs = (x, w, b) + ((r,) if with_residual else ())
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


def test_saves_no_activation_beyond_the_output():
    """Saved for backward: the input and the output (which the next layer holds anyway), plus
    per-channel tensors: no pre-activation, no mask."""
    x = torch.randn(8, 4, 6, 6, requires_grad=True)
    residual = torch.randn(8, 4, 6, 6, requires_grad=True)
    bn = custom_bn.BatchNormReLU2d(4)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = bn(x, residual)
    full_size = [t for t in saved if t.numel() == x.numel()]
    assert len(full_size) == 2
    assert {t.data_ptr() for t in full_size} == {x.data_ptr(), out.data_ptr()}
    out.sum().backward()  # and the backward runs from them


def test_bad_residual_raises_and_mutates_nothing():
    s = make_sample((4, 3, 5, 5))
    rm, rv, nbt = s.running_mean.clone(), s.running_var.clone(), s.num_batches_tracked.clone()
    with pytest.raises(RuntimeError, match="expected residual of the input's shape"):
        ops.batch_norm_relu(*s.args(), torch.randn(4, 3, 5, 4))
    with pytest.raises(RuntimeError, match="expected residual of the input's dtype"):
        ops.batch_norm_relu(*s.args(), torch.randn(4, 3, 5, 5, dtype=torch.float64))
    assert torch.equal(s.running_mean, rm) and torch.equal(s.running_var, rv)
    assert torch.equal(s.num_batches_tracked, nbt)


OPCHECK_SAMPLES = [
    ("train-residual", dict(shape=(4, 3, 5, 5)), True),
    ("eval", dict(shape=(4, 3, 5, 5), training=False), False),
    ("channels-last", dict(shape=(2, 3, 4, 4), layout="channels_last"), True),
    ("mixed-bf16", dict(shape=(3, 4, 6), dtype_name="bfloat16+float32"), True),
    ("momentum-none-no-affine", dict(shape=(4, 3, 5), momentum=None, affine=False), False),
]


@pytest.mark.parametrize(
    "kwargs,with_residual",
    [(k, r) for _, k, r in OPCHECK_SAMPLES],
    ids=[n for n, _, _ in OPCHECK_SAMPLES],
)
def test_opcheck(kwargs, with_residual):
    s = make_sample(**kwargs)
    residual = torch.randn_like(s.input) if with_residual else None
    grad_sample = s.clone(requires_grad=True)
    torch.library.opcheck(ops.batch_norm_relu, (*grad_sample.args(), residual))
    torch.library.opcheck(ops.batch_norm_relu_forward, s.relu_forward_args(residual))
    out, save_mean, save_invstd = ops.batch_norm_relu_forward(*s.relu_forward_args(residual))
    grad = torch.randn_like(out)
    for mask in ([True, True, True, True], [True, False, False, False], [False, True, True, True]):
        torch.library.opcheck(
            ops.batch_norm_relu_backward,
            s.backward_args(grad, save_mean, save_invstd, mask, output=out),
        )


class ResidualBlock(torch.nn.Module):
    def __init__(self, bn_relu):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn_relu = bn_relu

    def forward(self, x):
        return self.bn_relu(self.conv(x), x)


def test_module_matches_torch_batchnorm2d_add_relu_in_training():
    torch.manual_seed(0)
    ours = ResidualBlock(custom_bn.BatchNormReLU2d(4, momentum=None))
    ref_bn = torch.nn.BatchNorm2d(4, momentum=None)
    ref_conv = copy.deepcopy(ours.conv)
    ours_opt = torch.optim.SGD(ours.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(list(ref_conv.parameters()) + list(ref_bn.parameters()), lr=0.1)
    for _ in range(3):
        x = torch.randn(6, 4, 5, 5)
        loss = ours(x).square().mean()
        ref_loss = torch.relu(ref_bn(ref_conv(x)) + x).square().mean()
        torch.testing.assert_close(loss, ref_loss)
        for opt, value in ((ours_opt, loss), (ref_opt, ref_loss)):
            opt.zero_grad()
            value.backward()
            opt.step()
    ref_state = ref_bn.state_dict()
    for name, value in ours.bn_relu.state_dict().items():
        torch.testing.assert_close(value, ref_state[name], msg=name)


def test_module_state_dict_is_batchnorm2d_and_it_scripts():
    ours = custom_bn.BatchNormReLU2d(3)
    ours(torch.randn(4, 3, 2, 2))
    theirs = torch.nn.BatchNorm2d(3)
    theirs.load_state_dict(ours.state_dict())
    assert theirs.num_batches_tracked.item() == 1
    scripted = torch.jit.script(copy.deepcopy(ours))
    x, r = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(scripted(x, r), ours(x, r))
    with pytest.raises(ValueError, match="expected 4D input"):
        ours(torch.randn(2, 3, 4))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_momentum_none_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    # A LeakyReLU as the activation: the decomposition inductor compiles carries it too.
    eager = ResidualBlock(custom_bn.BatchNormReLU2d(4, momentum=None, negative_slope=0.1))
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, backend=backend, fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 4, 5, 5)
        out_eager, out_compiled = eager(x), compiled(x)
        torch.testing.assert_close(out_compiled, out_eager)
        out_eager.sum().backward()
        out_compiled.sum().backward()
    # Sums of 3 steps' products (up to ~160): inductor's float32 sums and our kernels' double
    # ones are both within 3e-5 of float64.
    torch.testing.assert_close(
        compiled_model.conv.weight.grad, eager.conv.weight.grad, rtol=1e-5, atol=1e-4
    )
    torch.testing.assert_close(compiled_model.bn_relu.running_var, eager.bn_relu.running_var)
    assert compiled_model.bn_relu.num_batches_tracked.item() == 3
