"""In-place activated batch norm (torch.ops.custom_bn.batch_norm_relu_): the output written over
the input, the same values and running stats as batch_norm_relu, gradients as accurate as
torch's, only the values the output cannot give back kept, and torch's errors for misuse."""

import itertools

import custom_bn  # its fake kernel gives kept_input a size under FakeTensors (torch.compile)
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from samples import PIECEWISE_LINEAR as ACTIVATIONS
from samples import all_samples, make_sample, tolerance

ops = torch.ops.custom_bn

PARITY_DTYPES = ("float32", "float64", "bfloat16+float32", "float16")
PARITY = [
    (name, kwargs, activation, residual)
    for (index, (name, kwargs)), residual in itertools.product(
        enumerate(all_samples(dtype_names=PARITY_DTYPES)), (False, True)
    )
    for activation in [list(ACTIVATIONS)[index % len(ACTIVATIONS)]]
]


def _run(sample, activation, residual, inplace, grad):
    """(output, gradients by name) of the fused op, in place or not, on fresh copies."""
    s = sample.clone(requires_grad=True)
    r = None if residual is None else residual.detach().clone().requires_grad_()
    if inplace:
        output = s.input * 1  # a tensor nothing else needs, as a convolution's output
        ops.batch_norm_relu_(output, *s.args()[1:], r, *ACTIVATIONS[activation])
    else:
        output = ops.batch_norm_relu(s.input, *s.args()[1:], r, *ACTIVATIONS[activation])
    wrt = {"input": s.input, "weight": s.weight, "bias": s.bias, "residual": r}
    wrt = {k: v for k, v in wrt.items() if v is not None}
    grads = torch.autograd.grad(output, list(wrt.values()), grad)
    return output.detach(), dict(zip(wrt, grads, strict=True)), s


@pytest.mark.parametrize(
    "kwargs, activation, with_residual",
    [p[1:] for p in PARITY],
    ids=[f"{p[0]}-{p[2]}{'-residual' if p[3] else ''}" for p in PARITY],
)
def test_matches_batch_norm_relu(kwargs, activation, with_residual):
    torch.manual_seed(len(kwargs["shape"]))
    sample = make_sample(**kwargs)
    residual = torch.randn_like(sample.input) if with_residual else None
    grad = torch.randn_like(sample.input)
    expected, expected_grads, ref = _run(sample, activation, residual, False, grad)
    output, grads, ours = _run(sample, activation, residual, True, grad)
    # The same kernels write the output and the running stats.
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name), rtol=0, atol=0)
    for name, value in expected_grads.items():
        torch.testing.assert_close(
            grads[name], value, **tolerance(sample.input.dtype), msg=lambda m, n=name: f"{n}: {m}"
        )


def _error(value, exact):
    """Mean absolute error relative to the mean magnitude (robust to an activation's mask
    flipping at a rounded zero, which moves single values in every low-precision result)."""
    return ((value.double() - exact).abs().mean() / exact.abs().mean().clamp_min(1e-30)).item()


def _torch_batch_norm_act(x, weight, bias, residual, activation):
    y = F.batch_norm(x, None, None, weight, bias, True, 0.1, 1e-5)
    if residual is not None:
        y = y + residual
    min_val, max_val, slope = ACTIVATIONS[activation]
    if slope:
        return F.leaky_relu(y, slope) if slope != 1 else y
    return F.hardtanh(y, min_val, max_val) if max_val is not None else F.relu(y)


def _gradients(dtype, param_dtype, x, weight, bias, residual, grad, activation, inplace):
    xs = x.to(dtype).requires_grad_()
    w, b = (t.to(param_dtype).requires_grad_() for t in (weight, bias))
    r = residual.to(dtype).requires_grad_() if residual is not None else None
    if inplace:
        y = xs * 1
        ops.batch_norm_relu_(
            y, w, b, None, None, True, 0.1, 1e-5, None, r, *ACTIVATIONS[activation]
        )
    else:
        y = _torch_batch_norm_act(xs, w, b, r, activation)
    wrt = [xs, w, b] + ([r] if r is not None else [])
    return torch.autograd.grad(y, wrt, grad.to(dtype))


