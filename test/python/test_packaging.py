"""`pip wheel .` makes a wheel that carries the library and installs into a working package."""

import os
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_installs_and_imports(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("custom_bn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("custom_bn/libcustom_bn") and n.endswith(".so") for n in names)
    assert "custom_bn/torch_version.txt" in names

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
        "print(custom_bn.BatchNorm2d(3)(torch.randn(2, 3, 4, 4)).shape)"
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
