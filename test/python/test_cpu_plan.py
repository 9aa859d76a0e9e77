"""The plan of a CPU call (csrc/cpu/plan.h), read through the debug op custom_bn::_cpu_plan,
and the paths it selects for the layouts and sizes models produce: runs walked flat where they
are not whole vectors, and results larger than the last-level cache written with non-temporal
stores, and channels-last reductions of few rows cut by channels as well as by rows. Each path
is held to float64, or bit for bit to another path."""

import custom_bn  # noqa: F401  (loads the ops)
import pytest
import torch
from conftest import cache_bytes, cpu_plan

VECTOR_BYTES = {"default": 32, "avx2": 32, "avx512": 64}


def test_the_plan_reports_the_variant_and_the_caches_it_plans_with():
    plan = cpu_plan(torch.empty(4, 8, 16, 16))
    assert plan["capability"] in ("default", "avx2", "avx512")
    assert plan["l2_bytes"] > 0 and plan["l3_bytes"] == cache_bytes(3)
    assert plan["walk"] == "channels_first_runs" and plan["prefetch"] == "each_step"


@pytest.mark.parametrize(
    "x,walk",
    [
        (
            torch.empty(2, 8, 5, 5).contiguous(memory_format=torch.channels_last),
            "channels_last_rows",
        ),
        (torch.empty(2, 8, 7, 7), "channels_first_flat"),  # 196-byte runs, on every variant
        (torch.empty(2, 8, 8, 8), "channels_first_runs"),
        (torch.empty(6, 8), "channels_last_rows"),  # (N, C): one value per (n, c)
        (torch.empty(2, 8, 16, 16)[:, :, :8, :8], "channels_first_runs"),  # a dense 8x8 copy
    ],
)
def test_walks(x, walk):
    assert cpu_plan(x)["walk"] == walk


def test_a_tensor_walked_as_it_is_follows_torchs_contiguity_rules():
    """The layout is read from the strides (csrc/layout.cpp), not from a permuted view: on
    random dense and strided tensors with dimensions of size 1 (whose stride is free), a tensor
    that needs no copy must be walked as torch's is_contiguous says, in either order."""
    generator = torch.Generator().manual_seed(0)

    def pick(choices):
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]

    walked = set()
    for dims in (2, 3, 4, 5):
        for _ in range(150):
            sizes = [pick([1, 1, 2, 3, 5]) for _ in range(dims)]
            order = torch.randperm(dims, generator=generator).tolist()
            storage = torch.empty([sizes[d] * pick([1, 2]) for d in order])
            x = storage.permute([order.index(d) for d in range(dims)])[
                tuple(slice(0, s) for s in sizes)
            ]
            channels_last = x.permute([0, *range(2, dims), 1]).is_contiguous()
            one_value_per_channel = x[0, 0].numel() == 1
            walk = cpu_plan(x)["walk"]
            if channels_last and (one_value_per_channel or not x.is_contiguous()):
                assert walk == "channels_last_rows", (sizes, x.stride())
                walked.add(walk)
            elif x.is_contiguous():
                assert walk.startswith("channels_first"), (sizes, x.stride())
                walked.add("channels_first")
    assert walked == {"channels_last_rows", "channels_first"}


def test_the_plan_names_an_unknown_op():
    with pytest.raises(ValueError, match="expected op to name a custom_bn op"):
        torch.ops.custom_bn._cpu_plan(torch.empty(2, 3), "batch_norm_sideways")


