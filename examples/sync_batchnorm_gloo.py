"""SyncBatchNorm on CPU over gloo: two processes train one model, with batch statistics over
both ranks. Run: PYTHONPATH=python .venv/bin/python examples/sync_batchnorm_gloo.py"""

import os
import tempfile

import custom_bn
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def train(rank, world_size, rendezvous):
    dist.init_process_group(
        "gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world_size
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.LazyLinear(2),
    )
    model(torch.randn(1, 3, 8, 8))  # materialise the lazy layer before DDP
    model = custom_bn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        x = torch.randn(4 + rank, 3, 8, 8)  # ranks may hold different batch sizes
        loss = model(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"rank {rank} step {step}: loss {loss.item():.4f}", flush=True)
    bn = model.module[1]
    print(f"rank {rank}: running_mean[:3] {bn.running_mean[:3].tolist()}", flush=True)
    # Both ranks reach teardown together: a rank that tears down its gloo connections while
    # the other still uses them can abort the other process.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    world_size = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(train, args=(world_size, os.path.join(tmp, "rendezvous")), nprocs=world_size)
