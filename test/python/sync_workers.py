"""Worker processes for test_sync_batchnorm.py (spawned; must be importable)."""

import copy
import datetime
import gc

import custom_bn
import torch
import torch.distributed as dist
import torch.nn.functional as F

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def init(rank, world_size, init_file, backend):
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )


def teardown():
    """Destroys the process group, then drops what still refers to it (torch.compile's caches,
    autograd graphs in collectable cycles), so that gloo's objects go before the interpreter's
    shutdown: destroyed during it, gloo can abort the process ("terminate called without an
    active exception", pytorch issue 190489)."""
    dist.destroy_process_group()
    torch._dynamo.reset()
    gc.collect()


def parity(rank, world_size, init_file, split, momentum, group_ranks, backend="gloo", device="cpu"):
    """Several steps of SyncBatchNorm on this rank's slice against custom_bn.BatchNorm2d on
    the whole batch: outputs, input grads, summed weight/bias grads, running stats, eval."""
    init(rank, world_size, init_file, backend)
    try:
        members = group_ranks or list(range(world_size))
        group = dist.new_group(group_ranks) if group_ranks else None
        torch.manual_seed(0)  # the same batches on every rank
        channels = 3
        sync = custom_bn.SyncBatchNorm(channels, momentum=momentum, process_group=group).to(device)
        with torch.no_grad():
            sync.weight.uniform_(0.5, 1.5)
            sync.bias.normal_()
        whole = custom_bn.BatchNorm2d(channels, momentum=momentum).to(device)
        whole.load_state_dict(sync.state_dict())
        for step in range(4):
            evaluating = step == 3
            sync.train(not evaluating)
            whole.train(not evaluating)
            x = torch.randn(sum(split), channels, 4, 5, device=device) * 2 + step
            grad = torch.randn_like(x)
            if rank not in members:
                continue
            index = members.index(rank)
            start = sum(split[:index])
            mine = slice(start, start + split[index])

            x_mine = x[mine].clone().requires_grad_()
            y_mine = sync(x_mine)
            y_mine.backward(grad[mine])
            x_whole = x.clone().requires_grad_()
            y_whole = whole(x_whole)
            y_whole.backward(grad)

            torch.testing.assert_close(y_mine, y_whole[mine], **TOLERANCE)
            torch.testing.assert_close(x_mine.grad, x_whole.grad[mine], **TOLERANCE)
            for ours, reference in ((sync.weight, whole.weight), (sync.bias, whole.bias)):
                summed = ours.grad.clone()
                dist.all_reduce(summed, group=group)
                torch.testing.assert_close(summed, reference.grad, rtol=1e-4, atol=1e-4)
                ours.grad, reference.grad = None, None
            torch.testing.assert_close(sync.running_mean, whole.running_mean, **TOLERANCE)
            torch.testing.assert_close(sync.running_var, whole.running_var, **TOLERANCE)
            assert (
                sync.num_batches_tracked.item()
                == whole.num_batches_tracked.item()
                == min(step + 1, 3)
            )
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        teardown()


# The activations of in-place activated batch norm, as BatchNormReLU2d's keywords.
ACTIVATIONS = {
    "relu": {},
    "leaky_relu": {"negative_slope": 0.1},
    "relu6": {"max_val": 6.0},
    "identity": {"negative_slope": 1.0},
}
INPLACE_TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
}


def _recording(saved):
    """Hooks that add each tensor autograd saves to the list `saved`."""
    return torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t)


def _kept_values(saved, output):
    """What a backward keeps of the input: the input-shaped tensors it saved, and the length of
    the 1-D one that is longer than a per-channel tensor (kept_input)."""
    shaped = [t for t in saved if t.shape == output.shape]
    flat = [t for t in saved if t.dim() == 1 and t.numel() > output.size(1)]
    return shaped, sum(t.numel() for t in flat)