# Weights, biases and residuals that make recovery from the output hard: tiny and zero weights
# (torchvision's zero_init_residual), biases and residuals far larger than the normalized part.
CASES = {
    "random": (1.0, 1.0, 1.0),
    "tiny-weights": (1e-3, 1.0, 1.0),
    "large-bias": (1.0, 30.0, 0.0),
    "large-residual": (1.0, 1.0, 100.0),
    "zero-weights": (0.0, 1.0, 1.0),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize(
    "dtype, param_dtype",
    [
        (torch.float32, torch.float32),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
    ],
)
def test_gradients_as_accurate_as_torch(case, activation, dtype, param_dtype):
    torch.manual_seed(0)
    weight_scale, bias_scale, residual_scale = CASES[case]
    x = torch.randn(8, 6, 10, 10, dtype=torch.float64) * 3 + 1
    weight = torch.randn(6, dtype=torch.float64) * weight_scale
    weight[1] = 0.0 if case != "random" else weight[1]
    bias = torch.randn(6, dtype=torch.float64) * bias_scale
    residual = torch.randn_like(x) * residual_scale if residual_scale else None
    grad = torch.randn_like(x)
    # Inputs as the low-precision runs see them, so that only the arithmetic differs.
    x, residual, grad = (t.to(dtype).double() if t is not None else t for t in (x, residual, grad))
    weight, bias = weight.to(param_dtype).double(), bias.to(param_dtype).double()
    args = (x, weight, bias, residual, grad, activation)
    exact = _gradients(torch.float64, torch.float64, *args, inplace=False)
    theirs = _gradients(dtype, param_dtype, *args, inplace=False)
    ours = _gradients(dtype, param_dtype, *args, inplace=True)
    slack = tolerance(dtype)["rtol"]
    for name, e, t, o in zip(
        ("input", "weight", "bias", "residual"), exact, theirs, ours, strict=False
    ):
        assert _error(o, e) <= 1.5 * _error(t, e) + slack, (name, _error(o, e), _error(t, e))


def test_keeps_only_what_the_output_cannot_give_back():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 6, 6)
    weight, bias = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.1, -0.2, 0.0])
    # ReLU: the clipped values only (the offsets are small against the weights).
    _, _, kept = ops.batch_norm_relu_forward_(
        x.clone(), weight, bias, None, None, None, None, True, 0.1, 1e-5
    )
    y = ops.batch_norm_relu(x, weight, bias, None, None, True, 0.1, 1e-5)
    assert kept.numel() == int((y == 0).sum())
    torch.testing.assert_close(kept, x[y == 0], rtol=0, atol=0)  # contiguous: in order
    # LeakyReLU and the identity invert everywhere: nothing kept.
    for slope in (0.1, 1.0):
        _, _, kept = ops.batch_norm_relu_forward_(
            x.clone(), weight, bias, None, None, None, None, True, 0.1, 1e-5, 0.0, None, slope
        )
        assert kept.numel() == 0
    # A channel of weight 0 keeps all its values; a bias beyond four weights too.
    for w, b in ((torch.tensor([1.0, 0.0, 2.0]), bias), (weight, torch.tensor([0.1, 3.0, 0.0]))):
        _, _, kept = ops.batch_norm_relu_forward_(
            x.clone(), w, b, None, None, None, None, True, 0.1, 1e-5, 0.0, None, 1.0
        )
        torch.testing.assert_close(kept, x[:, 1].flatten(), rtol=0, atol=0)
    # Without a backward to come, nothing.
    with torch.no_grad():
        _, _, kept = ops.batch_norm_relu_forward_(
            x.clone(), weight, bias, None, None, None, None, True, 0.1, 1e-5, keep_input=False
        )
    assert kept.numel() == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_keeps_every_input_value(dtype):
    # Recovery from a rounded low-precision output would cost the weight gradient accuracy.
    x = torch.randn(4, 3, 6, 6).to(dtype).to(memory_format=torch.channels_last)
    _, _, kept = ops.batch_norm_relu_forward_(
        x.clone(), None, None, None, None, None, None, True, 0.1, 1e-5, 0.0, None, 1.0
    )
    torch.testing.assert_close(kept, x.permute(0, 2, 3, 1).flatten(), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced", "transposed"])
def test_kept_values_are_in_memory_order_on_every_path(layout):
    # The CPU steps walk memory; other layouts take the generic steps; both read the same.
    sample = make_sample((3, 4, 5, 6), layout=layout)
    sample.bias.mul_(0.1)  # below four weights: only the clipped values are kept
    x = sample.input
    _, _, kept = ops.batch_norm_relu_forward_(
        x.clone(), sample.weight, sample.bias, None, None, None, None, True, 0.1, 1e-5
    )
    y = ops.batch_norm_relu(x, sample.weight, sample.bias, None, None, True, 0.1, 1e-5)
    order = sorted(range(4), key=lambda d: -x.stride(d))
    expected = x.permute(order)[(y == 0).permute(order)]
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)


