"""Large CPU results: CUSTOM_BN_RESULT_CACHE_MB, the cache of freed large results
(csrc/cpu/result_cache.h): results stay right with the cache off, the plan puts large results
in the cache only while it is on, and a malformed setting is a clear error."""

import os
import subprocess
import sys

import custom_bn
import pytest
import torch
from conftest import ROOT, cpu_plan

# Batch norm of a 16 MB input (above the 8 MB the cache starts at), twice, against torch.
SCRIPT = """
import json, torch, custom_bn
print(json.loads(torch.ops.custom_bn._cpu_plan(torch.empty(8, 32, 128, 128), "batch_norm_forward"))
      ["in_result_cache"])
for _ in range(2):
    x = torch.randn(8, 32, 128, 128)
    w, b = torch.rand(32), torch.randn(32)
    out = torch.ops.custom_bn.batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(out, torch.batch_norm(x, w, b, None, None, True, 0.1, 1e-5, False))
print("ok")
"""


def run_with(cache_mb):
    env = dict(
        os.environ,
        CUSTOM_BN_RESULT_CACHE_MB=cache_mb,
        PYTHONPATH=str(ROOT / "python"),
        CUSTOM_BN_LIBRARY=custom_bn.library_path(),
    )
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("cache_mb,in_cache", [("0", "False"), ("64", "True")])
def test_results_are_right_with_the_cache_on_and_off(cache_mb, in_cache):
    result = run_with(cache_mb)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == [in_cache, "ok"]


def test_small_results_come_from_torchs_allocator():
    plan = cpu_plan(torch.empty(8, 32, 16, 16))
    assert plan["in_result_cache"] is False


def test_malformed_cache_size_names_the_variable():
    result = run_with("lots")
    assert result.returncode != 0
    assert "CUSTOM_BN_RESULT_CACHE_MB must be a number of megabytes, got 'lots'" in result.stderr
