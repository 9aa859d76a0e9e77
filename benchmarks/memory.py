"""Training memory of a whole model: torch's BatchNorm, custom_bn.convert_batchnorm,
fuse_batchnorm_relu and fuse_batchnorm_relu(inplace=True) (in-place activated batch norm), each
variant in processes of its own. Per model and variant:

- saved: the bytes autograd keeps for the backward of one training step, each storage counted
  once, parameters excluded (torch.autograd.graph.saved_tensors_hooks);
- step peak: the resident memory a warm training step adds at its peak, over the resident
  memory before it (malloc_trim first; the peak is reset through /proc/self/clear_refs), the
  median of three steps;
- largest batch: the largest batch whose training steps run within a fixed address-space
  budget over the warm process (RLIMIT_AS, set after a warm step at batch 2), found by
  doubling then bisection, each probe a child process;
- in-place bounds (from the fused variant's step): what an in-place activated batch norm,
  which keeps its output and drops its input, could bring `saved` down to at best.
  "floor": every batch norm input that only autograd keeps dropped. "exact": the same, but the
  input values its activation clipped kept (ReLU's zeros, ReLU6's zeros and sixes): there the
  output cannot give the normalized input back, and training's input gradient needs it at
  every position (grad_x = w * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))). The
  in-place variant keeps those values, and in bfloat16 every input value (csrc/inplace.h).

Writes build/bench/memory.csv."""

import argparse
import contextlib
import csv
import ctypes
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from custom_bn.op_table import signature
from models import build
from torch.utils._python_dispatch import TorchDispatchMode

VARIANTS = ("torch", "convert", "fused", "inplace")
# (model, batch, pixels, layout, dtype): the model benchmark's sizes; bfloat16 is autocast's.
FULL = [
    (model, 8, 112, layout, dtype)
    for model in ("resnet18", "resnet50", "mobilenet_v2")
    for layout in ("NCHW", "NHWC")
    for dtype in ("float32", "bfloat16")
]
QUICK = [("resnet50", 8, 112, "NCHW", "float32")]
# The exit status of a probe that ran out of its budget.
OUT_OF_MEMORY = 3
# How running out of address space shows: torch's allocator, and oneDNN's convolutions,
# which cannot allocate their scratch space (seen from ResNet-50's backward at batch 64).
OUT_OF_MEMORY_ERRORS = ("can't allocate memory", "could not create a primitive")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _trim():
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def step_peak_bytes(step) -> int:
    """What one call of step adds to the resident memory at its peak."""
    _trim()
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident memory, to the current
    step()
    return (_status_kb("VmHWM") - before) * 1024


def _saved_storages(forward, parameters, mode=None) -> dict[int, int]:
    """{data pointer: bytes} of the distinct storages autograd saves for the backward of
    forward() (run under `mode`), but those of `parameters`."""
    excluded = {p.untyped_storage().data_ptr() for p in parameters}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        mode or contextlib.nullcontext(),
    ):
        result = forward()
    del result
    return storages


def saved_bytes(forward, parameters) -> int:
    """Bytes of the distinct storages autograd saves for the backward of forward(), but
    those of `parameters`."""
    return sum(_saved_storages(forward, parameters).values())


