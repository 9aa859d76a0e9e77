"""The CUDA kernels on a real device: the parity matrix and the stage ops against torch's CUDA
batch norm. Skipped, and counted as skipped, without a device."""

import pytest
import torch
from samples import all_samples, assert_matches_torch, make_sample, reference_batch_norm, tolerance

ops = torch.ops.custom_bn
pytestmark = pytest.mark.cuda


@pytest.mark.parametrize(
    "kwargs",
    [k for _, k in all_samples(device="cuda")],
    ids=[n for n, _ in all_samples(device="cuda")],
)
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
    for a, b in zip(cpu, gpu, strict=False):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    count, mean, m2 = gpu
    merged = ops.batch_norm_gather_stats_with_counts(
        mean[None], m2[None], count, None, None, None, 0.1, 1e-5
    )
    out = ops.batch_norm_elemt(x.cuda(), None, None, *merged)
    torch.testing.assert_close(
        out.cpu(),
        torch.batch_norm(x, None, None, None, None, True, 0.1, 1e-5, False),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype_name", ["float32", "float64", "bfloat16", "bfloat16+float32"])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_relu_on_cuda_matches_the_cpu(layout, dtype_name, training):
    """The fused op on the device against the CPU kernels (themselves held to torch); the
    backward of both takes the device's output, so the ReLU masks are the same."""
    s = make_sample((4, 6, 5, 7), dtype_name, layout, training=training)
    residual = torch.randn_like(s.input)
    cpu, gpu = s.clone(), s.clone()
    for name in ("input", "weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(gpu, name, getattr(gpu, name).cuda())
    fwd_cpu = ops.batch_norm_relu_forward(
        cpu.input,
        cpu.weight,
        cpu.bias,
        cpu.running_mean,
        cpu.running_var,
        cpu.num_batches_tracked,
        residual,
        training,
        0.1,
        1e-5,
    )
    fwd_gpu = ops.batch_norm_relu_forward(
        gpu.input,
        gpu.weight,
        gpu.bias,
        gpu.running_mean,
        gpu.running_var,
        gpu.num_batches_tracked,
        residual.cuda(),
        training,
        0.1,
        1e-5,
    )
    tol = {"rtol": 3e-2, "atol": 3e-2} if "bfloat16" in dtype_name else {}
    for a, b in zip(fwd_cpu, fwd_gpu, strict=False):
        torch.testing.assert_close(b.cpu(), a, **tol)
    assert fwd_gpu[0].stride() == fwd_cpu[0].stride()
    torch.testing.assert_close(gpu.running_var.cpu(), cpu.running_var, **tol)
    out = fwd_gpu[0].cpu()
    grad = torch.randn_like(out)
    mask = [True, True, True, True]
    back_cpu = ops.batch_norm_relu_backward(
        grad,
        out,
        cpu.input,
        cpu.weight,
        cpu.running_mean,
        cpu.running_var,
        fwd_cpu[1],
        fwd_cpu[2],
        training,
        1e-5,
        mask,
    )
    back_gpu = ops.batch_norm_relu_backward(
        grad.cuda(),
        fwd_gpu[0],
        gpu.input,
        gpu.weight,
        gpu.running_mean,
        gpu.running_var,
        fwd_gpu[1],
        fwd_gpu[2],
        training,
        1e-5,
        mask,
    )
    for a, b in zip(back_cpu, back_gpu, strict=False):
        torch.testing.assert_close(b.cpu(), a, **tol)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_batch_norm_eval_on_cuda_matches_the_cpu_and_writes_nothing(relu, layout):
    s = make_sample((4, 6, 5, 7), training=False, layout=layout, device="cuda")
    residual = torch.randn_like(s.input) if relu else None
    before = (s.running_mean.clone(), s.running_var.clone())
    args = (s.input, s.weight, s.bias, s.running_mean, s.running_var, s.eps, relu, residual)
    out = ops.batch_norm_eval(*args)
    expected = ops.batch_norm_eval(*(a.cpu() if isinstance(a, torch.Tensor) else a for a in args))
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close((s.running_mean, s.running_var), before, rtol=0, atol=0)


def test_vmap_of_eval_batch_norm_on_cuda_matches_a_loop():
    import custom_bn

    bn = custom_bn.BatchNorm2d(5).cuda().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 4, 5, 6, 6, device="cuda")
    batched = torch.func.vmap(bn)(x)
    torch.testing.assert_close(batched, torch.stack([bn(xi) for xi in x]))


@pytest.mark.parametrize("training", [True, False])
def test_output_and_gradient_layouts_follow_the_cpu_rule(training):
    # The layout rule is torch's CPU kernel's (test_torch_edges.py); CUDA results take the same.
    from test_torch_edges import LAYOUT_INPUTS

    for name, x in LAYOUT_INPUTS:
        channels = x.size(1)
        strides = []
        for device in ("cpu", "cuda"):
            inp = torch.empty_strided(x.size(), x.stride(), device=device).copy_(x)
            inp.requires_grad_()
            stats = torch.zeros(channels, device=device), torch.ones(channels, device=device)
            out = ops.batch_norm(inp, None, None, *stats, training, 0.1, 1e-5)
            (grad,) = torch.autograd.grad(out, inp, torch.ones_like(out), allow_unused=True)
            strides.append((out.stride(), None if grad is None else grad.stride()))
        assert strides[1] == strides[0], name


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16+float32"])
def test_in_place_op_on_cuda_matches_the_cpu(layout, dtype_name):
    """batch_norm_relu_ (the generic steps around the device's fused kernels) against the CPU's
    loops: output, running stats, the kept values and the gradients; and the normalized input
    SyncBatchNorm's in-place backward recovers."""
    s = make_sample((4, 6, 5, 7), dtype_name, layout)
    residual, grad = torch.randn_like(s.input), torch.randn_like(s.input)
    results = {}
    for device in ("cpu", "cuda"):
        c = s.clone()
        x, weight, bias, r = (
            t.to(device).requires_grad_() for t in (c.input, c.weight, c.bias, residual)
        )
        stats = [t.to(device) for t in (c.running_mean, c.running_var, c.num_batches_tracked)]
        output = x * 1  # a tensor nothing else reads
        ops.batch_norm_relu_(output, weight, bias, stats[0], stats[1], True, 0.1, 1e-5, stats[2], r)
        grads = torch.autograd.grad(output, (x, weight, bias, r), grad.to(device))
        forward = (x.detach().clone(), weight, bias, *stats[:2], None, r, True, 0.1, 1e-5)
        save_mean, save_invstd, kept = ops.batch_norm_relu_forward_(*forward)
        x_hat = ops.batch_norm_relu_normalized_input(
            forward[0], kept, weight, bias, r, save_mean, save_invstd
        )
        results[device] = [output, *stats[:2], kept, x_hat, *grads]
    for ours, expected in zip(results["cuda"], results["cpu"], strict=True):
        torch.testing.assert_close(
            ours.detach().cpu(), expected.detach(), **tolerance(s.input.dtype)
        )
