"""custom_bn: batch normalization as PyTorch C++ operators (torch.ops.custom_bn.*).

Importing the package loads libcustom_bn.so once (every op, its autograd and its Meta kernel
then live under torch.ops.custom_bn) and installs the integrations with torch's subsystems
(custom_bn.integrations). `custom_bn.quantization` and `custom_bn.onnx` are imported on first
use.
"""

import importlib

from ._library import library_path, load, version

load()

from . import functional, integrations, result_cache  # noqa: E402
from .convert import convert_batchnorm  # noqa: E402
from .frozen import FrozenBatchNorm2d  # noqa: E402
from .fusion import fuse_batchnorm_relu  # noqa: E402
from .modules import (  # noqa: E402
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    BatchNormReLU2d,
    LazyBatchNorm1d,
    LazyBatchNorm2d,
    LazyBatchNorm3d,
)
from .sync_batchnorm import SyncBatchNorm, SyncBatchNormReLU2d  # noqa: E402

integrations.install()

_ON_FIRST_USE = ("onnx", "quantization")


def __getattr__(name: str):
    if name in _ON_FIRST_USE:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormReLU2d",
    "FrozenBatchNorm2d",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
    "convert_batchnorm",
    "fuse_batchnorm_relu",
    "functional",
    "library_path",
    "result_cache",
    "quantization",
    "SyncBatchNorm",
    "SyncBatchNormReLU2d",
]
__version__ = version()
