"""Times custom_bn against torch's eager batch norm and torch.compile of F.batch_norm, on
the shapes that matter, interleaved in one run; prints a table of medians and ratios, with
achieved GB/s against a copy bandwidth measured in the same run; writes CSV and a PNG."""

import argparse
import csv
import datetime
import gc
import itertools
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import custom_bn  # noqa: F401  (loads the ops)
import torch
import torch.nn.functional as F

# One compiled F.batch_norm per configuration: more than dynamo's default limit.
torch._dynamo.config.recompile_limit = 1000
torch._dynamo.config.cache_size_limit = 1000

ops = torch.ops.custom_bn

RESNET = [(64, 56), (256, 56), (512, 28), (1024, 14), (2048, 7)]
FULL_SHAPES = [((32, c, s, s), layout) for c, s in RESNET for layout in ("NCHW", "NHWC")]
FULL_SHAPES += [((4096, 1024), "NC"), ((4, 64, 16, 56, 56), "NCDHW")]
QUICK_SHAPES = [((32, 256, 56, 56), "NCHW"), ((32, 256, 56, 56), "NHWC"), ((4096, 1024), "NC")]
MODES = ("train_fwd", "train_fwd_bwd", "eval_fwd")
# The fused op, batch_norm_relu, against torch's batch norm then ReLU (with and without a
# residual added before it) and then SiLU (a smooth activation: EfficientNet's), in the mode
# the fusion is for: a training step.
FUSED_KINDS = ("bn_relu", "bn_add_relu", "bn_silu")
FUSED_MODES = ("train_fwd_bwd",)
FUSED_SHAPES = [((32, c, s, s), layout) for c, s in RESNET for layout in ("NCHW", "NHWC")]
QUICK_FUSED_SHAPES = [((32, 256, 56, 56), "NCHW")]

# Passes over memory each mode makes in custom_bn, in tensors of the input's size:
# train forward reads x once for the statistics (two passes per cached item) and once more
# to write y; the backward reads (dy, x) to reduce and (dy, x) to write dx. Eval reads x and
# writes y.
TRAFFIC = {"train_fwd": 3, "train_fwd_bwd": 3 + 2 + 3, "eval_fwd": 2}
# batch_norm_relu: the forward reads x for the statistics, then x (and the residual) to
# write z; the backward reads (dz, z, x) and writes the masked gradient (which is the
# residual's gradient), then reads (it, x) and writes dx.
# bn_silu's backward reads (dy, x) and writes dz (the gradient taken at the pre-activation,
# recomputed from x), then reads (dz, x) and writes dx.
FUSED_TRAFFIC = {"bn_relu": 3 + 4 + 3, "bn_add_relu": 4 + 4 + 3, "bn_silu": 3 + 3 + 3}
# Channels-first training on inputs larger than the last-level cache, whose channels fit in L2,
# goes a channel at a time (CpuPlan::channel_at_a_time in csrc/cpu/plan.h): each pass's inputs
# are read once from memory. Forward: x, then y written; backward: (dy, x) [or (dy, z, x)], dx
# written.
# The fused op keeps to the passes above when it has a residual.


def goes_channel_at_a_time(x, op):
    """Whether a CPU training call of `op` on x goes a channel at a time: the library's own
    plan (csrc/cpu/plan.h), asked through its debug op."""
    if x.device.type != "cpu":
        return False
    plan = json.loads(torch.ops.custom_bn._cpu_plan(x, op, True, False))
    return plan["channel_at_a_time"]


def passes_over_memory(x, kind, mode):
    """Tensors of x's size each configuration moves through memory in custom_bn."""
    if kind == "bn_add_relu" or mode == "eval_fwd":
        return FUSED_TRAFFIC[kind] if kind != "bn" else TRAFFIC[mode]
    forward = 2 if goes_channel_at_a_time(x, "batch_norm_forward") else 3
    if kind == "bn_relu":
        return forward + (4 if goes_channel_at_a_time(x, "batch_norm_relu_backward") else 7)
    if kind == "bn_silu":
        forward = 2 if goes_channel_at_a_time(x, "batch_norm_relu_forward") else 3
        return forward + 6
    backward = 3 if goes_channel_at_a_time(x, "batch_norm_backward") else 5
    return forward + (0 if mode == "train_fwd" else backward)


def make_input(shape, layout, dtype, device):
    x = torch.randn(shape, dtype=torch.float32, device=device).to(dtype)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


