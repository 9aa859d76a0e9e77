"""Large CPU results: CUSTOM_BN_RESULT_CACHE_MB, the cache of freed large results
(csrc/cpu/result_memory.h), where results stay right with the cache off and a malformed
setting is a clear error; and results larger than the last-level cache, written with
non-temporal stores."""

import os
import subprocess
import sys

import pytest
import torch

import custom_bn
from conftest import ROOT, cache_bytes

# Batch norm of a 16 MB input (above the 8 MB the cache starts at), twice, against torch.
SCRIPT = """
import torch, custom_bn
for _ in range(2):
    x = torch.randn(8, 32, 128, 128)
    w, b = torch.rand(32), torch.randn(32)
    out = torch.ops.custom_bn.batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(out, torch.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, False))
print("ok")
"""


def run_with(cache_mb):
    env = dict(os.environ, CUSTOM_BN_RESULT_CACHE_MB=cache_mb, PYTHONPATH=str(ROOT / "python"),
               CUSTOM_BN_LIBRARY=custom_bn.library_path())
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True)


def test_results_are_right_with_the_cache_off():
    result = run_with("0")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"


def test_malformed_cache_size_names_the_variable():
    result = run_with("lots")
    assert result.returncode != 0
    assert "CUSTOM_BN_RESULT_CACHE_MB must be a number of megabytes, got 'lots'" in result.stderr



@pytest.mark.parametrize("dtype,memory_format,channels,spatial", [
    (torch.float32, torch.contiguous_format, 32, 16),  # runs of 1 KB: streamed
    (torch.float32, torch.contiguous_format, 32, 14),  # runs of 784 bytes: streamed flat
    (torch.bfloat16, torch.channels_last, 64, 8),
    (torch.float16, torch.contiguous_format, 16, 32),
])
def test_results_larger_than_the_cache_are_right(dtype, memory_format, channels, spatial):
    """Results larger than the last-level cache are written with non-temporal stores
    (csrc/cpu/kernels.cpp: streams_result, map_first_flat). Eval mode, so each sample's expected values follow
    from it alone: the first, a middle and the last sample are checked in float64."""
    per_sample = channels * spatial * spatial * torch.finfo(dtype).bits // 8
    n = -(-cache_bytes() * 5 // 4 // per_sample)
    x = torch.randn(n, channels, spatial, spatial).to(dtype).contiguous(memory_format=memory_format)
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
        expected = (x[i:i + 1].double() - rm.double().view(1, -1, 1, 1)) * scale \
            + b.double().view(1, -1, 1, 1)
        torch.testing.assert_close(out[i:i + 1], expected.to(dtype), rtol=tol, atol=tol)
        torch.testing.assert_close(dx[i:i + 1], (grad[i:i + 1].double() * scale).to(dtype),
                                   rtol=tol, atol=tol)
        torch.testing.assert_close(fused[i:i + 1], expected.relu().to(dtype), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,spatial", [
    (torch.float32, (14, 14)),   # runs of 196 values: 784 bytes
    (torch.float32, (5, 7)),     # runs of 35: a boundary in most pairs of vectors
    (torch.bfloat16, (28, 28)),  # 1568 bytes
    (torch.float16, (11, 13)),
])
def test_runs_that_are_not_whole_vectors_stream_bitwise_right(dtype, spatial):
    """Channels-first results larger than the last-level cache whose (n, c) runs are not whole
    vectors are written as one flat array of streamed pairs of vectors (csrc/cpu/kernels.cpp,
    map_first_flat); a pair that straddles two runs takes each lane's parameters from its own
    channel. In eval mode each value depends on its sample alone, so every value must equal,
    bit for bit, the same op on a few samples at a time (which fit in the cache and are
    written run by run): the output, the input gradient, and the fused op's with a residual."""
    channels = 24
    per_sample = channels * spatial[0] * spatial[1] * torch.finfo(dtype).bits // 8
    n = -(-cache_bytes() * 5 // 8 // per_sample)  # each tensor: 5/8 of the cache
    x = (torch.randn(n, channels, *spatial) * 2 + 0.5).to(dtype)
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

    whole = elementwise_results(x, residual, grad)
    step = max(1, (1 << 20) // per_sample)
    parts = [elementwise_results(x[i:i + step], residual[i:i + step], grad[i:i + step])
             for i in range(0, n, step)]
    for name, result, pieces in zip(("output", "grad_input", "fused", "fused grad_input",
                                     "fused grad_residual"), whole, zip(*parts)):
        assert torch.equal(result, torch.cat(pieces)), name
