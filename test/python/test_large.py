"""64-bit indexing: tensors past 2^31 elements through the CPU kernels, against float64.
Slow (about 9 GB of memory and a minute): run by `scripts/test --slow`."""

import gc

import pytest
import torch

ops = torch.ops.custom_bn
pytestmark = pytest.mark.slow

CHUNK = 1 << 26


def float64_channel_stats(x, channel_slices):
    """(mean, biased var) of each channel in float64, chunk by chunk (bounded memory)."""
    stats = []
    for take in channel_slices:
        flat = take(x)
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, flat.numel(), CHUNK):
            total += flat[start : start + CHUNK].double().sum()
        mean = total / flat.numel()
        m2 = torch.zeros((), dtype=torch.float64)
        for start in range(0, flat.numel(), CHUNK):
            m2 += (flat[start : start + CHUNK].double() - mean).square().sum()
        stats.append((mean.item(), (m2 / flat.numel()).item()))
    return stats


def check_samples(x, out, mean, invstd, positions, channel_of):
    for index in positions:
        c = channel_of(index)
        expected = (x.view(-1)[index].double() - mean[c]) / (invstd[c] ** -2) ** 0.5
        assert abs(out.view(-1)[index].double().item() - expected.item()) < 0.02 + 0.01 * abs(
            expected.item()
        )


def test_one_channel_of_more_than_2_pow_31_elements():
    n = (1 << 31) + 4099  # one channel: the slab index passes 2^31
    x = torch.empty(1, 1, n, dtype=torch.bfloat16)
    for start in range(0, n, CHUNK):
        piece = x[0, 0, start : start + CHUNK]
        piece.copy_(torch.randn(piece.numel()) * 3 + 5)
    ((ref_mean, ref_var),) = float64_channel_stats(x, [lambda t: t.view(-1)])
    out, mean, invstd = ops.batch_norm_forward(x, None, None, None, None, None, True, 0.1, 1e-5)
    assert abs(mean.item() - ref_mean) < 1e-4
    assert abs(invstd.item() ** -2 - 1e-5 - ref_var) / ref_var < 1e-4
    positions = [0, 1, (1 << 31) - 1, 1 << 31, n - 1] + torch.randint(0, n, (64,)).tolist()
    check_samples(x, out, [ref_mean], [1 / (ref_var + 1e-5) ** 0.5], positions, lambda i: 0)
    del out
    gc.collect()

    # The backward reduction over the same slab, with x itself as grad_output.
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(
        x, x, mean, invstd, None, True, False, False
    )
    assert abs(sum_dy.item() - ref_mean * n) / abs(ref_mean * n) < 1e-4
    assert abs(sum_dy_xmu.item() - ref_var * n) / (ref_var * n) < 1e-3


def test_channels_last_past_2_pow_31_elements():
    channels = 64
    rows = (1 << 31) // channels + 1031  # the flat index row * C + c passes 2^31
    x = torch.empty(rows, channels, dtype=torch.bfloat16)
    for start in range(0, rows, CHUNK // channels):
        piece = x[start : start + CHUNK // channels]
        piece.copy_(
            torch.randn(piece.shape) * torch.arange(1, channels + 1) + torch.arange(channels)
        )
    sampled = [0, 17, channels - 1]
    ref = float64_channel_stats(x, [lambda t, c=c: t[:, c].contiguous().view(-1) for c in sampled])
    out, mean, invstd = ops.batch_norm_forward(x, None, None, None, None, None, True, 0.1, 1e-5)
    for c, (ref_mean, ref_var) in zip(sampled, ref, strict=False):
        assert abs(mean[c].item() - ref_mean) < 1e-3 * (1 + abs(ref_mean))
        assert abs(invstd[c].item() ** -2 - 1e-5 - ref_var) / ref_var < 1e-4
    positions = [
        i for i in torch.randint(0, rows * channels, (64,)).tolist() if i % channels in sampled
    ] + [(rows - 1) * channels + sampled[-1]]
    means = {c: m for c, (m, _) in zip(sampled, ref, strict=False)}
    invstds = {c: 1 / (v + 1e-5) ** 0.5 for c, (_, v) in zip(sampled, ref, strict=False)}
    check_samples(x, out, means, invstds, positions, lambda i: i % channels)
