"""The CUDA kernels on a real device: the parity matrix and the stage ops against torch's CUDA
batch norm. Skipped, and counted as skipped, without a device."""

import pytest
import torch
from samples import all_samples, assert_matches_torch, make_sample, reference_batch_norm

ops = torch.ops.custom_bn
pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("kwargs", [k for _, k in all_samples(device="cuda")],
                         ids=[n for n, _ in all_samples(device="cuda")])
def test_parity_with_torch_on_cuda(kwargs):
    assert_matches_torch(make_sample(**kwargs))


def test_momentum_none_reads_the_counter_on_the_device():
    sample = make_sample((8, 4, 5, 5), momentum=None, device="cuda")
    ours, ref = sample.clone(), sample.clone()
    for _ in range(3):
        torch.testing.assert_close(ops.batch_norm(*ours.args()), reference_batch_norm(ref))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


def test_stage_ops_on_cuda_match_the_cpu():
    x = torch.randn(6, 5, 4, 4) * 2 + 1
    cpu = ops.batch_norm_stats(x)
    gpu = ops.batch_norm_stats(x.cuda())
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    count, mean, m2 = gpu
    merged = ops.batch_norm_gather_stats_with_counts(mean[None], m2[None], count, None, None,
                                                     None, 0.1, 1e-5)
    out = ops.batch_norm_elemt(x.cuda(), None, None, *merged)
    torch.testing.assert_close(out.cpu(), torch.batch_norm(x, None, None, None, None, True, 0.1,
                                                           1e-5, False), rtol=1e-5, atol=1e-5)
