"""Batch norm alone, at the shapes whole models give it: every distinct BatchNorm2d input of
torchvision's ResNet-18, ResNet-50 and MobileNetV2 at batch 8, 112 px, timed as the op
benchmark times a row (ours and torch eager, interleaved, warm), in training
(forward+backward) and eval, both layouts, float32 and bfloat16; a child process repeats the
pair under tcmalloc. Then each model's warm batch-norm time per step: the sum over its layers
of the layer's time times how often the model calls that shape. Writes CSV.

These are warm calls in a loop: inside a model each call also pays for the caches the
convolution before it evicted (docs/perf.md, "Inside a model"), which neither kernel controls."""

import argparse
import collections
import csv
import datetime
import json
import math
import platform
import statistics

import torch
import torchvision
from batch_norm import (
    TCMALLOC,
    add_timing_arguments,
    callables,
    child_argv,
    make_input,
    measure,
    under_tcmalloc,
)

MODELS = ("resnet18", "resnet50", "mobilenet_v2")
QUICK_MODELS = ("resnet18",)
MODES = ("train_fwd_bwd", "eval_fwd")
BATCH, PIXELS = 8, 112


def layer_shapes(model_name: str, batch: int = BATCH, pixels: int = PIXELS) -> collections.Counter:
    """How often one forward of the model calls batch norm on each input shape."""
    model = getattr(torchvision.models, model_name)()
    shapes = collections.Counter()

    def record(module, inputs, output):
        shapes[tuple(inputs[0].shape)] += 1

    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.register_forward_hook(record)
    with torch.no_grad():
        model.eval()(torch.randn(batch, 3, pixels, pixels))
    return shapes


def per_step(rows, counts, ms_key):
    """A model's batch-norm milliseconds per step: each layer's time times its count."""
    by_shape = {r["shape"]: r[ms_key] for r in rows}
    return sum(n * by_shape["x".join(map(str, shape))] for shape, n in counts.items())


def geometric_mean(values):
    values = list(values)
    return math.exp(statistics.mean(math.log(v) for v in values)) if values else float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    add_timing_arguments(parser, "ResNet-18's layers, float32")
    args = parser.parse_args()
    models = QUICK_MODELS if args.quick else MODELS
    dtypes = (torch.float32,) if args.quick else (torch.float32, torch.bfloat16)
    counts = {name: layer_shapes(name) for name in models}
    shapes = sorted({s for c in counts.values() for s in c}, key=lambda s: -math.prod(s))
    configs = [
        (shape, layout, dtype, mode)
        for shape in shapes
        for layout in ("NCHW", "NHWC")
        for dtype in dtypes
        for mode in MODES
    ]
    repeats = args.repeats or 7
    seconds_per_row = 0.3

    def time_pair(shape, layout, dtype, mode):
        fns = callables(make_input(shape, layout, dtype, "cpu"), mode)
        pair = {name: fns[name] for name in ("custom_bn", "torch")}
        seconds = measure(pair, repeats, seconds_per_row)
        return 1e3 * seconds["custom_bn"], 1e3 * seconds["torch"]

    if args.tcmalloc_child:
        args.tcmalloc_child.write_text(json.dumps([time_pair(*c) for c in configs]))
        return
    tcmalloc_ms = None
    if not args.no_tcmalloc:
        tcmalloc_ms = under_tcmalloc(child_argv(args), script=__file__)

    print(
        f"custom_bn at the layers of {', '.join(models)} (batch {BATCH}, {PIXELS} px), "
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}; warm calls, ratios are "
        "torch's time over ours" + (f"; tcm: both under {TCMALLOC}" if tcmalloc_ms else "")
    )
    header = f"{'shape':18s} {'layout':6s} {'dtype':8s} {'mode':13s} {'ours ms':>8s} "
    header += f"{'torch ms':>8s} {'vs torch':>8s}" + (f" {'vs tcm':>7s}" if tcmalloc_ms else "")
    print(header)
    rows = []
    for index, (shape, layout, dtype, mode) in enumerate(configs):
        ours, theirs = time_pair(shape, layout, dtype, mode)
        row = {
            "shape": "x".join(map(str, shape)),
            "layout": layout,
            "dtype": str(dtype).replace("torch.", ""),
            "mode": mode,
            "ours_ms": ours,
            "torch_ms": theirs,
            "vs_torch": theirs / ours,
        }
        if tcmalloc_ms:
            row["ours_tcmalloc_ms"], row["torch_tcmalloc_ms"] = tcmalloc_ms[index]
            row["vs_torch_tcmalloc"] = row["torch_tcmalloc_ms"] / row["ours_tcmalloc_ms"]
        rows.append(row)
        line = f"{row['shape']:18s} {layout:6s} {row['dtype']:8s} {mode:13s} {ours:8.3f} "
        line += f"{theirs:8.3f} {row['vs_torch']:7.2f}x"
        line += f" {row['vs_torch_tcmalloc']:6.2f}x" if tcmalloc_ms else ""
        print(line, flush=True)

    print("\nwarm batch-norm time per step (sum over the model's layers), torch / ours:")
    for name in models:
        for layout in ("NCHW", "NHWC"):
            for dtype in dtypes:
                for mode in MODES:
                    selected = [
                        r
                        for r in rows
                        if (r["layout"], r["mode"]) == (layout, mode)
                        and r["dtype"] == str(dtype).replace("torch.", "")
                    ]
                    theirs = per_step(selected, counts[name], "torch_ms")
                    ours = per_step(selected, counts[name], "ours_ms")
                    line = (f"{name:12s} {layout:6s} {selected[0]['dtype']:8s} {mode:13s} "
                            f"{theirs:7.2f} / {ours:6.2f} ms = {theirs / ours:.2f}x")  # fmt: skip
                    if tcmalloc_ms:
                        theirs_tc = per_step(selected, counts[name], "torch_tcmalloc_ms")
                        ours_tc = per_step(selected, counts[name], "ours_tcmalloc_ms")
                        line += f"; tcmalloc {theirs_tc / ours_tc:.2f}x"
                    print(line)
    for mode in MODES:
        selected = [r for r in rows if r["mode"] == mode]
        print(
            f"{mode}: geometric mean over {len(selected)} rows "
            f"{geometric_mean(r['vs_torch'] for r in selected):.2f}x"
            + (
                f", under tcmalloc {geometric_mean(r['vs_torch_tcmalloc'] for r in selected):.2f}x"
                if tcmalloc_ms
                else ""
            )
            + f"; slowest {min(r['vs_torch'] for r in selected):.2f}x"
        )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with open(args.out_dir / "layers.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out_dir / 'layers.csv'}")


if __name__ == "__main__":
    main()
