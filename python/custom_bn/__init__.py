"""custom_bn: batch normalization as PyTorch C++ operators (torch.ops.custom_bn.*).

Importing the package loads libcustom_bn.so once; every op, its autograd and its Meta
kernel then live under torch.ops.custom_bn.
"""

from ._library import library_path, load

load()

from . import (  # noqa: E402
    _fx_optimization,
    _inductor,
    _vmap,
    functional,
    integrations,
    memory,
    quantization,
)
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

_vmap.register()
_inductor.register()
_fx_optimization.register()
quantization.register_fuser_methods()
quantization.register_backend_config()
integrations.install()

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
    "memory",
    "quantization",
    "SyncBatchNorm",
    "SyncBatchNormReLU2d",
]
__version__ = "0.1.0"
