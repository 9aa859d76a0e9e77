"""Packaging: an sdist that holds the CMake project, and a wheel (`pip wheel .`) that carries
the library, requires the torch it was built against and installs into a working package."""

import os
import subprocess
import sys
import tarfile
import zipfile

import torch
from conftest import ROOT

VERSION = (ROOT / "VERSION").read_text().strip()


def test_sdist_holds_every_source_and_configures(tmp_path):
    """An sdist carries every tracked file the build reads and configures as a CMake project
    (the wheel test below builds that project; compiling it a second time here would cost
    minutes of CI)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "--no-isolation",
            "-o",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
    )
    (sdist,) = tmp_path.glob("custom_bn-*.tar.gz")
    assert sdist.name == f"custom_bn-{VERSION}.tar.gz"
    with tarfile.open(sdist) as archive:
        archive.extractall(tmp_path, filter="data")
    source = tmp_path / sdist.name.removesuffix(".tar.gz")
    read_by_the_build = subprocess.run(
        ["git", "ls-files", "CMakeLists.txt", "VERSION", "cmake", "csrc", "include"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [f for f in read_by_the_build if not (source / f).is_file()] == []
    prefix = torch.utils.cmake_prefix_path
    configure = subprocess.run(
        ["cmake", "-S", str(source), "-B", str(tmp_path / "build"), "-G", "Ninja",
         f"-DCMAKE_PREFIX_PATH={prefix}", "-DCUSTOM_BN_BUILD_TESTS=OFF",
         "-DCUSTOM_BN_WITH_CUDA=OFF"],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert configure.returncode == 0, configure.stdout[-2000:] + configure.stderr[-2000:]
    version_file = tmp_path / "build" / "custom_bnConfigVersion.cmake"
    assert f'set(PACKAGE_VERSION "{VERSION}")' in version_file.read_text()


def test_wheel_requires_its_torch_installs_and_imports(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
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
    assert result.stdout.splitlines()[-1] == VERSION
