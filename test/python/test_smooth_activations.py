"""The fused op's smooth activations (SiLU, Hardswish, GELU): each against torch's batch norm
followed by that activation in float64, forward and backward, in every mode, layout and dtype;
the channel-at-a-time plan; gradcheck (forward mode too) and gradgradcheck; opcheck; the
errors; the module; torch.compile."""

import copy
import itertools

import custom_bn
import pytest
import torch
import torch.nn.functional as F
from conftest import goes_channel_at_a_time
from samples import SHAPES, make_sample, reference_batch_norm, tolerance

ops = torch.ops.custom_bn
PLAIN = (0.0, None, 0.0)  # the piecewise-linear parameters, left at their defaults

# name: torch's function
SMOOTH = {"silu": F.silu, "hardswish": F.hardswish, "gelu": F.gelu}

CASES = [
    (name, dim, layout, dtype_name, training, affine)
    for name in SMOOTH
    for dim, layout in (
        (2, "contiguous"),
        (2, "sliced"),
        (3, "contiguous"),
        (4, "contiguous"),
        (4, "channels_last"),
        (4, "transposed"),
        (5, "channels_last"),
    )
    for dtype_name, training, affine in itertools.product(
        ("float32", "float64", "bfloat16+float32"), (True, False), (True, False)
    )
    if affine or dtype_name == "float32"
]


def widened(sample):
    """The sample in float64, its input, weight and bias requiring grad."""
    wide = sample.clone()
    for field in ("input", "weight", "bias", "running_mean", "running_var"):
        value = getattr(wide, field)
        if value is not None:
            setattr(wide, field, value.double())
    for field in ("input", "weight", "bias"):
        if getattr(wide, field) is not None:
            getattr(wide, field).requires_grad_()
    return wide


