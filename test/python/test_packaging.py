"""An sdist of the checkout builds, with pip, a wheel that carries the library, requires the
torch it was built against and installs into a working package."""

import os
import subprocess
import sys
import tarfile
import zipfile

import torch
from conftest import ROOT


def test_sdist_builds_a_wheel_that_installs_and_imports(tmp_path):
    sdists, wheels, site = tmp_path / "sdists", tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(sdists), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (sdist,) = sdists.glob("custom_bn-*.tar.gz")
    version = (ROOT / "VERSION").read_text().strip()
    assert sdist.name == f"custom_bn-{version}.tar.gz"
    members = {m.split("/", 1)[-1] for m in tarfile.open(sdist).getnames()}
    assert {"CMakeLists.txt", "VERSION", "csrc/schemas.cpp", "include/custom_bn/ops.h"} <= members
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(sdist), "--no-deps", "-q", "-w", str(wheels)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("custom_bn-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = archive.namelist()
    assert any(n.startswith("custom_bn/libcustom_bn") and n.endswith(".so") for n in names)
    assert "custom_bn/torch_version.txt" in names
    (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
    requirement = f"Requires-Dist: torch=={torch.__version__.split('+')[0]}"
    assert requirement in archive.read(metadata).decode().splitlines()

    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "CUSTOM_BN_LIBRARY"}
    env["PYTHONPATH"] = str(site)
    code = (
        "import custom_bn, torch; print(custom_bn.library_path()); "
        "print(custom_bn.BatchNorm2d(3)(torch.randn(2, 3, 4, 4)).shape); "
        "print(custom_bn.__version__)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.splitlines()[0].startswith(str(site))
    assert "torch.Size([2, 3, 4, 4])" in result.stdout
    assert result.stdout.splitlines()[-1] == version
