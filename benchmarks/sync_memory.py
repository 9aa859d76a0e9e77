"""Training memory over processes: custom_bn.SyncBatchNorm on two gloo ranks, converted from
the fused model (fuse_batchnorm_relu, then SyncBatchNorm.convert_sync_batchnorm) and from the
in-place one (fuse_batchnorm_relu(inplace=True): in-place activated batch norm over the ranks),
against torch's BatchNorm in one process with the batch of one rank. Per model and variant:
the bytes autograd saves for the backward of a training step on rank 0 (memory.py's count:
each storage once, parameters excluded), each variant in processes of its own.

Writes build/bench/sync_memory.csv."""

import argparse
import datetime
import gc
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile

import custom_bn
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from memory import FULL, QUICK, make_inputs, make_trainer, saved_bytes, training_loss, write_csv
from models import build

WORLD_SIZE = 2
# The rows are memory.py's (FULL, QUICK), with its batch per rank.
VARIANTS = ("torch", "sync", "sync_inplace")


def build_variant(name: str, variant: str, layout: str) -> torch.nn.Module:
    if variant == "torch":
        return build(name, "torch", layout)
    model = build(name, "inplace" if variant == "sync_inplace" else "fused", layout)
    return custom_bn.SyncBatchNorm.convert_sync_batchnorm(model)


def _measure_rank(rank: int, config, variant: str, directory: str):
    """On each rank: a warm training step, then the saved bytes of a forward; rank 0 writes
    them to `directory`/result.json."""
    dist.init_process_group(
        "gloo",
        init_method=f"file://{directory}/rendezvous",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=300),
    )
    try:
        name, batch, px, layout, dtype = config
        model = build_variant(name, variant, layout)
        torch.manual_seed(rank)
        x, target = make_inputs(batch, px, layout)
        make_trainer(model, dtype)(x, target)  # warm, as memory.py's steps
        saved = saved_bytes(lambda: training_loss(model, x, target, dtype), model.parameters())
        if rank == 0:
            pathlib.Path(directory, "result.json").write_text(json.dumps({"saved": saved}))
        dist.barrier()  # no rank leaves while another still talks to it
    finally:
        dist.destroy_process_group()
        gc.collect()  # gloo's objects go before the interpreter's shutdown (pytorch issue 190489)


def measure(config, variant: str) -> int:
    """Saved bytes of `variant` on rank 0 (torch's: one process, no process group)."""
    if variant == "torch":
        name, batch, px, layout, dtype = config
        model = build_variant(name, variant, layout)
        x, target = make_inputs(batch, px, layout)
        make_trainer(model, dtype)(x, target)
        return saved_bytes(lambda: training_loss(model, x, target, dtype), model.parameters())
    with tempfile.TemporaryDirectory() as directory:
        mp.spawn(_measure_rank, args=(config, variant, directory), nprocs=WORLD_SIZE, join=True)
        return json.loads(pathlib.Path(directory, "result.json").read_text())["saved"]


def _in_process_of_its_own(config, variant: str) -> int:
    command = [sys.executable, __file__, "--measure", json.dumps(config), variant]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{variant}: {done.stderr[-2000:]}")
    return int(done.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the ResNet-50 NCHW float32 row")
    parser.add_argument("--only", default="", help="run the rows whose label contains this")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("build/bench"))
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # (config, variant)
    args = parser.parse_args()
    if args.measure:
        print(measure(json.loads(args.measure[0]), args.measure[1]))
        return
    configs = [c for c in (QUICK if args.quick else FULL) if args.only in " ".join(map(str, c))]
    print(
        f"# {datetime.date.today()} {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}; {WORLD_SIZE} gloo ranks, saved bytes on rank 0; torch: "
        "one process with one rank's batch; ratios are the variant's over torch's"
    )
    print("model | batch per rank | px | layout | dtype | torch saved MB | sync | sync in place")
    rows = []
    for config in configs:
        saved = {v: _in_process_of_its_own(config, v) for v in VARIANTS}
        row = dict(zip(("model", "batch", "px", "layout", "dtype"), config, strict=True))
        row.update({f"{v}_saved_mb": round(saved[v] / 2**20, 1) for v in VARIANTS})
        rows.append(row)
        ratios = [f"{saved[v] / saved['torch']:.2f}x" for v in VARIANTS[1:]]
        print(" | ".join([*map(str, config), str(row["torch_saved_mb"]), *ratios]), flush=True)
    write_csv(rows, args.out_dir / "sync_memory.csv")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // WORLD_SIZE)))
    main()
