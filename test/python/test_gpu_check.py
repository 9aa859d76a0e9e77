"""scripts/gpu-check says plainly, and at once, when the machine has no NVIDIA GPU."""

import shutil
import subprocess

import pytest
from conftest import ROOT


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine may have a GPU")
def test_gpu_check_says_when_there_is_no_gpu(tmp_path):
    result = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 3
    assert "no NVIDIA GPU" in result.stderr
    assert not any((tmp_path / "out").iterdir())