# Larger than the CPU steps' chunks of 2^15 values, whose ends fall inside a channel's run
# (contiguous), inside a row of channels (channels_last, 2-D) and inside one channel's values.
# Training's backward without a residual goes a channel at a time where a channel fits in L2
# ("contiguous"), in chunks where it does not ("large-channels": 3.8 MB of a channel's output,
# gradient and x_hat in float32), and through an x_hat tensor where runs are short (7x7).
MANY_CHUNKS = {
    "contiguous": ((4, 5, 97, 89), None),
    "large-channels": ((2, 3, 400, 400), None),
    "short-runs": ((24, 32, 7, 7), None),
    "channels_last": ((4, 37, 33, 31), torch.channels_last),
    "2d-rows": ((7001, 9), None),
    "one-channel": ((3, 1, 201, 103), None),
    "5d-channels-last": ((2, 6, 17, 19, 23), torch.channels_last_3d),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("activation", ["relu", "relu6", "leaky_relu"])
@pytest.mark.parametrize("case", list(MANY_CHUNKS))
def test_many_chunks_match_batch_norm_relu(case, activation, with_residual, dtype):
    """Training's CPU forward computes each chunk's output in cache and writes it over the
    input, and the backward recovers x_hat a chunk or a channel at a time: bitwise
    batch_norm_relu's output and running stats, the kept values in memory order, gradients as
    the fused op's."""
    shape, memory_format = MANY_CHUNKS[case]
    torch.manual_seed(len(shape) + shape[1])
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    channels = shape[1]
    weight = (torch.rand(channels, dtype=dtype) + 0.5).requires_grad_()
    bias = (torch.randn(channels, dtype=dtype) * 0.5).requires_grad_()
    residual = torch.randn_like(x) if with_residual else None
    stats = {
        name: (torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype))
        for name in ("fused", "inplace")
    }
    act = ACTIVATIONS[activation]
    source = x.clone().requires_grad_()
    expected = ops.batch_norm_relu(
        source, weight, bias, *stats["fused"], True, 0.1, 1e-5, None, residual, *act
    )
    output = x.clone().requires_grad_()
    written = output * 1  # the tensor the op overwrites, as a convolution's output
    ops.batch_norm_relu_(
        written, weight, bias, *stats["inplace"], True, 0.1, 1e-5, None, residual, *act
    )
    torch.testing.assert_close(written, expected, rtol=0, atol=0)
    for ours, theirs in zip(stats["inplace"], stats["fused"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)

    _, _, kept = ops.batch_norm_relu_forward_(
        x.clone(), weight, bias, None, None, None, residual, True, 0.1, 1e-5, *act
    )
    # Clipped (at 0 or 6 where the slope is 0), or too far from 0 against the weight to invert.
    min_val, max_val, slope = act
    clipped = (expected <= min_val) & (slope == 0.0)
    if max_val is not None:
        clipped |= expected >= max_val
    per_channel = [1, -1] + [1] * (x.dim() - 2)
    offset = bias.detach().view(per_channel).abs()
    if residual is not None:
        offset = offset + residual.abs()
    unsafe = ~(4.0 * weight.detach().view(per_channel).abs() > offset)
    order = sorted(range(x.dim()), key=lambda d: -x.stride(d))
    keep = (clipped | unsafe).expand(x.shape)
    torch.testing.assert_close(kept, x.permute(order)[keep.permute(order)], rtol=0, atol=0)

    grad = torch.randn_like(expected)
    grads = torch.autograd.grad(written, (output, weight, bias), grad)
    expected_grads = torch.autograd.grad(expected, (source, weight, bias), grad)
    # The input gradient reads x_hat at each position: a value recovered or kept wrongly shows.
    torch.testing.assert_close(grads[0], expected_grads[0], **tolerance(dtype))
    _assert_sums_as_accurate(grads[1:], expected_grads[1:], x, weight, bias, residual, grad, act)


def _assert_sums_as_accurate(ours, fused, x, weight, bias, residual, grad, act):
    """The weight and bias gradients, sums over a channel's values, within the fused op's
    error from float64 (twice) plus the rounding of a sum: eps * sum(|term|). Against the fused
    op itself they may differ by more than the parity tolerance, as sums added in another order
    do: over one 62109-value channel the fused bias gradient is 4.6e-5 from float64, ours
    4.6e-6."""
    x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, weight, bias))
    r64 = residual.double() if residual is not None else None
    y64 = ops.batch_norm_relu(x64, w64, b64, None, None, True, 0.1, 1e-5, None, r64, *act)
    exact = torch.autograd.grad(y64, (w64, b64), grad.double())
    x_hat = F.batch_norm(x64.detach(), None, None, training=True, eps=1e-5)
    dims = [d for d in range(x.dim()) if d != 1]
    terms = (grad.double().abs() * x_hat.abs(), grad.double().abs())
    eps = torch.finfo(x.dtype).eps
    for name, o, f, e, t in zip(("weight", "bias"), ours, fused, exact, terms, strict=True):
        error, bound = (o.double() - e).abs(), 2 * (f.double() - e).abs() + eps * t.sum(dims)
        assert (error <= bound).all(), (name, error.max().item(), (error - bound).max().item())


