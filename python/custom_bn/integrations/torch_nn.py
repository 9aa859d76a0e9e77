"""torch's batch norm base classes (torch.nn.modules.batchnorm), private names that custom_bn's
modules subclass and its passes test with isinstance, as torch's own BatchNorm1d/2d/3d,
SyncBatchNorm and lazy modules do, and as timm, torchvision and Lightning test for batch norm.

Unlike the hook points of the other integrations these cannot be turned off: without them
custom_bn's modules would not be batch norm to torch and to those libraries."""

from torch.nn.modules.batchnorm import _BatchNorm as BatchNormBase
from torch.nn.modules.batchnorm import _LazyNormBase as LazyNormBase
from torch.nn.modules.batchnorm import _NormBase as NormBase

__all__ = ["BatchNormBase", "LazyNormBase", "NormBase"]