@pytest.mark.parametrize(
    "dtype,memory_format,channels,spatial",
    [
        (torch.float32, torch.contiguous_format, 32, 16),  # runs of 1 KB: streamed
        (torch.float32, torch.contiguous_format, 32, 14),  # runs of 784 bytes: streamed flat
        (torch.bfloat16, torch.channels_last, 64, 8),
        (torch.float16, torch.contiguous_format, 16, 32),
    ],
)
def test_results_larger_than_the_cache_are_right(dtype, memory_format, channels, spatial):
    """Results larger than the last-level cache are written with non-temporal stores
    (CpuPlan::stream_result), run by run or flat (Walk). Eval mode, so each sample's expected
    values follow from it alone: the first, a middle and the last sample are checked in float64."""
    per_sample = channels * spatial * spatial * torch.finfo(dtype).bits // 8
    n = -(-cache_bytes() * 5 // 4 // per_sample)
    x = torch.randn(n, channels, spatial, spatial).to(dtype).contiguous(memory_format=memory_format)
    assert cpu_plan(x, "batch_norm_forward", training=False)["stream_result"]
    w, b = torch.rand(channels), torch.randn(channels)
    rm, rv = torch.randn(channels), torch.rand(channels) + 0.5
    xg = x.clone().requires_grad_()
    grad = torch.randn_like(x)
    out = torch.ops.custom_bn.batch_norm(xg, w, b, rm, rv, False, 0.1, 1e-5)
    (dx,) = torch.autograd.grad(out, xg, grad)
    fused = torch.ops.custom_bn.batch_norm_relu(x, w, b, rm, rv, False, 0.1, 1e-5)
    scale = (w.double() / (rv.double() + 1e-5).sqrt()).view(1, -1, 1, 1)
    tol = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}[dtype]
    for i in (0, n // 2, n - 1):
        expected = (
            x[i : i + 1].double() - rm.double().view(1, -1, 1, 1)
        ) * scale + b.double().view(1, -1, 1, 1)
        torch.testing.assert_close(out[i : i + 1], expected.to(dtype), rtol=tol, atol=tol)
        torch.testing.assert_close(
            dx[i : i + 1], (grad[i : i + 1].double() * scale).to(dtype), rtol=tol, atol=tol
        )
        torch.testing.assert_close(fused[i : i + 1], expected.relu().to(dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "dtype,spatial,cache_fraction",
    [
        (torch.float32, (14, 14), 5 / 8),  # runs of 196 values (784 bytes), streamed
        (torch.float32, (5, 7), 5 / 8),  # runs of 35: a boundary in most pairs of vectors
        (torch.bfloat16, (28, 28), 5 / 8),  # 1568 bytes
        (torch.float16, (11, 13), 5 / 8),
        (torch.float32, (7, 7), 1 / 8),  # in cache: regular stores
        (torch.bfloat16, (28, 28), 1 / 8),
    ],
)
def test_runs_that_are_not_whole_vectors_are_walked_flat_bitwise_right(
    dtype, spatial, cache_fraction
):
    """Channels-first maps whose (n, c) runs are not whole vectors walk the tensor as one flat
    array of aligned pairs of vectors (Walk::kChannelsFirstFlat, csrc/cpu/map.h), streamed where
    the pass exceeds the last-level cache; a pair that straddles two runs takes each lane's
    parameters from its own channel. In eval mode every value must equal, bit for bit, the
    same op on the channels-last copy of the input (walked row by row, by other code, with
    the same per-lane arithmetic): the output, the input gradient, and the fused op's with a
    residual."""
    channels = 32  # channels-last rows of whole vector pairs: no scalar tail
    per_sample = channels * spatial[0] * spatial[1] * torch.finfo(dtype).bits // 8
    n = -(-int(cache_bytes() * cache_fraction) // per_sample)
    x = (torch.randn(n, channels, *spatial) * 2 + 0.5).to(dtype)
    plan = cpu_plan(x, "batch_norm_forward", training=False)
    # 28x28 bfloat16 runs (1568 bytes) are whole 32-byte vectors, not whole 64-byte ones.
    run_bytes = spatial[0] * spatial[1] * x.element_size()
    flat = run_bytes % VECTOR_BYTES[plan["capability"]] != 0
    assert plan["walk"] == ("channels_first_flat" if flat else "channels_first_runs")
    assert plan["stream_result"] == (cache_fraction > 1 / 2)
    residual, grad = torch.randn_like(x), torch.randn_like(x)
    w, b = torch.rand(channels) + 0.5, torch.randn(channels)
    rm, rv = torch.randn(channels), torch.rand(channels) + 0.5
    ops = torch.ops.custom_bn

    def elementwise_results(x, residual, grad):
        xg = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad(ops.batch_norm(xg, w, b, rm, rv, False, 0.1, 1e-5), xg, grad)
        rg = residual.clone().requires_grad_()
        fused = ops.batch_norm_relu(xg, w, b, rm, rv, False, 0.1, 1e-5, None, rg)
        fused_dx, fused_dr = torch.autograd.grad(fused, (xg, rg), grad)
        return ops.batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5), dx, fused, fused_dx, fused_dr

    flat = elementwise_results(x, residual, grad)
    last = torch.channels_last
    by_rows = elementwise_results(
        x.contiguous(memory_format=last),
        residual.contiguous(memory_format=last),
        grad.contiguous(memory_format=last),
    )
    for name, result, reference in zip(
        ("output", "grad_input", "fused", "fused grad_input", "fused grad_residual"),
        flat,
        by_rows,
        strict=False,
    ):
        assert result.is_contiguous() and reference.is_contiguous(memory_format=last), name
        assert torch.equal(result, reference), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(8, 256, 7, 7), (8, 512, 4, 4), (3, 200, 5, 5), (60, 96)])
