"""Finds and loads libcustom_bn.so, once, refusing a library built for another torch; and the
package's version."""

import importlib.metadata
import os
import pathlib
import re

import torch

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
# An in-tree build (scripts/test, scripts/demo) when the package is used from the checkout.
_BUILD_DIR = _PACKAGE_DIR.parent.parent / "build"
_loaded_path = None


def _candidates():
    """In order of preference: CUSTOM_BN_LIBRARY; in a checkout, its build (an editable
    install's copy in the package is older after a rebuild); an installed package's own copy."""
    if "CUSTOM_BN_LIBRARY" in os.environ:
        yield pathlib.Path(os.environ["CUSTOM_BN_LIBRARY"])
        return
    yield _BUILD_DIR / "libcustom_bn.so"
    yield from sorted(_PACKAGE_DIR.glob("libcustom_bn*.so"))


def library_path() -> str:
    """The path of libcustom_bn.so, for torch.ops.load_library in other processes."""
    if _loaded_path is not None:
        return _loaded_path
    for path in _candidates():
        if path.is_file():
            return str(path)
    searched = ", ".join(str(p) for p in _candidates())
    raise ImportError(
        f"custom_bn: libcustom_bn.so not found (looked at: {searched}). Build it with "
        "scripts/test or `pip install .`, or point CUSTOM_BN_LIBRARY at it."
    )


def _release(version: str) -> tuple:
    """(major, minor, patch) of a version string such as '2.11.0+cu130'."""
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if match is None:
        return ()
    return tuple(int(part or 0) for part in match.groups())


def _check_built_for_this_torch(path: str) -> None:
    version_file = pathlib.Path(path).with_name("torch_version.txt")
    if not version_file.is_file():
        return
    built_for = version_file.read_text().strip()
    if _release(built_for) != _release(torch.__version__):
        raise ImportError(
            f"custom_bn: {path} was built against torch {built_for}, but this is torch "
            f"{torch.__version__}. Rebuild it (scripts/test, or `pip install .`) with this torch."
        )


def load() -> str:
    global _loaded_path
    if _loaded_path is None:
        path = library_path()
        _check_built_for_this_torch(path)
        try:
            torch.ops.load_library(path)
        except OSError as error:
            raise ImportError(
                f"custom_bn: could not load {path} into torch {torch.__version__}: {error}"
            ) from error
        _loaded_path = path
    return _loaded_path


def version() -> str:
    """The installed distribution's version, or in a checkout its VERSION file."""
    checkout_version = _PACKAGE_DIR.parent.parent / "VERSION"
    if checkout_version.is_file():
        return checkout_version.read_text().strip()
    return importlib.metadata.version("custom_bn")