@pytest.mark.parametrize("name,dim,layout,dtype_name,training,affine", CASES)
def test_parity_with_torch_bn_then_activation(name, dim, layout, dtype_name, training, affine):
    torch_fn = SMOOTH[name]
    sample = make_sample(SHAPES[dim], dtype_name, layout, training=training, affine=affine)
    if affine:
        with torch.no_grad():  # pre-activations across hardswish's -3 and 3
            sample.weight.mul_(3)
    dtype = sample.input.dtype
    tol = tolerance(dtype)

    ours = sample.clone(requires_grad=True)
    out = ops.batch_norm_relu(*ours.args(), None, *PLAIN, name)
    reference = sample.clone()
    reference_batch_norm(reference)  # the running statistics of torch
    if ours.running_mean is not None:
        torch.testing.assert_close(ours.running_mean, reference.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, reference.running_var, **tol)

    wide = widened(sample)
    pre_activation = reference_batch_norm(wide)
    expected = torch_fn(pre_activation)
    torch.testing.assert_close(out, expected.to(dtype), **tol)
    assert out.stride() == expected.stride()  # torch's layout

    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(ours.input.grad, wide.input.grad.to(dtype), **tol)
    if affine:
        for field in ("weight", "bias"):
            ours_grad, wide_grad = getattr(ours, field).grad, getattr(wide, field).grad
            torch.testing.assert_close(
                ours_grad, wide_grad.to(ours_grad.dtype), rtol=tol["rtol"] * 4, atol=tol["atol"] * 4
            )


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("running_stats,momentum", [(False, 0.1), (True, None)])
def test_parity_without_running_stats_and_with_cumulative_momentum(name, running_stats, momentum):
    """Training without running stats (batch statistics only), and momentum=None (the running
    stats a cumulative average over num_batches_tracked), against torch in float64."""
    sample = make_sample(
        SHAPES[4], "float32", "channels_last", running_stats=running_stats, momentum=momentum
    )
    ours = sample.clone(requires_grad=True)
    out = ops.batch_norm_relu(*ours.args(), None, *PLAIN, name)
    reference = sample.clone()
    reference_batch_norm(reference)
    if running_stats:
        torch.testing.assert_close(ours.running_mean, reference.running_mean)
        torch.testing.assert_close(ours.running_var, reference.running_var)
        assert torch.equal(ours.num_batches_tracked, reference.num_batches_tracked)
    wide = widened(sample)
    expected = SMOOTH[name](reference_batch_norm(wide))
    torch.testing.assert_close(out, expected.float())
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(ours.input.grad, wide.input.grad.float())
    torch.testing.assert_close(ours.weight.grad, wide.weight.grad.float(), rtol=4e-5, atol=4e-5)


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("training", [True, False])
def test_backward_op_gives_the_activation_gradient_as_grad_residual(name, training):
    """dz (the fourth result) is torch's backward of the activation at the pre-activation."""
    s = make_sample((4, 3, 5, 5), "float32", "contiguous", training=training)
    out, save_mean, save_invstd = ops.batch_norm_relu_forward(
        *s.relu_forward_args(None), *PLAIN, name
    )
    grad = torch.randn_like(out)
    args = s.backward_args(grad, save_mean, save_invstd, [True, True, True, True], out)
    _, _, _, dz = ops.batch_norm_relu_backward(*args, *PLAIN, name, s.bias)
    wide = widened(s)
    pre_activation = reference_batch_norm(wide).detach().requires_grad_()
    (expected,) = torch.autograd.grad(SMOOTH[name](pre_activation), pre_activation, grad.double())
    torch.testing.assert_close(dz, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("batch,channels,size", [(8, 24, 7), (32, 24, 4)])
def test_channel_at_a_time_plan_matches_torch(name, batch, channels, size):
    x = torch.randn(batch, channels, size, size) * 2 + 0.5
    assert goes_channel_at_a_time(x, "batch_norm_relu_forward")
    # The backward too for Hardswish (SiLU and GELU write dz once and take two passes).
    assert goes_channel_at_a_time(x, "batch_norm_relu_backward")
    w = (torch.rand(channels) * 3).requires_grad_()
    b = torch.randn(channels, requires_grad=True)
    xg = x.clone().requires_grad_()
    out = ops.batch_norm_relu(xg, w, b, None, None, True, 0.1, 1e-5, None, None, *PLAIN, name)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    expected = SMOOTH[name](torch.batch_norm(xd, wd, bd, None, None, True, 0.1, 1e-5, False))
    torch.testing.assert_close(out, expected.float(), rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    torch.testing.assert_close(xg.grad, xd.grad.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, wd.grad.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_gradgradcheck_and_forward_mode(name, training, affine):
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) * 2 + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    def fn(x, *params):
        weight, bias = params if affine else (None, None)
        args = (x, weight, bias, rm.clone(), rv.clone(), training, 0.1, 1e-5, None, None)
        return ops.batch_norm_relu(*args, *PLAIN, name)

    inputs = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("name", SMOOTH)
def test_first_order_gradients_with_create_graph_match_the_kernels(name):
    """With create_graph, the backward op runs its differentiable definition; without, the
    kernels: the same gradients to rounding."""
    s = make_sample((6, 4, 5, 5), "float32", "channels_last", training=True)
    grads = []
    for create_graph in (False, True):
        x = s.input.clone().requires_grad_()
        w, b = s.weight.clone().requires_grad_(), s.bias.clone().requires_grad_()
        out = ops.batch_norm_relu(x, w, b, None, None, True, 0.1, 1e-5, None, None, *PLAIN, name)
        grads.append(torch.autograd.grad((out * out).sum(), (x, w, b), create_graph=create_graph))
    for kernel, formula in zip(*grads, strict=True):
        torch.testing.assert_close(kernel, formula.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(name, training):
    s = make_sample((3, 4, 5, 5), "float32", "channels_last", training=training)
    grad_sample = s.clone(requires_grad=True)
    torch.library.opcheck(ops.batch_norm_relu, (*grad_sample.args(), None, *PLAIN, name))
    forward_args = (*s.relu_forward_args(None), *PLAIN, name)
    torch.library.opcheck(ops.batch_norm_relu_forward, forward_args)
    out, save_mean, save_invstd = ops.batch_norm_relu_forward(*forward_args)
    mask = [True, True, True, True]
    backward_args = s.backward_args(torch.randn_like(out), save_mean, save_invstd, mask, out)
    torch.library.opcheck(ops.batch_norm_relu_backward, (*backward_args, *PLAIN, name, s.bias))


@pytest.mark.parametrize(
    "activation,message",
    [
        ((0.0, None, 0.0, "mish"), "activation must be one of"),
        ((0.0, 6.0, 0.0, "silu"), "must keep their defaults"),
        ((0.0, None, 0.1, "gelu"), "must keep their defaults"),
    ],
)
def test_bad_activation_raises_value_error_and_changes_nothing(activation, message):
    s = make_sample((4, 3, 5, 5), "float32", "contiguous", training=True)
    before = s.clone()
    with pytest.raises(ValueError, match=message):
        ops.batch_norm_relu(*s.args(), None, *activation)
    assert torch.equal(s.running_mean, before.running_mean)
    assert torch.equal(s.num_batches_tracked, before.num_batches_tracked)
    with pytest.raises(ValueError, match=message):
        min_val, max_val, negative_slope, name = activation
        custom_bn.BatchNormReLU2d(
            3, min_val=min_val, max_val=max_val, negative_slope=negative_slope, activation=name
        )


@pytest.mark.parametrize("name", SMOOTH)
def test_residual_is_refused_and_changes_nothing(name):
    s = make_sample((4, 3, 5, 5), "float32", "contiguous", training=True)
    before = s.clone()
    residual = torch.randn_like(s.input)
    with pytest.raises(ValueError, match="takes no residual"):
        ops.batch_norm_relu(*s.args(), residual, *PLAIN, name)
    assert torch.equal(s.running_mean, before.running_mean)
    assert torch.equal(s.running_var, before.running_var)
    assert torch.equal(s.num_batches_tracked, before.num_batches_tracked)
    with pytest.raises(ValueError, match="takes no residual"):
        ops.batch_norm_eval(s.input, s.weight, s.bias, s.running_mean, s.running_var, 1e-5, True,
                            residual, *PLAIN, name)  # fmt: skip


def test_backward_checks_bias():
    s = make_sample((4, 3, 5, 5), "float32", "contiguous", training=True)
    out, save_mean, save_invstd = ops.batch_norm_relu_forward(
        *s.relu_forward_args(None), *PLAIN, "silu"
    )
    args = s.backward_args(torch.randn_like(out), save_mean, save_invstd, [True] * 4, out)
    with pytest.raises(RuntimeError, match="bias"):
        ops.batch_norm_relu_backward(*args, *PLAIN, "silu", torch.zeros(5))


@pytest.mark.parametrize("name", SMOOTH)
def test_module_takes_a_smooth_activation(name):
    module = custom_bn.BatchNormReLU2d(4, activation=name).double()
    reference = torch.nn.BatchNorm2d(4).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 4
    torch.testing.assert_close(module(x), SMOOTH[name](reference(x)))
    torch.testing.assert_close(module.running_var, reference.running_var)
    assert f"activation='{name}'" in repr(module)
    assert list(module.state_dict()) == list(reference.state_dict())
    scripted = torch.jit.script(copy.deepcopy(module).eval())
    torch.testing.assert_close(scripted(x), module.eval()(x))
    synced = custom_bn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(module))
    assert type(synced) is custom_bn.SyncBatchNormReLU2d and synced.activation == name
    torch.testing.assert_close(synced(x), module(x))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiles_without_graph_breaks(backend):
    torch._dynamo.reset()
    module = custom_bn.BatchNormReLU2d(4, activation="silu")
    reference = copy.deepcopy(module)
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    out, expected = compiled(x), reference(xr)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(module.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(module.running_mean, reference.running_mean)


@pytest.mark.parametrize("name", SMOOTH)
def test_torch_func_transforms_match_torch(name):
    """vmap of grad (per-sample and per-weight), and second order by jacrev and jacfwd, against
    torch's batch norm then the activation."""
    from torch.func import grad, jacfwd, jacrev, vmap

    torch.manual_seed(0)
    x = torch.randn(5, 4, 3, 4, 4, dtype=torch.float64)
    w = torch.rand(3, dtype=torch.float64) + 0.5
    b = torch.randn(3, dtype=torch.float64)
    rm, rv = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5

    # Unbatched running stats under vmap only in eval (training would update them per sample).
    def ours(x, w, b, training=True):
        stats = (rm, rv) if not training else (None, None)
        args = (x, w, b, *stats, training, 0.1, 1e-5, None, None)
        return ops.batch_norm_relu(*args, *PLAIN, name).square().sum()

    def torchs(x, w, b, training=True):
        stats = (rm, rv) if not training else (None, None)
        out = torch.batch_norm(x, w, b, *stats, training, 0.1, 1e-5, False)
        return SMOOTH[name](out).square().sum()

    per_sample = (0, None, None)
    expected = vmap(grad(torchs, argnums=(0, 1, 2)), in_dims=per_sample)(x, w, b)
    actual = vmap(grad(ours, argnums=(0, 1, 2)), in_dims=per_sample)(x, w, b)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e)
    weights = torch.rand(4, 3, dtype=torch.float64) + 0.5
    per_weight = (None, 0, None, None)
    torch.testing.assert_close(
        vmap(grad(ours, argnums=1), in_dims=per_weight)(x[0], weights, b, False),
        vmap(grad(torchs, argnums=1), in_dims=per_weight)(x[0], weights, b, False),
    )
    small = x[0, :2, :, :2, :2]
    torch.testing.assert_close(
        jacrev(jacrev(ours))(small, w, b), jacrev(jacrev(torchs))(small, w, b)
    )
    torch.testing.assert_close(
        jacfwd(jacrev(ours))(small, w, b), jacfwd(jacrev(torchs))(small, w, b)
    )


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("batch,channels,size", [(8, 24, 7), (32, 24, 4)])
def test_channel_at_a_time_backward_matches_the_two_pass_one(name, batch, channels, size):
    """Asked for grad_residual too, the backward takes two passes (dz written, then read); else
    Hardswish's goes a channel at a time (dz recomputed in each pass), and SiLU's and GELU's
    take the same two passes (their dz costs an exp or erf: written once). The sums are the
    same, bitwise; the input gradient to an ulp of dz (times w * invstd) where a run's scalar
    tail and the vector body evaluate the derivative differently."""
    x = torch.randn(batch, channels, size, size) * 2 + 0.5
    w, b = torch.rand(channels) * 3, torch.randn(channels)
    forward = ops.batch_norm_relu_forward(
        x, w, b, None, None, None, None, True, 0.1, 1e-5, *PLAIN, name
    )
    out, mean, invstd = forward
    grad = torch.randn_like(out)

    def backward(mask):
        args = (grad, out, x, w, None, None, mean, invstd, True, 1e-5, mask)
        return ops.batch_norm_relu_backward(*args, *PLAIN, name, b)

    at_a_time, two_pass = backward([True] * 3 + [False]), backward([True] * 4)
    torch.testing.assert_close(at_a_time[0], two_pass[0], rtol=1e-6, atol=1e-6)
    assert torch.equal(at_a_time[1], two_pass[1]) and torch.equal(at_a_time[2], two_pass[2])
