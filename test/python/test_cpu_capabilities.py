"""Every CPU kernel variant, not only the widest this CPU runs: the variant asked for with
CUSTOM_BN_CPU_CAPABILITY is the one running, and the suites whose paths depend on the vector
width pass in a process on the baseline (SSE2) and AVX2 kernels."""

import os
import pathlib
import subprocess
import sys

import custom_bn
import pytest
import torch
from conftest import ROOT, cpu_plan

HERE = pathlib.Path(__file__).parent


def cpu_flags() -> set:
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


SUPPORTED = {
    "default": True,
    "avx2": {"avx2", "fma", "f16c"} <= cpu_flags(),
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= cpu_flags(),
}


def environment(capability):
    return dict(
        os.environ,
        CUSTOM_BN_CPU_CAPABILITY=capability,
        PYTHONPATH=str(ROOT / "python"),
        CUSTOM_BN_LIBRARY=custom_bn.library_path(),
    )


def capability_in_subprocess(capability) -> str:
    script = (
        "import json, torch, custom_bn\n"
        "plan = torch.ops.custom_bn._cpu_plan(torch.empty(2, 3), 'batch_norm_forward')\n"
        "print(json.loads(plan)['capability'])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=environment(capability),
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip()


def test_this_process_runs_the_widest_variant():
    widest = "avx512" if SUPPORTED["avx512"] else "avx2" if SUPPORTED["avx2"] else "default"
    expected = os.environ.get("CUSTOM_BN_CPU_CAPABILITY") or widest
    assert cpu_plan(torch.empty(2, 3))["capability"] == expected


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_variant_specific_suites_pass_on_variant(capability):
    """The suites whose paths depend on the vector width (the plan's walks and streaming, a
    channel at a time, the stage ops that share their kernels). The parity matrix itself runs
    once per variant: here on the widest, in GoogleTest on the baseline (the sanitizer run on
    AVX2; CMakeLists.txt)."""
    if not SUPPORTED[capability]:
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    assert capability_in_subprocess(capability) == capability
    suites = ("test_stage_ops.py", "test_cpu_plan.py", "test_channel_at_a_time.py")
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"]
    # Layers "larger than the cache" sized by an 8 MB one, a quarter of the main run's: the
    # same plans (a channel at a time, streaming) on a quarter of the data.
    env = {**environment(capability), "CUSTOM_BN_CACHE_BYTES_L3": str(8 << 20)}
    result = subprocess.run(
        [*command, *(str(HERE / suite) for suite in suites)],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


# The baseline runs the in-place loops one value at a time; AVX2 too, with the FMA kernels
# computing the training forward's output, which must stay bitwise the fused op's.
INPLACE_TESTS = {
    "default": "(matches_batch_norm_relu and float32) or keeps_only or memory_order or accurate"
    " or (many_chunks and float32)",
    "avx2": "many_chunks and float32",
}


@pytest.mark.parametrize("capability", list(INPLACE_TESTS))
def test_inplace_loops_pass_one_value_at_a_time(capability):
    """In-place batch norm's loops run 16 values at a time on the AVX-512 variant, one at a time
    on the others (csrc/cpu/inplace_loops.h), and its training forward computes the output with
    the variant's kernel: its float32 parity and kept-value tests there."""
    if not SUPPORTED[capability]:
        pytest.skip(f"this CPU cannot run the {capability} kernels")
    assert capability_in_subprocess(capability) == capability
    tests = INPLACE_TESTS[capability]
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
               str(HERE / "test_inplace.py"), "-k", tests]  # fmt: skip
    result = subprocess.run(
        command, env=environment(capability), capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_capability_is_matched_without_regard_to_case():
    if not SUPPORTED["avx2"]:
        pytest.skip("the CPU lacks AVX2")
    assert capability_in_subprocess("AVX2") == "avx2"


@pytest.mark.parametrize(
    "name, value, expected",
    [
        ("CUSTOM_BN_CPU_CAPABILITY", "avx3", "must be one of default, avx2, avx512, got 'avx3'"),
        ("CUSTOM_BN_HUGE_PAGES", "yes", "must be one of 0, 1, got 'yes'"),
        ("CUSTOM_BN_CACHE_BYTES_L3", "-5", "must be a number of bytes (at least 1), got '-5'"),
    ],
)
def test_unknown_setting_values_are_refused_by_name(name, value, expected):
    script = (
        "import torch, custom_bn\n"
        "try:\n"
        "    torch.ops.custom_bn.batch_norm(torch.randn(4, 3), None, None, None, None, True,"
        " 0.1, 1e-5)\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    env = dict(environment("default"), **{name: value})
    if name != "CUSTOM_BN_CPU_CAPABILITY":
        env.pop("CUSTOM_BN_CPU_CAPABILITY")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, check=True)  # fmt: skip
    assert f"{name} {expected}" in result.stdout