class _BatchNormInputs(TorchDispatchMode):
    """Per storage of a batch norm op's input: its bytes, and the bytes of it an exact in-place
    batch norm would still keep (module docstring): the share its activation clipped, none
    without an activation or with an invertible one, all with a smooth one."""

    def __init__(self):
        super().__init__()
        self.inputs: dict[int, tuple[int, float]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.name().removeprefix("custom_bn::")
        if name in ("batch_norm_forward", "batch_norm_relu_forward"):
            call = signature(name).bind(args, kwargs)
            storage = call["input"].untyped_storage()
            kept = 0.0
            if name == "batch_norm_relu_forward":
                kept = _clipped_share(out[0], call)
            self.inputs[storage.data_ptr()] = (storage.nbytes(), kept)
        return out


def _clipped_share(output, call) -> float:
    """The share of a fused op's output its activation clipped (1 for a smooth one)."""
    if call["activation"] != "piecewise_linear":
        return 1.0
    clipped = torch.zeros_like(output, dtype=torch.bool)
    if call["negative_slope"] == 0:
        clipped |= output <= call["min_val"]
    if call["max_val"] is not None:
        clipped |= output >= call["max_val"]
    return clipped.float().mean().item()


def in_place_bounds(forward, parameters) -> dict:
    """saved_bytes of forward() ("saved") with the in-place floor and exact bounds (module
    docstring)."""
    bn = _BatchNormInputs()
    storages = _saved_storages(forward, parameters, bn)
    saved = sum(storages.values())
    inputs = [(nbytes, kept) for ptr, (nbytes, kept) in bn.inputs.items() if ptr in storages]
    dropped = sum(nbytes for nbytes, _ in inputs)
    return {
        "saved": saved,
        "floor": saved - dropped,
        "exact": saved - dropped + sum(nbytes * kept for nbytes, kept in inputs),
    }


def training_loss(model, x, target, dtype: str):
    """The loss of a training step, as make_step computes it (bfloat16: under autocast)."""
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    model.train()
    with autocast:
        return F.cross_entropy(model(x), target)


def make_inputs(batch: int, px: int, layout: str):
    torch.manual_seed(0)
    x = torch.randn(batch, 3, px, px)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 100, (batch,))