def test_eval_mode_gives_the_weight_its_gradient():
    # A frozen backbone fine-tuned: eval mode, weight and bias trained.
    sample = make_sample((4, 3, 5, 5), training=False)
    grad = torch.randn_like(sample.input)
    expected, expected_grads, _ = _run(sample, "relu", None, False, grad)
    output, grads, _ = _run(sample, "relu", None, True, grad)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    for name, value in expected_grads.items():
        torch.testing.assert_close(grads[name], value)


def _call(x, sample=None):
    sample = sample or make_sample(tuple(x.shape))
    return ops.batch_norm_relu_(x, *sample.args()[1:])


def test_a_leaf_that_requires_grad_is_refused_with_torchs_error():
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad"):
        _call(x)


def test_overwriting_a_tensor_autograd_needs_fails_at_its_backward():
    a = torch.randn(4, 3, 5, 5, requires_grad=True)
    x = a.exp()  # exp's backward reads its output
    _call(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        x.sum().backward()


def test_views_that_cannot_be_written_are_refused_with_torchs_errors():
    base = torch.randn(2, 4, 3, 5, 5, requires_grad=True).clone()
    with pytest.raises(RuntimeError, match="returns multiple views"):
        _call(base.unbind(0)[0])
    with torch.no_grad():
        view = base[0]
    with pytest.raises(RuntimeError, match="created in no_grad mode"):
        _call(view)


def test_a_written_view_gets_its_base_the_right_gradient():
    a = torch.randn(2, 4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    sample = make_sample((4, 3, 5, 5), dtype_name="float64")
    base = a * 1
    _call(base[1], sample.clone())
    expected = a * 1
    expected[1] = ops.batch_norm_relu(a[1], *sample.clone().args()[1:])
    grad = torch.randn_like(a)
    (ours,) = torch.autograd.grad(base, a, grad)
    (theirs,) = torch.autograd.grad(expected, a, grad)
    torch.testing.assert_close(base.detach(), expected.detach(), rtol=0, atol=0)
    torch.testing.assert_close(ours, theirs)


def test_bad_input_changes_nothing():
    sample = make_sample((4, 3, 5, 5))
    x = torch.randn(4, 3, 5, 5)
    before = (x.clone(), sample.running_mean.clone(), sample.num_batches_tracked.clone())
    bad_weight = torch.ones(4)
    with pytest.raises(RuntimeError, match="weight"):
        ops.batch_norm_relu_(x, bad_weight, *sample.args()[2:])
    with pytest.raises(ValueError, match="negative_slope"):
        ops.batch_norm_relu_(x, *sample.args()[1:], None, 0.0, None, -0.1)
    expanded = torch.randn(1, 3, 1, 1).expand(4, 3, 5, 5)
    with pytest.raises(RuntimeError, match="single memory location"):
        ops.batch_norm_relu_(expanded, *sample.args()[1:])
    assert torch.equal(x, before[0])
    assert torch.equal(sample.running_mean, before[1])
    assert torch.equal(sample.num_batches_tracked, before[2])


def test_stage_ops_name_their_output_argument():
    # Their first tensor is the forward's output, and their errors call it so.
    output = torch.ones(4, 3, 2, 2, dtype=torch.long)
    stats = (torch.zeros(3), torch.ones(3))
    with pytest.raises(NotImplementedError, match="expected output of dtype .* but got Long"):
        ops.batch_norm_relu_inplace_backward(
            output.float(), output, torch.empty(0, dtype=torch.long), None, None, None, None,
            None, *stats, True, 1e-5, [True, True, True, False],
        )  # fmt: skip
    with pytest.raises(RuntimeError, match="expected output with at least 2 dimensions"):
        ops.batch_norm_relu_normalized_input(
            torch.ones(3), torch.empty(0), None, None, None, *stats
        )


def test_double_backward_and_forward_mode_are_refused():
    sample = make_sample((4, 3, 5, 5), dtype_name="float64")
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    y = x * 1
    _call(y, sample)
    with pytest.raises(NotImplementedError, match="not differentiable"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)
    with fwAD.dual_level():
        dual = fwAD.make_dual(torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.ones(4, 3, 5, 5))
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            _call(dual * 1, sample)


def test_keep_input_false_with_a_backward_to_come_is_refused():
    x = torch.randn(4, 3, 5, 5, requires_grad=True) * 1
    with pytest.raises(RuntimeError, match="keep_input=False"):
        ops.batch_norm_relu_forward_(x, None, None, None, None, None, None, True, 0.1, 1e-5,
                                     keep_input=False)  # fmt: skip


def test_meta_kernel_refuses_a_data_dependent_size():
    # The C++ Meta kernel, or the package's fake kernel registered over it, refuses alike.
    x = torch.empty(4, 3, 5, 5, device="meta")
    with pytest.raises((NotImplementedError, RuntimeError), match="depends on the data|data-dep"):
        ops.batch_norm_relu_forward_(x, None, None, None, None, None, None, True, 0.1, 1e-5)
    save_mean, _, kept = ops.batch_norm_relu_forward_(
        x, None, None, None, None, None, None, True, 0.1, 1e-5, keep_input=False
    )
    assert save_mean.shape == (3,) and kept.shape == (0,)


OPCHECK_SAMPLES = {
    "train": dict(shape=(4, 3, 5, 5)),
    "eval": dict(shape=(4, 3, 5, 5), training=False),
    "channels-last": dict(shape=(2, 3, 4, 4), layout="channels_last"),
    "mixed-bf16": dict(shape=(3, 4, 6), dtype_name="bfloat16+float32"),
    "no-affine-no-stats": dict(shape=(6, 4), affine=False, running_stats=False),
}


@pytest.mark.parametrize("kwargs", OPCHECK_SAMPLES.values(), ids=OPCHECK_SAMPLES.keys())
def test_opcheck(kwargs):
    sample = make_sample(**kwargs)
    residual = torch.randn_like(sample.input)
    s = sample.clone(requires_grad=True)
    torch.library.opcheck(ops.batch_norm_relu_, (s.input * 1, *s.args()[1:], residual))
    for keep_input in (True, False):
        s = sample.clone()
        args = (*s.relu_forward_args(residual), 0.0, 6.0, 0.0, keep_input)
        torch.library.opcheck(ops.batch_norm_relu_forward_, args)
    s = sample.clone()
    save_mean, save_invstd, kept = ops.batch_norm_relu_forward_(*s.relu_forward_args(residual))
    output = s.input  # written by the forward
    grad = torch.randn_like(output)
    stats = (s.running_mean, s.running_var, save_mean, save_invstd, s.training, s.eps)
    for mask in ([True] * 4, [True, False, False, False]):
        args = (grad, output, kept, s.weight, s.bias, residual, *stats, mask)
        torch.library.opcheck(ops.batch_norm_relu_inplace_backward, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_training_steps_match_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)

    def net():
        conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        return conv, custom_bn.BatchNormReLU2d(4, inplace=True, max_val=6.0)

    eager, compiled = net(), net()
    compiled[0].load_state_dict(eager[0].state_dict())

    def step(x, conv, bn, residual):
        h = conv(x)
        return bn(h, residual).square().sum()

    compiled_step = torch.compile(step, backend=backend, fullgraph=True)
    for _ in range(3):
        x, residual = torch.randn(2, 3, 6, 6), torch.randn(2, 4, 6, 6)
        loss = step(x, *eager, residual)
        loss_c = compiled_step(x, *compiled, residual)
        torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-4)
        loss.backward()
        loss_c.backward()
    for (name, p), p_c in zip(
        itertools.chain(eager[0].named_parameters(), eager[1].named_parameters()),
        itertools.chain(compiled[0].parameters(), compiled[1].parameters()),
        strict=True,
    ):
        torch.testing.assert_close(p_c.grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)
    torch.testing.assert_close(compiled[1].running_var, eager[1].running_var)
    assert int(compiled[1].num_batches_tracked) == int(eager[1].num_batches_tracked) == 3


def test_checkpointing_counts_the_batch_once():
    torch.manual_seed(0)
    conv, bn = torch.nn.Conv2d(3, 4, 3), custom_bn.BatchNormReLU2d(4, inplace=True)
    reference = custom_bn.BatchNormReLU2d(4)
    x = torch.randn(2, 3, 6, 6, requires_grad=True)

    def block(t):
        return bn(conv(t))

    y = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    expected = reference(conv(x))
    torch.testing.assert_close(y, expected)
    (ours,) = torch.autograd.grad(y.sum(), x)
    (theirs,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(bn.running_mean, reference.running_mean)
    assert int(bn.num_batches_tracked) == 1


def test_module_state_dict_and_repr():
    module = custom_bn.BatchNormReLU2d(4, inplace=True, negative_slope=0.1)
    assert "inplace=True" in repr(module)
    torch_bn = torch.nn.BatchNorm2d(4)
    module.load_state_dict(torch_bn.state_dict())
    assert list(module.state_dict()) == list(torch_bn.state_dict())
    with pytest.raises(ValueError, match="piecewise-linear"):
        custom_bn.BatchNormReLU2d(4, inplace=True, activation="silu")
