import ctypes
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


def cache_bytes(level: int = 3) -> int:
    """The cache size the CPU kernels plan with (csrc/cpu/kernels.h, cache_bytes)."""
    f = ctypes.CDLL(library_path()).custom_bn_cache_bytes
    f.restype = ctypes.c_int64
    return f(level)


def fits_by_channel(x: torch.Tensor, inputs: int) -> bool:
    """Whether a CPU pass over channels-first x reading `inputs` such tensors goes a channel
    at a time (csrc/cpu/kernels.h, fits_by_channel)."""
    f = ctypes.CDLL(library_path()).custom_bn_fits_by_channel
    f.restype = ctypes.c_bool
    f.argtypes = [ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int64]
    return f(x.size(0), x.size(1), x.numel() // (x.size(0) * x.size(1)), inputs, x.element_size())


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