def inplace_parity(rank, world_size, init_file, split, activation, residual, dtype_name):
    """SyncBatchNormReLU2d(inplace=True) on this rank's slice against BatchNormReLU2d on the
    whole batch, as `parity` checks SyncBatchNorm, also with a residual and its gradient. And
    what its backward keeps: the output, the residual and, summed over the ranks, as many input
    values as the single-process in-place op keeps on the whole batch."""
    init(rank, world_size, init_file, "gloo")
    try:
        torch.manual_seed(0)
        dtype = getattr(torch, dtype_name)
        tolerance = INPLACE_TOLERANCE[dtype]
        kwargs = ACTIVATIONS[activation]
        sync = custom_bn.SyncBatchNormReLU2d(4, inplace=True, **kwargs).to(dtype)
        with torch.no_grad():
            # zero_init_residual's 0, a tiny weight, a bias near the recovery margin, a plain one.
            sync.weight.copy_(torch.tensor([0.0, 1e-3, 0.7, 1.3]))
            sync.bias.copy_(torch.tensor([0.5, 0.1, 2.0, -0.2]))
        whole = custom_bn.BatchNormReLU2d(4, **kwargs).to(dtype)
        in_place = custom_bn.BatchNormReLU2d(4, inplace=True, **kwargs).to(dtype)
        for reference in (whole, in_place):
            reference.load_state_dict(sync.state_dict())
        start = sum(split[:rank])
        mine = slice(start, start + split[rank])
        for step in range(3):
            evaluating = step == 2
            for module in (sync, whole, in_place):
                module.train(not evaluating)
            x = (torch.randn(sum(split), 4, 3, 4) * 2 + step).to(dtype)
            r = torch.randn_like(x) if residual else None
            grad = torch.randn_like(x)

            x_mine = x[mine].clone().requires_grad_()
            r_mine = r[mine].clone().requires_grad_() if residual else None
            saved = []
            with _recording(saved):
                y_mine = sync(x_mine * 1, r_mine)  # a tensor nothing else reads
            y_mine.backward(grad[mine])
            x_whole = x.clone().requires_grad_()
            r_whole = r.clone().requires_grad_() if residual else None
            y_whole = whole(x_whole, r_whole)
            y_whole.backward(grad)

            torch.testing.assert_close(y_mine, y_whole[mine], **tolerance)
            torch.testing.assert_close(x_mine.grad, x_whole.grad[mine], **tolerance)
            if residual:
                torch.testing.assert_close(r_mine.grad, r_whole.grad[mine], **tolerance)
            for ours, reference in ((sync.weight, whole.weight), (sync.bias, whole.bias)):
                summed = ours.grad.clone()
                dist.all_reduce(summed)
                torch.testing.assert_close(summed, reference.grad, **tolerance)
                ours.grad, reference.grad = None, None
            torch.testing.assert_close(sync.running_mean, whole.running_mean, **tolerance)
            torch.testing.assert_close(sync.running_var, whole.running_var, **tolerance)
            assert sync.num_batches_tracked.item() == whole.num_batches_tracked.item()
            if evaluating:
                continue
            shaped, kept = _kept_values(saved, y_mine)
            expected = [y_mine] + ([r_mine] if residual else [])
            assert {t.untyped_storage().data_ptr() for t in shaped} == {
                t.untyped_storage().data_ptr() for t in expected
            }, "keeps the output and the residual, not the input"
            saved_whole = []
            with _recording(saved_whole):
                y = in_place(x.clone().requires_grad_() * 1, r)
            kept_whole = _kept_values(saved_whole, y)[1]
            kept_everywhere = torch.tensor(kept)
            dist.all_reduce(kept_everywhere)
            assert kept_everywhere.item() == kept_whole, (kept_everywhere.item(), kept_whole)
            assert kept_whole < x.numel() or dtype == torch.bfloat16
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        teardown()


class SmallCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(1, 6, 3, padding=1),
            torch.nn.BatchNorm2d(6),
            torch.nn.ReLU(),
            torch.nn.Conv2d(6, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8, momentum=None),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(8, 3),
        )

    def forward(self, x):
        return self.body(x)


def ddp_training(rank, world_size, init_file, backend="gloo", device="cpu", inplace=False):
    """DistributedDataParallel over a CNN with SyncBatchNorm, against one process training
    the same CNN with custom_bn.BatchNorm2d on the whole batch. With `inplace`, both are first
    fused in place (fuse_batchnorm_relu(inplace=True)): SyncBatchNormReLU2d(inplace=True) on
    the ranks."""
    init(rank, world_size, init_file, backend)
    try:
        torch.manual_seed(0)
        model = SmallCNN().to(device)
        if inplace:
            model = custom_bn.fuse_batchnorm_relu(model, inplace=True)
        whole = custom_bn.convert_batchnorm(copy.deepcopy(model))
        synced = custom_bn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
        if inplace:
            # The fused call sites now call the SyncBatchNorm layers, in place.
            assert custom_bn.fusion.fused_batch_norms(synced) == ["body.1", "body.4"]
        ddp = torch.nn.parallel.DistributedDataParallel(synced)
        optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (ddp, whole)]
        per_rank = 4
        for _ in range(4):
            x = torch.randn(per_rank * world_size, 1, 6, 6, device=device)
            y = torch.randint(0, 3, (per_rank * world_size,), device=device)
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            for net, optimizer, inputs, targets in (
                (ddp, optimizers[0], x[mine], y[mine]),
                (whole, optimizers[1], x, y),
            ):
                optimizer.zero_grad()
                saved = []
                with _recording(saved):
                    loss = F.cross_entropy(net(inputs), targets)
                loss.backward()
                if inplace and net is ddp:
                    # The activations kept: each layer's output, written over the conv's.
                    activations = {
                        t.untyped_storage().data_ptr()
                        for t in saved
                        if t.dim() == 4 and t.size(0) == per_rank and t.size(1) > 1
                    }
                    assert len(activations) == 2, len(activations)
                optimizer.step()
        for (name, a), (_, b) in zip(
            synced.state_dict().items(), whole.state_dict().items(), strict=False
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        teardown()


def inplace_compiled(rank, world_size, init_file):
    """SyncBatchNormReLU2d(inplace=True) under torch.compile(fullgraph=True), with aot_eager
    and inductor, against the eager module: output, input and residual gradients, running
    stats."""
    init(rank, world_size, init_file, "gloo")
    try:
        torch.manual_seed(0)
        eager = custom_bn.SyncBatchNormReLU2d(4, inplace=True, max_val=6.0)
        x = torch.randn(3 + rank, 4, 3, 5) * 2 + rank
        r = torch.randn_like(x)
        grad = torch.randn_like(x)

        def step(module):
            x_leaf, r_leaf = x.clone().requires_grad_(), r.clone().requires_grad_()
            y = module(x_leaf * 1, r_leaf)
            y.backward(grad)
            return y.detach(), x_leaf.grad, r_leaf.grad

        for backend in ("aot_eager", "inductor"):
            compiled_module = copy.deepcopy(eager)
            compiled = step(torch.compile(compiled_module, fullgraph=True, backend=backend))
            expected = step(eager)
            for ours, reference in zip(compiled, expected, strict=True):
                torch.testing.assert_close(ours, reference, **TOLERANCE)
            for name in ("running_mean", "running_var"):
                torch.testing.assert_close(
                    getattr(compiled_module, name), getattr(eager, name), **TOLERANCE
                )
        dist.barrier()  # no rank tears down while another still talks to it
    finally:
        teardown()
