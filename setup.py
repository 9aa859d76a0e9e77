"""Builds the custom_bn Python package by driving the project's one CMake build, so the
kernels compile once: `pip install .`, `pip install -e .` and `pip wheel .` all work in an
environment that has torch (the repository's .venv reuses build/)."""

import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = pathlib.Path(__file__).resolve().parent
# pip's build isolation hides the environment's packages through these; the interpreter
# itself still has torch, which is what the library must be built against.
ISOLATION_VARIABLES = ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")


def environment_with_torch() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ISOLATION_VARIABLES}
    probe = subprocess.run(
        [sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True
    )
    if probe.returncode != 0:
        raise RuntimeError(
            f"custom_bn builds against the torch of {sys.executable}, which "
            f"cannot import it:\n{probe.stderr}"
        )
    return env


def torch_requirement() -> str:
    """The torch the library is built against: it loads into that torch only
    (custom_bn/_library.py refuses any other). Unpinned where no torch can be imported (an
    sdist's metadata; the wheel built from it is pinned)."""
    try:
        env = environment_with_torch()
    except RuntimeError:
        return "torch"
    version = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__.split('+')[0])"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return f"torch=={version}"


def build_dir_for(python: str) -> pathlib.Path:
    venv_python = ROOT / ".venv" / "bin" / "python"
    if venv_python.exists() and os.path.samefile(python, venv_python):
        return ROOT / "build"  # the build scripts/test and scripts/demo use
    return ROOT / "build-pip"


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        env = environment_with_torch()
        build_dir = build_dir_for(sys.executable)
        env.update(CUSTOM_BN_PYTHON=sys.executable, CUSTOM_BN_BUILD_DIR=str(build_dir))
        subprocess.check_call(
            [
                "bash",
                "-c",
                'source scripts/lib/setup.sh && ensure_build "$@"',
                "build",
                *(["-DCUSTOM_BN_BUILD_TESTS=OFF"] if build_dir.name == "build-pip" else []),
            ],
            cwd=ROOT,
            env=env,
        )
        target = pathlib.Path(self.get_ext_fullpath(ext.name))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / "libcustom_bn.so", target)
        shutil.copy2(build_dir / "torch_version.txt", target.parent / "torch_version.txt")


setup(
    name="custom_bn",
    version=(ROOT / "VERSION").read_text().strip(),
    description="Batch normalization for PyTorch as C++ custom operators",
    packages=["custom_bn", "custom_bn.integrations"],
    package_dir={"": "python"},
    ext_modules=[Extension("custom_bn.libcustom_bn", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",  # X | None annotations, evaluated at import
    install_requires=[torch_requirement()],
    # custom_bn.integrations.lightning's SyncBatchNormPlugin.
    extras_require={"lightning": ["lightning>=2.0"]},
)
