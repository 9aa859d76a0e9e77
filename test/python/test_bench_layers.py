"""scripts/bench --layers (benchmarks/layers.py) runs and reports what it says: one row per
layer shape of the model, layout and mode, and each model's batch-norm time per step as the sum
of its layers' times weighted by how often the model calls them. Timings are not asserted."""

import csv
import os
import re
import subprocess
import sys

import torch
import torchvision
from conftest import ROOT


def batch_norm_inputs(model, x):
    shapes = []
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.register_forward_hook(lambda m, i, o: shapes.append(tuple(i[0].shape)))
    with torch.no_grad():
        model.eval()(x)
    return shapes


def test_quick_layer_benchmark_covers_resnet18_and_sums_its_layers(tmp_path):
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'python'}:{ROOT / 'benchmarks'}")
    script = ROOT / "benchmarks" / "layers.py"
    out = subprocess.run(
        [sys.executable, str(script), "--quick", "--no-tcmalloc", "--repeats", "1",
         "--out-dir", str(tmp_path)],
        env=env, check=True, capture_output=True, text=True, timeout=600,
    ).stdout  # fmt: skip

    calls = batch_norm_inputs(torchvision.models.resnet18(), torch.randn(8, 3, 112, 112))
    shapes = {"x".join(map(str, s)) for s in calls}
    with open(tmp_path / "layers.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["shape"] for r in rows} == shapes
    assert len(rows) == len(shapes) * 2 * 2  # layouts x (training, eval)
    assert all(float(r["ours_ms"]) > 0 and float(r["torch_ms"]) > 0 for r in rows)

    # The per-step sum: each distinct shape's time times its number of calls in one forward.
    for layout in ("NCHW", "NHWC"):
        for mode in ("train_fwd_bwd", "eval_fwd"):
            ms = {
                r["shape"]: (float(r["torch_ms"]), float(r["ours_ms"]))
                for r in rows
                if (r["layout"], r["mode"]) == (layout, mode)
            }
            torch_ms = sum(ms["x".join(map(str, s))][0] for s in calls)
            ours_ms = sum(ms["x".join(map(str, s))][1] for s in calls)
            line = re.search(rf"^resnet18 +{layout} +float32 +{mode} +(\S+) / +(\S+) ms", out, re.M)
            assert line, out
            assert abs(float(line[1]) - torch_ms) < 0.01 and abs(float(line[2]) - ours_ms) < 0.01
