"""Training on channels-first inputs larger than the last-level cache whose channels fit in
L2, and on small ones (an eighth of that cache at most): the CPU kernels then take one channel
at a time (CpuPlan::channel_at_a_time, csrc/cpu/plan.h).
Each case is held to torch in float64, and to the two-kernel path (the stage ops, which always
take it): bit for bit where both evaluate the same expressions. With a residual the ops keep
to the two-kernel path (it measured faster); those cases hold it to the same checks."""

import custom_bn  # noqa: F401  (loads the ops)
import pytest
import torch
from conftest import cache_bytes, cpu_plan, goes_channel_at_a_time

ops = torch.ops.custom_bn
EPS = 1e-5
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 4e-3}


def layer_input(batch, per_channel_shape, dtype, large):
    """(batch, C, *per_channel_shape). Large: C chosen so that the input is a quarter larger
    than the last-level cache, one channel far below L2. Small: 24 channels, a model's layer
    at batch 8 (the two passes' inputs far below an eighth of the cache)."""
    values = batch * torch.Size(per_channel_shape).numel()
    element_size = torch.finfo(dtype).bits // 8
    channels = -(-cache_bytes() * 5 // 4 // (values * element_size)) if large else 24
    x = torch.randn(batch, channels, *per_channel_shape) * 2 + 0.5
    return x.to(dtype)


CASES = [  # (batch, per-channel shape, dtype, large)
    (8, (16, 16), torch.float32, True),
    (8, (16, 16), torch.bfloat16, True),
    (4, (3136,), torch.float16, True),  # 3-D, long runs
    (8, (7, 7), torch.float32, False),  # runs that are not whole vectors
    (8, (14, 14), torch.bfloat16, False),
    (4, (300,), torch.float16, False),
    (32, (4, 4), torch.float32, False),  # runs of one AVX-512 vector
    (64, (8,), torch.bfloat16, False),  # runs of one AVX2 or baseline float vector
]


def count_of(x):
    return torch.tensor([x.numel() / x.size(1)], dtype=torch.float64)


def broadcast(t, x):
    return t.view(1, -1, *([1] * (x.dim() - 2)))


def reference(x, w, b, grad, relu=False, residual=None):
    """torch's batch norm (+ residual, ReLU) and its gradients, in float64."""
    xd = x.double().requires_grad_()
    wd, bd = w.double().requires_grad_(), b.double().requires_grad_()
    out = torch.batch_norm(xd, wd, bd, None, None, True, 0.1, EPS, False)
    if residual is not None:
        out = out + residual.double()
    if relu:
        out = out.relu()
    return (out, *torch.autograd.grad(out, (xd, wd, bd), grad.double()))


@pytest.mark.parametrize("batch,shape,dtype,large", CASES)
def test_batch_norm_matches_torch_and_the_two_kernel_path(batch, shape, dtype, large):
    x = layer_input(batch, shape, dtype, large)
    channels = x.size(1)
    w, b = torch.rand(channels) + 0.5, torch.randn(channels)
    rm, rv = torch.zeros(channels), torch.ones(channels)
    grad = torch.randn_like(x)
    assert goes_channel_at_a_time(x, "batch_norm_forward") and goes_channel_at_a_time(
        x, "batch_norm_backward"
    )
    out, mean, invstd = ops.batch_norm_forward(x, w, b, rm, rv, None, True, 0.1, EPS)
    dx, dw, db = ops.batch_norm_backward(
        grad, x, w, None, None, mean, invstd, True, EPS, [True, True, True]
    )

    tol = TOLERANCE[dtype]
    expected_out, expected_dx, expected_dw, expected_db = reference(x, w, b, grad)
    for ours, theirs in ((out, expected_out), (dx, expected_dx)):
        torch.testing.assert_close(ours.double(), theirs.to(dtype).double(), rtol=tol, atol=tol)
    # Sums over a channel's values: a few float ulps of the largest partial sum.
    torch.testing.assert_close(dw.double(), expected_dw, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(db.double(), expected_db, rtol=tol * 10, atol=tol * 10)
    torch.testing.assert_close(
        rm, 0.1 * x.double().mean((0, *range(2, x.dim()))).float(), rtol=1e-4, atol=1e-5
    )

    # The two-kernel path: statistics, then the elementwise pass; sums, then the gradient.
    _, stats_mean, m2 = ops.batch_norm_stats(x)
    assert torch.equal(stats_mean, mean)
    merged_mean, merged_invstd = ops.batch_norm_gather_stats_with_counts(
        stats_mean.unsqueeze(0), m2.unsqueeze(0), count_of(x), None, None, None, 0.1, EPS
    )
    assert torch.equal(merged_invstd, invstd)
    assert torch.equal(ops.batch_norm_elemt(x, w, b, merged_mean, merged_invstd), out)
    sum_dy, sum_dy_xmu, gw, gb = ops.batch_norm_backward_reduce(
        grad, x, mean, invstd, w, True, True, True
    )
    # Equal up to where the compiler contracts the multiply into the sum's add (an FMA): the
    # fused pass computes dz * (x - mean) inline, the stage op from dz read back
    # (docs/reliability.md, Determinism). Each is as far from float64 as the other (up to
    # 3.5e-5 on sums of 12544 terms that cancel).
    torch.testing.assert_close(gw, dw, rtol=1e-5, atol=1e-4)
    assert torch.equal(gb, db)
    assert torch.equal(
        ops.batch_norm_backward_elemt(grad, x, mean, invstd, w, sum_dy, sum_dy_xmu, count_of(x)), dx
    )


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("batch,shape,dtype,large", CASES)
def test_batch_norm_relu_matches_torch_and_the_two_kernel_path(
    batch, shape, dtype, large, with_residual
):
    x = layer_input(batch, shape, dtype, large)
    channels = x.size(1)
    w, b = torch.rand(channels) + 0.5, torch.randn(channels)
    residual = torch.randn_like(x) if with_residual else None
    grad = torch.randn_like(x)
    plan = cpu_plan(x, "batch_norm_relu_forward", residual=with_residual)
    assert plan["channel_at_a_time"] != with_residual
    assert (
        goes_channel_at_a_time(x, "batch_norm_relu_backward")
        and not cpu_plan(x, "batch_norm_relu_backward", residual=True)["channel_at_a_time"]
    )
    out, mean, invstd = ops.batch_norm_relu_forward(
        x, w, b, None, None, None, residual, True, 0.1, EPS
    )
    dx, dw, db, dr = ops.batch_norm_relu_backward(
        grad, out, x, w, None, None, mean, invstd, True, EPS, [True, True, True, with_residual]
    )

    tol = TOLERANCE[dtype]
    expected_out, expected_dx, expected_dw, expected_db = reference(x, w, b, grad, True, residual)
    torch.testing.assert_close(out.double(), expected_out.to(dtype).double(), rtol=tol, atol=tol)
    # Where the output rounds to zero but the float64 one is positive, the mask differs, and
    # so do that channel's sums: compare the gradients of the channels whose masks agree.
    same_mask = (out > 0) == (expected_out > 0)
    agrees = same_mask.transpose(0, 1).reshape(channels, -1).all(1)
    assert agrees.float().mean() > 0.9
    in_agreeing = agrees.view(1, -1, *[1] * (x.dim() - 2)).expand_as(x)
    torch.testing.assert_close(
        dx.double()[in_agreeing], expected_dx.to(dtype).double()[in_agreeing], rtol=tol, atol=tol
    )
    torch.testing.assert_close(
        dw.double()[agrees], expected_dw[agrees], rtol=tol * 10, atol=tol * 10
    )
    torch.testing.assert_close(
        db.double()[agrees], expected_db[agrees], rtol=tol * 10, atol=tol * 10
    )

    # The two-kernel path, with ReLU's gradient applied first: bit for bit.
    masked = torch.where(out > 0, grad, torch.zeros_like(grad))
    if with_residual:
        assert torch.equal(dr, masked)
    else:
        assert dr is None
        assert torch.equal(ops.batch_norm_stats(x)[1], mean)
        _, merged_invstd = ops.batch_norm_gather_stats_with_counts(
            mean.unsqueeze(0),
            ops.batch_norm_stats(x)[2].unsqueeze(0),
            count_of(x),
            None,
            None,
            None,
            0.1,
            EPS,
        )
        assert torch.equal(ops.batch_norm_elemt(x, w, b, mean, merged_invstd).relu(), out)
    sum_dy, sum_dy_xmu, gw, gb = ops.batch_norm_backward_reduce(
        masked, x, mean, invstd, w, True, True, True
    )
    # Equal up to where the compiler contracts the multiply into the sum's add (an FMA): the
    # fused pass computes dz * (x - mean) inline, the stage op from dz read back
    # (docs/reliability.md, Determinism). Each is as far from float64 as the other (up to
    # 3.5e-5 on sums of 12544 terms that cancel).
    torch.testing.assert_close(gw, dw, rtol=1e-5, atol=1e-4)
    assert torch.equal(gb, db)
    # The input gradient through a different expression (the mask inside it, where the
    # compiler may fuse multiply-adds differently): equal up to float rounding.
    torch.testing.assert_close(
        ops.batch_norm_backward_elemt(masked, x, mean, invstd, w, sum_dy, sum_dy_xmu, count_of(x)),
        dx,
        rtol=tol,
        atol=tol,
    )