def make_trainer(model, dtype: str):
    """train(x, target): a training step as benchmarks/models.py's, with one optimizer kept
    across calls (its momentum is allocated by the first)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def train(x, target):
        training_loss(model, x, target, dtype).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def measure_one(config, variant: str) -> dict:
    """saved and step peak of one variant (run in a process of its own)."""
    name, batch, px, layout, dtype = config
    model = build(name, variant, layout)
    x, target = make_inputs(batch, px, layout)
    train = make_trainer(model, dtype)
    train(x, target)  # warm: the optimizer's state, the allocator's pools
    forward = lambda: training_loss(model, x, target, dtype)  # noqa: E731
    # The fused variant's step also gives the in-place bounds (one forward for both).
    if variant == "fused":
        result = in_place_bounds(forward, model.parameters())
    else:
        result = {"saved": saved_bytes(forward, model.parameters())}
    # The median of three steps: one step's peak moves with what glibc kept from the last.
    result["peak"] = statistics.median(step_peak_bytes(lambda: train(x, target)) for _ in range(3))
    return result


def probe_fits(config, variant: str, batch: int, budget_mb: int) -> bool:
    """In this process: whether two training steps at `batch` run within budget_mb of address
    space over the process warmed at batch 2 (1 may not train: one value per channel)."""
    name, _, px, layout, dtype = config
    model = build(name, variant, layout)
    train = make_trainer(model, dtype)
    train(*make_inputs(2, px, layout))
    x, target = make_inputs(batch, px, layout)
    _trim()
    limit = _status_kb("VmSize") * 1024 + budget_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
    try:
        train(x, target)
        train(x, target)
    except (MemoryError, torch.OutOfMemoryError):  # ours raises the latter, as torch's CUDA
        return False
    except RuntimeError as error:
        if not any(e in str(error) for e in OUT_OF_MEMORY_ERRORS):
            raise
        return False
    return True


def largest_batch(fits, start: int = 4, cap: int = 1024) -> int:
    """The largest batch b in [1, cap] with fits(b), for a fits that holds up to some batch and
    fails above it: doubling from `start`, then bisection. 0 when even batch 1 fails."""
    lo, hi = 0, cap + 1  # fits(lo) or lo == 0; not fits(hi) or hi == cap + 1
    batch = start
    while batch < hi:
        if not fits(batch):
            hi = batch
            break
        lo, batch = batch, 2 * batch
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _child(*arguments) -> subprocess.CompletedProcess:
    command = [sys.executable, __file__, *arguments]
    return subprocess.run(command, capture_output=True, text=True)


def child_fits(config, variant: str, batch: int, budget_mb: int) -> bool:
    done = _child("--probe", json.dumps(config), variant, str(batch), str(budget_mb))
    if done.returncode not in (0, OUT_OF_MEMORY):
        raise RuntimeError(
            f"probe of {variant} at batch {batch} failed (exit status {done.returncode}):\n"
            f"{done.stderr[-2000:]}"
        )
    return done.returncode == 0


def run_row(config, budget_mb: int, with_largest_batch: bool) -> dict:
    name, batch, px, layout, dtype = config
    row = dict(model=name, batch=batch, px=px, layout=layout, dtype=dtype)
    for variant in VARIANTS:
        done = _child("--measure", json.dumps(config), variant)
        if done.returncode != 0:
            raise RuntimeError(f"{variant}: {done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        row[f"{variant}_saved_mb"] = round(result["saved"] / 2**20, 1)
        row[f"{variant}_peak_mb"] = round(result["peak"] / 2**20, 1)
        for bound in ("floor", "exact"):
            if bound in result:
                row[f"in_place_{bound}_saved_mb"] = round(result[bound] / 2**20, 1)
        if with_largest_batch:
            row[f"{variant}_largest_batch"] = largest_batch(
                lambda b, v=variant: child_fits(config, v, b, budget_mb)
            )
    return row


def _ratio(row, variant: str, key: str) -> str:
    theirs, ours = row[f"torch_{key}"], row[f"{variant}_{key}"]
    return f"{ours / theirs:.2f}x" if theirs else "-"


def write_csv(rows: list[dict], path: pathlib.Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the ResNet-50 NCHW float32 row")
    parser.add_argument("--only", default="", help="run the rows whose label contains this")
    parser.add_argument("--budget-mb", type=int, default=1024, help="for the largest batch")
    parser.add_argument("--no-largest-batch", action="store_true", help="skip the bisection")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("build/bench"))
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # (config, variant)
    parser.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)  # (config, variant, batch, mb)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure_one(json.loads(args.measure[0]), args.measure[1])))
        return
    if args.probe:
        config, variant, batch, budget = args.probe
        fits = probe_fits(json.loads(config), variant, int(batch), int(budget))
        sys.exit(0 if fits else OUT_OF_MEMORY)
    configs = [c for c in (QUICK if args.quick else FULL) if args.only in " ".join(map(str, c))]
    allocator = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"
    print(
        f"# {datetime.date.today()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {allocator}; "
        f"each variant in processes of its own; largest batch within {args.budget_mb} MB of "
        "address space over the warm process; ratios are the variant's over torch's"
    )
    with_largest_batch = not args.no_largest_batch
    columns = ["model", "batch", "px", "layout", "dtype", "torch saved MB", "convert", "fused",
               "in place", "torch step peak MB", "convert", "fused", "in place"]  # fmt: skip
    if with_largest_batch:
        columns += ["torch largest batch", "convert", "fused", "in place"]
    columns += ["in-place saved: floor", "exact"]
    print(" | ".join(columns))
    rows = []
    for config in configs:
        row = run_row(config, args.budget_mb, with_largest_batch)
        rows.append(row)
        cells = [str(row[key]) for key in ("model", "batch", "px", "layout", "dtype")]
        for key in ("saved_mb", "peak_mb") + (("largest_batch",) if with_largest_batch else ()):
            cells.append(str(row[f"torch_{key}"]))
            cells += [_ratio(row, variant, key) for variant in VARIANTS[1:]]
        cells += [_ratio(row, f"in_place_{bound}", "saved_mb") for bound in ("floor", "exact")]
        print(" | ".join(cells), flush=True)
    write_csv(rows, args.out_dir / "memory.csv")


if __name__ == "__main__":
    main()
