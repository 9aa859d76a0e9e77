"""The stage ops, composed as SyncBatchNorm composes them, against torch on the whole batch."""

import pytest
import torch
from samples import make_input, tolerance

ops = torch.ops.custom_bn


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_stats_match_torch(layout, dtype):
    x = make_input((6, 5, 4, 3), dtype, layout) * 3 + 2
    count, mean, m2 = ops.batch_norm_stats(x)
    assert count.item() == 6 * 4 * 3
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), unbiased=False)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert mean.dtype == m2.dtype == count.dtype == stat
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((m2 / count).double(), ref_var, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("split", [(3, 5), (1, 7), (0, 8), (4, 0, 4)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_split_batch_matches_whole_batch(split, momentum):
    """Per-rank stats merged with counts (some ranks empty) equal the whole batch's."""
    C = 4
    x = torch.randn(sum(split), C, 5, 5) * 2 + 1
    w, b = torch.rand(C) + 0.5, torch.randn(C)
    rm, rv, nbt = torch.randn(C), torch.rand(C) + 0.5, torch.tensor(2)
    ref_rm, ref_rv, ref_nbt = rm.clone(), rv.clone(), nbt.clone()

    parts = torch.split(x, list(split))
    stats = [ops.batch_norm_stats(p) for p in parts]
    counts = torch.cat([s[0] for s in stats])
    mean, invstd = ops.batch_norm_gather_stats_with_counts(
        torch.stack([s[1] for s in stats]),
        torch.stack([s[2] for s in stats]),
        counts,
        rm,
        rv,
        nbt,
        momentum,
        1e-5,
    )
    out = torch.cat([ops.batch_norm_elemt(p, w, b, mean, invstd) for p in parts])

    ref_nbt.add_(1)
    factor = momentum if momentum is not None else 1.0 / ref_nbt.item()
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    ref = torch.batch_norm(xr, wr, br, ref_rm, ref_rv, True, factor, 1e-5, False)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(rm, ref_rm)
    torch.testing.assert_close(rv, ref_rv)
    assert nbt.item() == ref_nbt.item()

    grad = torch.randn_like(x)
    ref.backward(grad)
    grads = torch.split(grad, list(split))
    reduced = [
        ops.batch_norm_backward_reduce(g, p, mean, invstd, w, True, True, True)
        for g, p in zip(grads, parts, strict=False)
    ]
    sum_dy = sum(r[0] for r in reduced)
    sum_dy_xmu = sum(r[1] for r in reduced)
    torch.testing.assert_close(sum(r[2] for r in reduced), wr.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sum(r[3] for r in reduced), br.grad, rtol=1e-4, atol=1e-4)
    grad_input = torch.cat(
        [
            ops.batch_norm_backward_elemt(
                g, p, mean, invstd, w, sum_dy, sum_dy_xmu, counts.to(torch.int32)
            )
            for g, p in zip(grads, parts, strict=False)
        ]
    )
    torch.testing.assert_close(grad_input, xr.grad, **tolerance(torch.float32))


def test_backward_reduce_masks_give_none():
    x, g = torch.randn(4, 3, 5), torch.randn(4, 3, 5)
    _, mean, m2 = ops.batch_norm_stats(x)
    invstd = torch.rsqrt(m2 / 20 + 1e-5)
    sum_dy, sum_dy_xmu, gw, gb = ops.batch_norm_backward_reduce(
        g, x, mean, invstd, None, False, True, False
    )
    assert sum_dy is None and sum_dy_xmu is None and gb is None
    assert gw.shape == (3,)