COPY_SOURCE = None


def copy_bandwidth(repeats):
    """GB/s of a large out-of-place CPU copy (read + write), the memory roof for the CPU
    kernels (CUDA rows report GB/s against it too; compare them with the device's own).
    Measured again before every row: this machine's bandwidth drifts by 1.5x within a run."""
    global COPY_SOURCE
    if COPY_SOURCE is None:
        COPY_SOURCE = torch.randn(64 * 1024 * 1024)  # 256 MB
    src = COPY_SOURCE
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def callables(x, mode):
    """(name -> zero-argument function) for one configuration, with fresh state."""
    channels = x.shape[1]
    training = mode != "eval_fwd"
    backward = mode == "train_fwd_bwd"
    w = torch.rand(channels, requires_grad=backward, device=x.device)
    b = torch.randn(channels, requires_grad=backward, device=x.device)
    rm, rv = torch.zeros(channels, device=x.device), torch.ones(channels, device=x.device)
    xg = x.detach().requires_grad_(backward)
    grad = torch.randn_like(x)

    def wrap(forward):
        # autograd.grad: the gradients themselves, without accumulating them into the
        # leaves' .grad (an extra elementwise pass that a layer inside a network never pays).
        run = (
            forward if not backward else (lambda: torch.autograd.grad(forward(), (xg, w, b), grad))
        )
        if x.device.type != "cuda":
            return run
        return lambda: (run(), torch.cuda.synchronize())  # time the work, not the launch

    compiled = torch.compile(
        lambda x, w, b, rm, rv: F.batch_norm(x, rm, rv, w, b, training), dynamic=False
    )
    fns = {
        "custom_bn": wrap(lambda: ops.batch_norm(xg, w, b, rm, rv, training, 0.1, 1e-5)),
        # torch's native kernels (cudnn_enabled=False); on CUDA also torch with cuDNN.
        "torch": wrap(lambda: torch.batch_norm(xg, w, b, rm, rv, training, 0.1, 1e-5, False)),
        "compile": wrap(lambda: compiled(xg, w, b, rm, rv)),
    }
    if x.device.type == "cuda":
        fns["torch_cudnn"] = wrap(
            lambda: torch.batch_norm(xg, w, b, rm, rv, training, 0.1, 1e-5, True)
        )
    return fns


def fused_callables(x, kind):
    """The training step of relu(batch_norm(x) [+ residual]) or silu(batch_norm(x)): ours
    fused, torch eager, and torch.compile of the same composition."""
    channels = x.shape[1]
    w = torch.rand(channels, requires_grad=True, device=x.device)
    b = torch.randn(channels, requires_grad=True, device=x.device)
    rm, rv = torch.zeros(channels, device=x.device), torch.ones(channels, device=x.device)
    xg = x.detach().requires_grad_()
    residual = torch.randn_like(x).requires_grad_() if kind == "bn_add_relu" else None
    grad = torch.randn_like(x)

    activation = F.silu if kind == "bn_silu" else F.relu
    arguments = (0.0, None, 0.0, "silu") if kind == "bn_silu" else ()

    def reference(x, w, b, rm, rv, residual, cudnn=False):
        y = torch.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, cudnn)
        return activation(y + residual if residual is not None else y)

    compiled = torch.compile(reference, dynamic=False)

    inputs = (xg, w, b) + ((residual,) if residual is not None else ())

    def step(forward):
        def run():
            torch.autograd.grad(forward(), inputs, grad)
            if x.device.type == "cuda":
                torch.cuda.synchronize()

        return run

    fns = {
        "custom_bn": step(
            lambda: ops.batch_norm_relu(
                xg, w, b, rm, rv, True, 0.1, 1e-5, None, residual, *arguments
            )
        ),
        "torch": step(lambda: reference(xg, w, b, rm, rv, residual)),
        "compile": step(lambda: compiled(xg, w, b, rm, rv, residual)),
    }
    if x.device.type == "cuda":
        fns["torch_cudnn"] = step(lambda: reference(xg, w, b, rm, rv, residual, cudnn=True))
    return fns


