import json
import os
import pathlib
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[2]
# The in-tree package (tests of python/custom_bn; spawned workers inherit the path).
sys.path.insert(0, str(ROOT / "python"))


def library_path() -> str:
    return os.environ.get("CUSTOM_BN_LIBRARY", str(ROOT / "build" / "libcustom_bn.so"))


def cpu_plan(
    x: torch.Tensor, op: str = "batch_norm_forward", training: bool = True, residual: bool = False
) -> dict:
    """What the CPU kernels decide for a call of `op` on x (csrc/cpu/plan.h), as the library
    itself reports it through its debug op."""
    return json.loads(torch.ops.custom_bn._cpu_plan(x, op, training, residual))


def cache_bytes(level: int = 3) -> int:
    """The cache size the CPU kernels plan with."""
    return cpu_plan(torch.empty(1, 1))[f"l{level}_bytes"]


def goes_channel_at_a_time(x: torch.Tensor, op: str) -> bool:
    """Whether a CPU training call of `op` on x goes a channel at a time."""
    return cpu_plan(x, op)["channel_at_a_time"]


# Tests of layers larger than the last-level cache size them by the cache the plan assumes: a
# 32 MB one keeps them small on machines with a larger cache (csrc/cpu/plan.h). Spawned
# processes inherit it.
os.environ.setdefault("CUSTOM_BN_CACHE_BYTES_L3", str(32 << 20))

# The ops come from the shared library alone: no Python code of ours is involved.
torch.ops.load_library(library_path())


@pytest.fixture(autouse=True)
def fresh_seed(request):
    """A different seed per test and per run, printed on failure for reproduction."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


def pytest_runtest_makereport(item, call):
    if call.excinfo is not None:
        for name, value in item.user_properties:
            if name == "seed":
                item.add_report_section(call.when, "seed", f"torch.manual_seed({value})")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