def test_channels_last_reductions_sliced_by_channels_are_bitwise_unsliced(shape, dtype):
    """A channels-last layer with few items of rows has its reductions cut into slices of
    channels too (ChannelsLastWork, csrc/cpu/plan.h), so that small layers use every thread.
    A channel's sums depend only on the items of rows, so every per-channel result must equal,
    bit for bit, that of the same channels reduced alone in one slice: the first and the last
    channels of a vector pair (in the first and the last slice), taken out as tensors of their
    own. (A tail channel, past the last whole pair, would be summed by the scalar code in the
    layer but by the vector code alone.)"""
    memory_format = torch.channels_last if len(shape) == 4 else torch.contiguous_format
    x = (torch.randn(shape) * 3 + 1).to(dtype).contiguous(memory_format=memory_format)
    plan = cpu_plan(x)
    assert plan["channels_last_items"] == 1 and plan["channels_last_slices"] > 1
    grad = torch.randn_like(x)
    channels = shape[1]
    opmath_bytes = 8 if dtype == torch.float64 else 4
    pair_lanes = 2 * VECTOR_BYTES[plan["capability"]] // opmath_bytes
    width = max(16, pair_lanes)
    last_whole_pairs = channels // width * width
    slice_channels = plan["channels_last_slice_channels"]
    assert slice_channels % pair_lanes == 0
    assert last_whole_pairs - width >= (plan["channels_last_slices"] - 1) * slice_channels
    weight, bias = torch.rand(channels, dtype=dtype) + 0.5, torch.randn(channels, dtype=dtype)

    def results(x, grad, picked):
        x = x.clone().requires_grad_()
        w, b = weight[picked].clone().requires_grad_(), bias[picked].clone().requires_grad_()
        rm, rv = torch.zeros_like(w), torch.ones_like(w)
        out = torch.ops.custom_bn.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
        dx, dw, db = torch.autograd.grad(out, (x, w, b), grad)
        return out, dx, dw, db, rm, rv

    whole = results(x, grad, slice(None))
    for picked in (slice(0, width), slice(last_whole_pairs - width, last_whole_pairs)):
        part = x[:, picked].contiguous(memory_format=memory_format)
        assert cpu_plan(part)["channels_last_items"] == 1
        assert cpu_plan(part)["channels_last_slices"] == 1
        alone = results(part, grad[:, picked].contiguous(memory_format=memory_format), picked)
        for name, of_whole, of_part in zip(
            ("output", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"),
            whole,
            alone,
            strict=True,
        ):
            of_whole = of_whole[:, picked] if of_whole.dim() > 1 else of_whole[picked]
            assert torch.equal(of_whole, of_part), (name, picked)