def measure(fns, repeats, seconds_per_row, warmup=3):
    """Median seconds per call of each function, timed interleaved (each round in another
    order): at least `repeats` rounds, more for fast calls so that each row runs for about
    seconds_per_row (sub-millisecond calls are the noisiest)."""
    start = time.perf_counter()
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    per_round = (time.perf_counter() - start) / warmup
    rounds = max(repeats, min(1000, int(seconds_per_row / max(per_round, 1e-9))))
    times = {name: [] for name in fns}
    # As timeit does: no cyclic garbage collection inside the timed calls (a collection costs
    # as much as a small row, and lands on whichever call happens to trigger it).
    gc.collect()
    gc.disable()
    # Rounds cycle through every order of the functions: a call inherits the cache the call
    # before it left (dirty lines to write back, evicted inputs), so each function follows
    # each other one equally often.
    orders = list(itertools.permutations(fns.items()))
    try:
        for round_index in range(rounds):
            for name, fn in orders[round_index % len(orders)]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return {name: statistics.median(t) for name, t in times.items()}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['device']} {r['op']} {r['shape']} {r['layout']} {r['dtype']} {r['mode']}" for r in rows
    ]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["vs_torch"] for r in rows], 0.4, label="vs torch eager")
    ax.barh([y - 0.2 for y in ys], [r["vs_compile"] for r in rows], 0.4, label="vs torch.compile")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of custom_bn (time of other / time of ours)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


