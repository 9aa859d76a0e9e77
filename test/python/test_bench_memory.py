"""scripts/bench --memory (benchmarks/memory.py) measures what it says: the bytes autograd saves,
counted by hand on a small model; a step's peak; the bisection of the largest batch; and a probe
under its address-space budget. Sizes are asserted, timings are not."""

import os
import subprocess
import sys

import custom_bn
import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import memory  # noqa: E402


def conv_bn_relu_conv():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 4, 3, padding=1),
    )


@pytest.mark.parametrize("variant", ["torch", "convert", "fused"])
def test_saved_bytes_are_the_activations_kept(variant):
    """Each variant keeps the first convolution's input, the batch norm's input and the ReLU's
    output (the second convolution's input: one storage), plus per-channel tensors."""
    model = conv_bn_relu_conv()
    if variant != "torch":
        model = custom_bn.convert_batchnorm(model)
    if variant == "fused":
        model = custom_bn.fuse_batchnorm_relu(model)
    x = torch.randn(4, 3, 16, 16)
    saved = memory.saved_bytes(lambda: model(x), model.parameters())
    activation_bytes = x.numel() * 4 + 2 * (4 * 8 * 16 * 16) * 4
    per_channel_bytes = 8 * 4
    assert activation_bytes <= saved <= activation_bytes + 6 * per_channel_bytes


def test_in_place_saves_its_output_and_the_clipped_input_values():
    """In place, the batch norm's input and output are one storage (the second convolution's
    input), and beside it the input values ReLU clipped (a 1-D tensor, one spare value)."""
    model = custom_bn.fuse_batchnorm_relu(conv_bn_relu_conv(), inplace=True)
    x = torch.randn(4, 3, 16, 16)
    saved = memory.saved_bytes(lambda: model(x), model.parameters())
    with torch.no_grad():
        conv, bn = model[0], model[1]
        _, _, kept = torch.ops.custom_bn.batch_norm_relu_forward_(
            conv(x), bn.weight, bn.bias, None, None, None, None, True, 0.1, 1e-5
        )
    clipped = kept.numel()
    activation_bytes = x.numel() * 4 + (4 * 8 * 16 * 16) * 4 + (clipped + 1) * 4
    per_channel_bytes = 8 * 4
    assert activation_bytes <= saved <= activation_bytes + 6 * per_channel_bytes


def test_step_peak_sees_what_a_step_touches():
    def step():
        block = torch.ones(64 * 2**20, dtype=torch.uint8)  # touched: resident
        del block

    peak = memory.step_peak_bytes(step)
    # Within a few pages: the process's other pages may leave or join meanwhile.
    assert 62 * 2**20 <= peak < 96 * 2**20


@pytest.mark.parametrize("largest", [0, 1, 2, 3, 37, 64, 1000, 1024])
def test_largest_batch_bisection(largest):
    probes = []

    def fits(batch):
        probes.append(batch)
        return batch <= largest

    assert memory.largest_batch(fits, start=4, cap=1024) == largest
    assert len(probes) <= 2 * 11


def test_probe_runs_within_its_budget():
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'python'}:{ROOT / 'benchmarks'}")
    config = '["resnet18", 1, 32, "NCHW", "float32"]'

    def probe(batch):
        command = [sys.executable, str(ROOT / "benchmarks" / "memory.py"), "--probe", config,
                   "fused", str(batch), "256"]  # fmt: skip
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    small, large = probe(2), probe(4096)
    assert small.returncode == 0, small.stderr[-2000:]
    assert large.returncode == memory.OUT_OF_MEMORY, large.stderr[-2000:]


def test_in_place_bounds_drop_the_batch_norm_input_and_keep_its_clipped_values():
    """On the fused small model: floor is saved without the batch norm's input; exact keeps the
    share of that input whose ReLU output is zero, counted here by hand."""
    model = custom_bn.fuse_batchnorm_relu(custom_bn.convert_batchnorm(conv_bn_relu_conv()))
    x = torch.randn(4, 3, 16, 16)
    saved = memory.saved_bytes(lambda: model(x), model.parameters())
    bounds = memory.in_place_bounds(lambda: model(x), model.parameters())
    bn_input_bytes = 4 * 8 * 16 * 16 * 4
    assert bounds["floor"] == saved - bn_input_bytes
    with torch.no_grad():  # the fused call's output, as the step computed it
        clipped = (custom_bn.fusion.batch_norm_relu(model[1], model[0](x)) == 0).float().mean()
    assert 0.2 < clipped < 0.8
    assert bounds["exact"] == pytest.approx(bounds["floor"] + clipped * bn_input_bytes)


def test_sync_memory_counts_each_variant_on_a_rank():
    """scripts/bench --sync-memory: on two gloo ranks, SyncBatchNorm converted from the fused
    model keeps what torch keeps; converted from the in-place one, less."""
    import sync_memory

    config = ("resnet18", 2, 32, "NCHW", "float32")
    torch_saved = sync_memory.measure(config, "torch")
    sync = sync_memory.measure(config, "sync")
    in_place = sync_memory.measure(config, "sync_inplace")
    # The statistics and counts SyncBatchNorm keeps per channel weigh at this small size.
    assert 0.97 * torch_saved <= sync <= 1.1 * torch_saved
    assert in_place <= 0.85 * sync, (in_place, sync)
