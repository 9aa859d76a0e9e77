"""Property-based parity: hypothesis draws shapes (2-D to 5-D, size-1 dims, empty batches),
layouts, dtypes, modes, momentum and eps on every run, and each draw must match
torch.batch_norm and its autograd. The number of draws is fixed per profile, so the time is
bounded: CUSTOM_BN_HYPOTHESIS_PROFILE=ci (default) or thorough."""

import os

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from samples import DTYPES, TOLERANCES, Sample, reference_batch_norm

settings.register_profile(
    "ci", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile(
    "thorough", max_examples=5000, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile(os.environ.get("CUSTOM_BN_HYPOTHESIS_PROFILE", "ci"))

ops = torch.ops.custom_bn


@st.composite
def inputs(draw):
    dim = draw(st.integers(2, 5))
    shape = [draw(st.integers(0, 4)), draw(st.integers(1, 5))]
    shape += [draw(st.integers(1, 4)) for _ in range(dim - 2)]
    input_dtype, _ = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
    layouts = ["contiguous", "permuted", "sliced", "expanded"]
    if dim in (4, 5):
        layouts.append("channels_last")
    layout = draw(st.sampled_from(layouts))
    scale = draw(st.floats(0.1, 10.0))
    shift = draw(st.floats(-10.0, 10.0))

    def values(size):
        return (torch.randn(size) * scale + shift).to(input_dtype)

    if layout == "contiguous":
        x = values(shape)
    elif layout == "channels_last":
        fmt = torch.channels_last if dim == 4 else torch.channels_last_3d
        x = values(shape).contiguous(memory_format=fmt)
    elif layout == "permuted":
        order = draw(st.permutations(range(dim)))
        x = values([shape[d] for d in order]).permute(*[order.index(d) for d in range(dim)])
    elif layout == "sliced":
        d = draw(st.integers(0, dim - 1))
        step = draw(st.integers(2, 3))
        big = list(shape)
        big[d] *= step
        x = values(big)[(slice(None),) * d + (slice(None, None, step),)]
    else:  # expanded: a broadcast (stride 0) dim
        d = draw(st.integers(0, dim - 1))
        small = list(shape)
        small[d] = 1
        x = values(small).expand(shape)
    assert list(x.shape) == shape
    return x


@st.composite
def samples(draw):
    # torch's generator, seeded from the draw: a failing example replays with the same values
    # (hypothesis seeds only Python's and numpy's generators).
    torch.manual_seed(draw(st.integers(0, 2**32 - 1)))
    x = draw(inputs())
    input_dtype = x.dtype
    param_dtype = draw(
        st.sampled_from(
            [input_dtype, torch.float32]
            if input_dtype in (torch.bfloat16, torch.float16)
            else [input_dtype]
        )
    )
    channels = x.shape[1]
    training = draw(st.booleans())
    running_stats = draw(st.booleans()) or not training
    affine = draw(st.booleans())
    momentum = (
        draw(st.one_of(st.none(), st.floats(0.0, 1.0)))
        if training and running_stats
        else draw(st.floats(0.0, 1.0))
    )
    eps = draw(st.floats(1e-6, 1e-1))
    weight = bias = rm = rv = nbt = None
    if affine:
        weight = (torch.rand(channels) + 0.5).to(param_dtype)
        bias = torch.randn(channels).to(param_dtype)
    if running_stats:
        rm = torch.randn(channels).to(param_dtype)
        rv = (torch.rand(channels) + 0.5).to(param_dtype)
        nbt = torch.tensor(draw(st.integers(0, 100)))
    return Sample(x, weight, bias, rm, rv, training, momentum, eps, nbt)


def is_close_scaled(actual, expected, dtype):
    """Within the dtype's tolerance, relative to the largest expected magnitude."""
    rtol, atol = TOLERANCES[dtype]
    if expected.numel() == 0:
        return True
    a, e = actual.double(), expected.double()
    return bool(((a - e).abs() <= atol + rtol * (e.abs() + e.abs().max())).all())


def rounding_noise(sample):
    """How far rounding alone moves the normalized input: the accumulation type's epsilon
    times the worst channel's max |x| / sqrt(var + eps). Batch statistics of values far from 0
    and close together (10.1684 and 9.4432 in float32) cancel: float32's answer then carries an
    error of this size whichever kernel computes it, torch's included, and which of two kernels
    lands nearer float64 on one draw is chance (ours is nearer on average)."""
    accumulation = torch.float64 if sample.input.dtype == torch.float64 else torch.float32
    epsilon = torch.finfo(accumulation).eps
    x = sample.input.detach().double()
    if not sample.training or x.numel() == 0:
        return epsilon
    dims = [d for d in range(x.dim()) if d != 1]
    variance = x.var(dim=dims, unbiased=False)
    spread = x.abs().amax(dim=dims) / (variance + sample.eps).sqrt()
    return epsilon * max(spread.max().item(), 1.0)


def grad_input_noise(sample, noise, grad):
    """rounding_noise for the input gradient, whose projection w * invstd * (dz - mean(dz) -
    x_hat * mean(dz * x_hat)) cancels almost entirely where a channel holds two values: its
    rounding error is then about epsilon * |w| * invstd * |dz|, not a share of the tiny result
    (both kernels land 2e-5 from float64 on a GELU draw whose answer is 0.35)."""
    x = sample.input.detach().double()
    if not sample.training or x.numel() == 0:
        return noise
    dims = [d for d in range(x.dim()) if d != 1]
    invstd = (x.var(dim=dims, unbiased=False) + sample.eps).rsqrt()
    weight = sample.weight.detach().double().abs() if sample.weight is not None else 1.0
    scale = (weight * invstd).max().item() * grad.detach().abs().max().item()
    accumulation = torch.float64 if sample.input.dtype == torch.float64 else torch.float32
    return max(noise, torch.finfo(accumulation).eps * scale)


def assert_close(actual, exact, same_dtype, dtype, what, noise=0.0):
    """`actual` must be close to float64 torch (`exact`), or else no farther from it than
    torch's own kernel in the same dtype (`same_dtype`) or than the input's `rounding_noise`
    allows: where float32 or bfloat16 itself cannot resolve the answer (two values per channel
    and a tiny eps, say), that is the most that can be asked."""
    assert actual.shape == exact.shape and actual.dtype == same_dtype.dtype, what
    if is_close_scaled(actual, exact.to(actual.dtype), dtype):
        return
    ours = (actual.double() - exact).abs().max().item()
    theirs = (same_dtype.double() - exact).abs().max().item()
    floor = 8 * noise * max(exact.abs().max().item(), 1.0)
    assert ours <= max(2 * theirs, floor) or is_close_scaled(actual, same_dtype, dtype), (
        f"{what}: max abs difference from float64 {ours:.3g}, torch's own {theirs:.3g}, "
        f"rounding noise {floor:.3g}, largest magnitude {exact.abs().max().item():.3g}"
    )


def assert_grads_close(sample, ours, exact, same, grad, noise):
    """The input gradient (with grad_input_noise for `grad`), then grad weight and grad bias,
    as assert_close."""
    dtype = sample.input.dtype
    assert_close(
        ours.input.grad,
        exact.input.grad,
        same.input.grad,
        dtype,
        "grad input",
        grad_input_noise(sample, noise, grad),
    )
    assert_param_grads_close(ours, exact, same, dtype, noise)


def assert_running_stats_close(ours, exact, same, dtype, noise):
    """running_mean and running_var (where the sample tracks them), as assert_close."""
    for name in ("running_mean", "running_var"):
        if getattr(ours, name) is not None:
            assert_close(
                getattr(ours, name), getattr(exact, name), getattr(same, name), dtype, name, noise
            )


def assert_param_grads_close(ours, exact, same, dtype, noise):
    """grad weight and grad bias (where the sample has them), as assert_close. They are
    per-channel sums over many products, so float32 gets float16's tolerance: a few ulps more."""
    for name in ("weight", "bias"):
        if getattr(ours, name) is not None:
            assert_close(
                getattr(ours, name).grad,
                getattr(exact, name).grad,
                getattr(same, name).grad,
                torch.float16 if dtype == torch.float32 else dtype,
                f"grad {name}",
                noise,
            )


def reference_sample(sample, dtype):
    """The draw for torch.batch_norm: the same values, contiguous, in `dtype` (None: the
    sample's own dtypes).

    Contiguous, because torch 2.11's CPU backward misreads grad_output for some layouts with
    size-1 dims (input of shape (1, 2, 1, 1, 2) and strides (4, 1, 2, 2, 2) with a
    contiguous grad_output gives a wrong grad_input; see docs/reliability.md)."""

    def copy(t, grad):
        if t is None:
            return None
        t = t.detach().clone(memory_format=torch.contiguous_format)
        return (t if dtype is None else t.to(dtype)).requires_grad_(grad)

    return Sample(
        copy(sample.input, True),
        copy(sample.weight, True),
        copy(sample.bias, True),
        copy(sample.running_mean, False),
        copy(sample.running_var, False),
        sample.training,
        sample.momentum,
        sample.eps,
        None if sample.num_batches_tracked is None else sample.num_batches_tracked.clone(),
    )


@given(samples())
def test_randomized_parity_with_torch(sample):
    params = None if sample.weight is None else sample.weight.dtype
    note(f"{sample!r}, eps={sample.eps}, params={params}")
    values_per_channel = sample.input.numel() // sample.input.shape[1]
    if sample.training and values_per_channel == 1:
        before = sample.clone()
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            ops.batch_norm(*sample.args())
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(before, name) is not None:
                assert torch.equal(getattr(before, name), getattr(sample, name))
        return

    noise = rounding_noise(sample)
    ours = sample.clone(requires_grad=True)
    exact, same = reference_sample(sample, torch.float64), reference_sample(sample, None)
    out = ops.batch_norm(*ours.args())
    outputs = {"exact": reference_batch_norm(exact), "same": reference_batch_norm(same)}
    dtype = sample.input.dtype
    assert_close(out, outputs["exact"], outputs["same"], dtype, "output", noise)
    assert_running_stats_close(ours, exact, same, dtype, noise)
    if ours.num_batches_tracked is not None:
        assert ours.num_batches_tracked.item() == exact.num_batches_tracked.item()

    grad = torch.randn_like(out)
    out.backward(grad)
    outputs["exact"].backward(grad.double())
    outputs["same"].backward(grad.contiguous())
    assert_grads_close(sample, ours, exact, same, grad, noise)


@given(samples(), st.booleans())
def test_randomized_fused_relu_parity_with_torch(sample, with_residual):
    """batch_norm_relu on the same draws, against relu(torch.batch_norm(...) + residual).
    Where the pre-activation is within rounding of 0 the ReLU may go either way, so the mask
    is checked away from 0 and the gradients against the backward of our mask."""
    note(f"{sample!r}, eps={sample.eps}, residual={with_residual}")
    dtype = sample.input.dtype
    residual = torch.randn(sample.input.shape).to(dtype) if with_residual else None
    values_per_channel = sample.input.numel() // sample.input.shape[1]
    if sample.training and values_per_channel == 1:
        before = sample.clone()
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            ops.batch_norm_relu(*sample.args(), residual)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(before, name) is not None:
                assert torch.equal(getattr(before, name), getattr(sample, name))
        return

    noise = rounding_noise(sample)
    ours = sample.clone(requires_grad=True)
    our_residual = residual.clone().requires_grad_() if with_residual else None
    exact, same = reference_sample(sample, torch.float64), reference_sample(sample, None)
    exact_residual = residual.double().requires_grad_() if with_residual else None
    out = ops.batch_norm_relu(*ours.args(), our_residual)
    pre_exact, pre_same = reference_batch_norm(exact), reference_batch_norm(same)
    if with_residual:
        pre_exact, pre_same = pre_exact + exact_residual, pre_same + residual
    assert_close(out, torch.relu(pre_exact), torch.relu(pre_same), dtype, "output", noise)
    assert_running_stats_close(ours, exact, same, dtype, noise)

    if out.numel() > 0:
        rtol, atol = TOLERANCES[dtype]
        margin = 4 * (atol + rtol * pre_exact.detach().abs().max().item())
        clear = pre_exact.detach().abs() > margin
        assert torch.equal((out > 0)[clear], (pre_exact > 0)[clear]), "ReLU mask"

    grad = torch.randn_like(out)
    masked = grad * (out > 0).to(grad.dtype)
    out.backward(grad)
    pre_exact.backward(masked.double())
    pre_same.backward(masked.contiguous())
    if with_residual:
        assert torch.equal(our_residual.grad, masked), "grad residual is the masked grad"
    assert_grads_close(sample, ours, exact, same, grad, noise)


SMOOTH = {
    "silu": torch.nn.functional.silu,
    "hardswish": torch.nn.functional.hardswish,
    "gelu": torch.nn.functional.gelu,
}


@given(samples(), st.sampled_from(sorted(SMOOTH)))
def test_randomized_fused_smooth_activation_parity_with_torch(sample, name):
    """batch_norm_relu with a smooth activation on the same draws, against torch's batch norm
    then that activation: output, running stats and gradients."""
    note(f"{sample!r}, eps={sample.eps}, activation={name}")
    arguments = (None, 0.0, None, 0.0, name)  # no residual, the smooth activation
    values_per_channel = sample.input.numel() // sample.input.shape[1]
    if sample.training and values_per_channel == 1:
        before = sample.clone()
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            ops.batch_norm_relu(*sample.args(), *arguments)
        for field in ("running_mean", "running_var", "num_batches_tracked"):
            if getattr(before, field) is not None:
                assert torch.equal(getattr(before, field), getattr(sample, field))
        return

    dtype = sample.input.dtype
    noise = rounding_noise(sample)
    ours = sample.clone(requires_grad=True)
    exact, same = reference_sample(sample, torch.float64), reference_sample(sample, None)
    out = ops.batch_norm_relu(*ours.args(), *arguments)
    out_exact = SMOOTH[name](reference_batch_norm(exact))
    out_same = SMOOTH[name](reference_batch_norm(same))
    assert_close(out, out_exact, out_same, dtype, "output", noise)
    assert_running_stats_close(ours, exact, same, dtype, noise)

    grad = torch.randn_like(out)
    out.backward(grad)
    out_exact.backward(grad.double())
    out_same.backward(grad.contiguous())
    assert_grads_close(sample, ours, exact, same, grad, noise)
