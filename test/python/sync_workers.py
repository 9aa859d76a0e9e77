"""Worker processes for test_sync_batchnorm.py (spawned; must be importable)."""

import copy
import datetime

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
    finally:
        dist.destroy_process_group()


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


def ddp_training(rank, world_size, init_file, backend="gloo", device="cpu"):
    """DistributedDataParallel over a CNN with SyncBatchNorm, against one process training
    the same CNN with custom_bn.BatchNorm2d on the whole batch."""
    init(rank, world_size, init_file, backend)
    try:
        torch.manual_seed(0)
        model = SmallCNN().to(device)
        whole = custom_bn.convert_batchnorm(copy.deepcopy(model))
        synced = custom_bn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
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
                F.cross_entropy(net(inputs), targets).backward()
                optimizer.step()
        for (name, a), (_, b) in zip(
            synced.state_dict().items(), whole.state_dict().items(), strict=False
        ):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()