def under_tcmalloc(argv, script=__file__):
    """Ours and torch again, in a child process of `script` whose allocator is tcmalloc
    (LD_PRELOAD of Debian's libtcmalloc-minimal4): (ours ms, torch ms) per row, in the rows'
    order, or None without it. The child interleaves the two as this process does, so their
    ratio differs from the main one only by the allocator: what is left of the lead is the
    kernels'. (Timing torch alone there, as this column did until 2026-12-05, also gave it a
    cache that no other call evicted: `32x2048x7x7` eval, 25.6 MB with its output, then fits
    in a 32 MB L3.)"""
    if not os.path.exists(TCMALLOC):
        print(f"no {TCMALLOC} (Debian's libtcmalloc-minimal4): no tcmalloc column")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "tcmalloc.json"
        env = dict(os.environ, LD_PRELOAD=TCMALLOC)
        subprocess.run([sys.executable, script, *argv, "--tcmalloc-child", str(out)], env=env,
                       check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        return json.loads(out.read_text())


def add_timing_arguments(parser, quick_help):
    """The options this benchmark and benchmarks/layers.py share, the tcmalloc child's included."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("build/bench"))
    parser.add_argument("--no-tcmalloc", action="store_true", help="skip the tcmalloc column")
    parser.add_argument("--tcmalloc-child", type=pathlib.Path, help=argparse.SUPPRESS)


def child_argv(args):
    """The shared options a tcmalloc child is given again."""
    return (["--quick"] if args.quick else []) + (
        ["--repeats", str(args.repeats)] if args.repeats else []
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    add_timing_arguments(parser, "a one-minute subset")
    parser.add_argument(
        "--devices", nargs="+", choices=("cpu", "cuda"), help="default: cpu, and cuda if present"
    )
    args = parser.parse_args()
    tcmalloc_ms = None
    if not args.tcmalloc_child and not args.no_tcmalloc:
        argv = child_argv(args)
        argv += ["--devices", *args.devices] if args.devices else []
        tcmalloc_ms = under_tcmalloc(argv)
    repeats = args.repeats or (7 if args.quick else 15)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    args.out_dir.mkdir(parents=True, exist_ok=True)

    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()})"
    )
    print(f"custom_bn benchmark, {datetime.date.today()}, {machine}")
    print("% copy: of a 256 MB copy (read + write) timed just before the row")
    if tcmalloc_ms is not None:
        print("vs tcm: torch's time over ours with both under tcmalloc, interleaved in a child")
    header = (
        f"{'device':6s} {'op':11s} {'shape':22s} {'layout':6s} {'dtype':8s} {'mode':14s} "
        f"{'ours ms':>8s} {'torch ms':>8s} {'compile':>8s} {'vs torch':>8s} {'vs comp':>8s} "
        f"{'GB/s':>6s} {'% copy':>6s}" + (f" {'vs tcm':>8s}" if tcmalloc_ms is not None else "")
    )
    print(header)
    rows = []
    devices = args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    fused_shapes = QUICK_FUSED_SHAPES if args.quick else FUSED_SHAPES
    configs = [
        (d, shape, layout, "bn", mode)
        for d in devices
        for shape, layout in shapes
        for mode in MODES
    ]
    configs += [
        (d, shape, layout, kind, mode)
        for d in devices
        for shape, layout in fused_shapes
        for kind in FUSED_KINDS
        for mode in FUSED_MODES
    ]
    for device, shape, layout, kind, mode in configs:
        for dtype in (torch.float32, torch.bfloat16):
            x = make_input(shape, layout, dtype, device)
            fns = callables(x, mode) if kind == "bn" else fused_callables(x, kind)
            if args.tcmalloc_child:
                pair = {name: fns[name] for name in ("custom_bn", "torch")}
                seconds = measure(pair, repeats, 0.3 if args.quick else 1.0)
                rows.append([1e3 * seconds["custom_bn"], 1e3 * seconds["torch"]])
                continue
            bandwidth = copy_bandwidth(5)
            seconds = measure(fns, repeats, 0.3 if args.quick else 1.0)
            passes = passes_over_memory(x, kind, mode)
            gbs = passes * x.numel() * x.element_size() / seconds["custom_bn"] / 1e9
            row = {
                "device": device,
                "op": kind,
                "shape": "x".join(map(str, shape)),
                "layout": layout,
                "dtype": str(dtype).replace("torch.", ""),
                "mode": mode,
                "ours_ms": 1e3 * seconds["custom_bn"],
                "torch_ms": 1e3 * seconds["torch"],
                "compile_ms": 1e3 * seconds["compile"],
                "vs_torch": seconds["torch"] / seconds["custom_bn"],
                "vs_compile": seconds["compile"] / seconds["custom_bn"],
                "gb_per_s": gbs,
                "copy_gb_per_s": bandwidth,
                "copy_fraction": gbs / bandwidth,
            }
            if "torch_cudnn" in seconds:
                row["torch_cudnn_ms"] = 1e3 * seconds["torch_cudnn"]
                row["vs_torch_cudnn"] = seconds["torch_cudnn"] / seconds["custom_bn"]
            if tcmalloc_ms is not None:
                row["ours_tcmalloc_ms"], row["torch_tcmalloc_ms"] = tcmalloc_ms[len(rows)]
                row["vs_torch_tcmalloc"] = row["torch_tcmalloc_ms"] / row["ours_tcmalloc_ms"]
            rows.append(row)
            print(
                f"{device:6s} {kind:11s} {row['shape']:22s} {layout:6s} {row['dtype']:8s} "
                f"{mode:14s} {row['ours_ms']:8.2f} {row['torch_ms']:8.2f} "
                f"{row['compile_ms']:8.2f} {row['vs_torch']:7.2f}x {row['vs_compile']:7.2f}x "
                f"{gbs:6.1f} {100 * row['copy_fraction']:5.0f}%"
                + (f" {row['vs_torch_tcmalloc']:7.2f}x" if tcmalloc_ms is not None else "")
                + (f" cuDNN {row['vs_torch_cudnn']:.2f}x" if "vs_torch_cudnn" in row else ""),
                flush=True,
            )
    if args.tcmalloc_child:
        args.tcmalloc_child.write_text(json.dumps(rows))
        return
    for name, selected in (
        ("batch_norm", [r for r in rows if r["op"] == "bn"]),
        ("batch_norm_relu", [r for r in rows if r["op"] != "bn"]),
    ):
        if not selected:
            continue
        keys = ("vs_torch", "vs_compile") + (("vs_torch_tcmalloc",) if tcmalloc_ms else ())
        geo = {k: math.exp(statistics.mean(math.log(r[k]) for r in selected)) for k in keys}
        print(
            f"{name}: geometric mean {geo['vs_torch']:.2f}x vs torch eager, "
            f"{geo['vs_compile']:.2f}x vs torch.compile"
            + (
                f", {geo['vs_torch_tcmalloc']:.2f}x vs torch eager with both under tcmalloc"
                if tcmalloc_ms
                else ""
            )
            + f"; slowest row vs torch {min(r['vs_torch'] for r in selected):.2f}x"
            + f" ({len(selected)} rows)"
        )

    copies = [r["copy_gb_per_s"] for r in rows]
    print(
        f"copy bandwidth: median {statistics.median(copies):.1f} GB/s, "
        f"{min(copies):.1f} to {max(copies):.1f} over the rows"
    )
    with open(args.out_dir / "batch_norm.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))  # CUDA rows add cuDNN's
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out_dir / "batch_norm.png")
    print(f"wrote {args.out_dir / 'batch_norm.csv'} and {args.out_dir / 'batch_norm.png'}")


if __name__ == "__main__":
    main()
