"""Whole-model timings: a torchvision model with torch's BatchNorm, the same model after
custom_bn.convert_batchnorm, after fuse_batchnorm_relu as well, after
fuse_batchnorm_relu(inplace=True) (in-place activated batch norm; eager rows: under
torch.compile inductor compiles it as the fused form), and with every BatchNorm replaced by
Identity (the ceiling: what removing batch norm entirely would give). The variants
run interleaved in one process, or with --process-per-variant each in processes of its own;
prints the ratio to torch and the share of the possible gain captured,
(t_torch - t_ours) / (t_torch - t_ceiling), with batch norm's share of a torch step from
torch.profiler; writes CSV and a PNG."""

import argparse
import contextlib
import csv
import datetime
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys

import custom_bn
import torch
import torch._inductor.config
import torch.nn.functional as F
import torchvision
from batch_norm import measure

VARIANTS = ("torch", "convert", "fused", "inplace", "ceiling")


def variants_of(mode: str) -> tuple[str, ...]:
    """The variants a row times: inductor compiles the in-place form as the fused one (its
    decomposition keeps every input value), so compiled rows leave it out."""
    return VARIANTS if mode == "eager" else tuple(v for v in VARIANTS if v != "inplace")


# (model, batch, pixels, layout, dtype, step, mode): the rows a 2-core machine trains in a few
# minutes. bfloat16 is autocast's; compile is torch.compile of the whole model (or step).
FULL = [
    (model, batch, px, layout, "float32", step, "eager")
    for model in ("resnet18", "resnet50", "mobilenet_v2")
    for batch, px in ((8, 112), (32, 112), (8, 224))
    for layout in ("NCHW", "NHWC")
    for step in ("train", "infer")
]
FULL += [
    (model, 8, 112, layout, "bfloat16", step, "eager")
    for model in ("resnet18", "resnet50", "mobilenet_v2")
    for layout in ("NCHW", "NHWC")
    for step in ("train", "infer")
]
# EfficientNet: its batch norms are followed by SiLU, the fused op's smooth activation.
FULL += [
    ("efficientnet_b0", 8, 112, layout, "float32", step, "eager")
    for layout in ("NCHW", "NHWC")
    for step in ("train", "infer")
]
FULL += [
    (model, 8, 112, "NHWC", "float32", step, "compile")
    for model in ("resnet18", "resnet50", "mobilenet_v2")
    for step in ("train", "infer")
]
QUICK = [
    ("resnet18", 8, 112, layout, "float32", step, "eager")
    for layout in ("NCHW", "NHWC")
    for step in ("train", "infer")
] + [("resnet50", 8, 112, "NHWC", "float32", "train", "eager")]


def _without_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            _without_batchnorm(child)
    return module


def build(name: str, variant: str, layout: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=100)
    if variant == "convert":
        model = custom_bn.convert_batchnorm(model)
    elif variant == "fused":
        model = custom_bn.fuse_batchnorm_relu(custom_bn.convert_batchnorm(model))
    elif variant == "inplace":
        model = custom_bn.fuse_batchnorm_relu(custom_bn.convert_batchnorm(model), inplace=True)
    elif variant == "ceiling":
        model = _without_batchnorm(model)
    if layout == "NHWC":
        model = model.to(memory_format=torch.channels_last)
    return model


def make_step(model, x, target, dtype: str, step: str, mode: str):
    """One training step (forward, loss, backward, SGD step) or one inference forward."""
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if dtype == "bfloat16"
        else contextlib.nullcontext()
    )
    if step == "infer":
        model.eval()
        forward = torch.compile(model) if mode == "compile" else model

        def infer():
            with torch.no_grad(), autocast:
                forward(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    forward = torch.compile(model) if mode == "compile" else model

    def train():
        with autocast:
            loss = F.cross_entropy(forward(x), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def batchnorm_share(fn) -> float:
    """Batch norm's share of one call of fn: the self CPU time of every batch-norm op
    (torch's or ours, forward and backward) over the step's total, from torch.profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    bn = sum(
        e.self_cpu_time_total
        for e in events
        if "batch_norm" in e.key or e.key.startswith("custom_bn::")
    )
    return bn / total if total else 0.0


def _steps(config, variants) -> dict:
    """The step function of each variant for one row, each called once (torch.compile
    compiles on that call, and measure() sizes its rounds by the warm-up's time, which would
    otherwise be the compile's)."""
    name, batch, px, layout, dtype, step, mode = config
    x = torch.randn(batch, 3, px, px)
    if layout == "NHWC":
        x = x.contiguous(memory_format=torch.channels_last)
    target = torch.randint(0, 100, (batch,))
    steps = {v: make_step(build(name, v, layout), x, target, dtype, step, mode) for v in variants}
    for fn in steps.values():
        fn()
    return steps


def _time_interleaved(config, repeats: int, seconds: float):
    """All variants in this process, their steps interleaved: ms per step, batch norm's
    shares."""
    variants = variants_of(config[-1])
    steps = _steps(config, variants)
    if config[-1] == "compile":
        # The compiled variants differ by less than the convolutions vary between steps: at
        # least one full cycle of the orders measure() rotates through, so that each variant
        # follows each other equally often (a few rounds of a slow step would not).
        repeats = max(repeats, math.factorial(len(variants)))
    seconds_per_call = measure(steps, repeats, seconds, warmup=2)
    eager = config[-1] == "eager"
    shares = {v: batchnorm_share(steps[v]) for v in ("torch", "convert")} if eager else {}
    return {v: seconds_per_call[v] * 1e3 for v in variants}, shares


def _time_alone(config, variant: str, repeats: int, seconds: float) -> dict:
    """One variant, the only model in this process (the child of _time_in_own_processes)."""
    steps = _steps(config, (variant,))
    ms = measure(steps, repeats, seconds, warmup=2)[variant] * 1e3
    share = batchnorm_share(steps[variant]) if config[-1] == "eager" else None
    return {"ms": ms, "bn_share": share}


def _time_in_own_processes(config, repeats: int, seconds: float, rounds: int):
    """Each variant timed in a process of its own, as a user runs one model: the allocator's
    state then comes from that model alone (in one process, the variants' frees and
    allocations change what glibc hands the others). `rounds` processes per variant, in
    rotated orders; the median of their medians."""
    variants = variants_of(config[-1])
    times = {v: [] for v in variants}
    shares = {}
    for round_index in range(rounds):
        shift = round_index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            command = [sys.executable, __file__, "--time-alone", json.dumps(config), variant,
                       "--repeats", str(repeats), "--seconds-per-row", str(seconds)]  # fmt: skip
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            times[variant].append(result["ms"])
            shares.setdefault(variant, result["bn_share"])
    return {v: statistics.median(ms) for v, ms in times.items()}, shares


def run_row(config, repeats: int, seconds: float, process_rounds: int = 0) -> dict:
    """One row: interleaved in this process, or with process_rounds > 0 a process per
    variant and round."""
    name, batch, px, layout, dtype, step, mode = config
    if process_rounds > 0:
        t, shares = _time_in_own_processes(config, repeats, seconds, process_rounds)
    else:
        t, shares = _time_interleaved(config, repeats, seconds)
    gain = t["torch"] - t["ceiling"]
    row = dict(
        model=name, batch=batch, px=px, layout=layout, dtype=dtype, step=step, mode=mode,
        **{f"{v}_ms": round(t[v], 2) for v in t},
        convert_vs_torch=round(t["torch"] / t["convert"], 3),
        fused_vs_torch=round(t["torch"] / t["fused"], 3),
        ceiling_vs_torch=round(t["torch"] / t["ceiling"], 3),
        convert_captured=round((t["torch"] - t["convert"]) / gain, 3) if gain > 0 else float("nan"),
        fused_captured=round((t["torch"] - t["fused"]) / gain, 3) if gain > 0 else float("nan"),
        timing="process per variant" if process_rounds > 0 else "interleaved",
    )  # fmt: skip
    if "inplace" in t:
        row["inplace_vs_torch"] = round(t["torch"] / t["inplace"], 3)
    if mode == "eager":
        row["bn_share_torch"] = round(shares["torch"], 3)
        row["bn_share_convert"] = round(shares["convert"], 3)
    return row


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        f"{r['model']} b{r['batch']} {r['px']}px {r['layout']} {r['dtype']} {r['step']} {r['mode']}"
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(10, 0.36 * len(rows) + 1.5))
    ys = range(len(rows))
    for offset, key, label in (
        (-0.27, "convert_vs_torch", "convert_batchnorm"),
        (0.0, "fused_vs_torch", "+ fuse_batchnorm_relu"),
        (0.27, "ceiling_vs_torch", "no batch norm (ceiling)"),
    ):
        ax.barh([y + offset for y in ys], [r[key] for r in rows], 0.27, label=label)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of the step over torch's BatchNorm (time of torch / time of variant)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few-minute subset")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seconds-per-row", type=float, default=8.0)
    parser.add_argument("--only", default="", help="run the rows whose label contains this")
    parser.add_argument("--out-dir", type=pathlib.Path, default=pathlib.Path("build/bench"))
    parser.add_argument(
        "--process-per-variant", type=int, default=0, metavar="ROUNDS",
        help="time each variant in a process of its own, ROUNDS processes per variant, as a "
        "user runs one model (default 0: all interleaved in this process)",
    )  # fmt: skip
    parser.add_argument("--time-alone", nargs=2, help=argparse.SUPPRESS)  # (config, variant)
    args = parser.parse_args()
    torch.set_flush_denormal(True)  # the model without BN must not slow down on denormals
    torch._dynamo.config.recompile_limit = 64
    # Compile afresh: torch's compile caches are not keyed on our ops' decompositions, so a
    # cache written with an earlier custom_bn would time that version's code.
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    if args.time_alone:
        config, variant = json.loads(args.time_alone[0]), args.time_alone[1]
        print(json.dumps(_time_alone(config, variant, args.repeats, args.seconds_per_row)))
        return
    configs = [c for c in (QUICK if args.quick else FULL) if args.only in " ".join(map(str, c))]
    allocator = "tcmalloc" if "tcmalloc" in os.environ.get("LD_PRELOAD", "") else "glibc malloc"
    print(
        f"# {datetime.date.today()} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {allocator}; "
        "times in ms per step, ratios are torch's time over the variant's; "
        + (
            f"each variant in a process of its own, {args.process_per_variant} per variant"
            if args.process_per_variant
            else "the variants interleaved in one process"
        )
    )
    columns = ("model", "batch", "px", "layout", "dtype", "step", "mode", "torch ms", "convert",
               "fused", "in place", "ceiling", "captured (convert/fused)",
               "BN share (torch/ours)")  # fmt: skip
    print(" | ".join(columns))
    rows = []
    for config in configs:
        r = run_row(config, args.repeats, args.seconds_per_row, args.process_per_variant)
        rows.append(r)
        share = "-"
        if "bn_share_torch" in r:
            share = f"{r['bn_share_torch']:.0%}/{r['bn_share_convert']:.0%}"
        cells = [str(r[key]) for key in ("model", "batch", "px", "layout", "dtype", "step", "mode")]
        inplace = f"{r['inplace_vs_torch']:.2f}x" if "inplace_vs_torch" in r else "-"
        cells += [f"{r['torch_ms']:.1f}", f"{r['convert_vs_torch']:.2f}x",
                  f"{r['fused_vs_torch']:.2f}x", inplace, f"{r['ceiling_vs_torch']:.2f}x",
                  f"{r['convert_captured']:.0%} / {r['fused_captured']:.0%}", share]  # fmt: skip
        print(" | ".join(cells), flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "models.csv", "w", newline="") as f:
        fields = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, args.out_dir / "models.png")
    print(f"wrote {args.out_dir / 'models.csv'} and {args.out_dir / 'models.png'}")


if __name__ == "__main__":
    main()
