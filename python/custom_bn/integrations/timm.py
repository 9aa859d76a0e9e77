"""timm's batch norm + activation layers, computed by custom_bn's ops.

timm builds EfficientNet, MobileNetV3, RegNet, GhostNet and most of its CNNs from
`BatchNormAct2d` (a subclass of nn.BatchNorm2d with `drop` and `act` children) and freezes them
into `FrozenBatchNormAct2d`. The classes here subclass those, so timm's own helpers (freeze,
unfreeze, SyncBatchNorm conversion, reparameterize) treat a converted layer as theirs; the
forward runs the fused batch_norm_relu op when there is no drop and the activation is one it
applies (ReLU, ReLU6, Hardtanh, LeakyReLU, SiLU, Hardswish, GELU: torch's classes, and timm's
own GELU), and otherwise custom_bn's batch norm followed by the layer's own drop and activation.

Imported by convert_batchnorm only when timm is already imported (a model holds its layers).
"""

import torch
from timm.layers import activations, norm_act
from torch import Tensor, nn

from .._activation import GELU, IDENTITY, Activation, fused_activation
from .._state import BatchNormState, registered
from ..modules import _fx_leaf
from ..sync_batchnorm import SyncBatchNorm

_FROZEN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _fused(module: nn.Module) -> Activation | None:
    """The fused op's activation when drop then act is exactly one it applies; None otherwise,
    and for no activation at all (plain batch norm has the leaner backward)."""
    if type(module.drop) is not nn.Identity:
        return None
    if type(module.act) is activations.GELU:  # F.gelu(x), timm's default "gelu" layer
        return GELU
    activation = fused_activation(module.act)
    return None if activation == IDENTITY else activation


def _drop_then_act(module: nn.Module, output: Tensor) -> Tensor:
    return module.act(module.drop(output))


class BatchNormAct2d(BatchNormState, norm_act.BatchNormAct2d):
    """timm's BatchNormAct2d on custom_bn's ops: same state_dict, drop and act."""

    def forward(self, x: Tensor) -> Tensor:
        leaf = _fx_leaf(self, x)
        if leaf is not None:
            return leaf
        self._check_input_dim(x)
        activation = _fused(self)
        if activation is not None:
            return torch.ops.custom_bn.batch_norm_relu(x, *self._op_arguments(), None, *activation)
        return _drop_then_act(self, torch.ops.custom_bn.batch_norm(x, *self._op_arguments()))


class FrozenBatchNormAct2d(norm_act.FrozenBatchNormAct2d):
    """timm's FrozenBatchNormAct2d on custom_bn's eval op (fused with the activation when it
    applies it)."""

    def forward(self, x: Tensor) -> Tensor:
        leaf = _fx_leaf(self, x)
        if leaf is not None:
            return leaf
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        weight, bias, mean, var = registered(self, _FROZEN_TENSORS)
        activation = _fused(self)
        if activation is not None:
            return torch.ops.custom_bn.batch_norm_eval(
                x, weight, bias, mean, var, self.eps, True, None, *activation
            )
        output = torch.ops.custom_bn.batch_norm_eval(x, weight, bias, mean, var, self.eps)
        return _drop_then_act(self, output)


def frozen_from(source: nn.Module, state: dict[str, Tensor]) -> FrozenBatchNormAct2d:
    """A FrozenBatchNormAct2d of ours over `state` (frozen.frozen_state), with the source's
    eps, drop and act."""
    frozen = FrozenBatchNormAct2d.__new__(FrozenBatchNormAct2d)
    nn.Module.__init__(frozen)
    frozen.eps = source.eps
    frozen.num_features = source.num_features
    frozen.affine = source.affine
    frozen._buffers.update(state)
    frozen.drop = source.drop
    frozen.act = source.act
    frozen.training = source.training
    return frozen


class SyncBatchNormAct(SyncBatchNorm):
    """timm's SyncBatchNormAct (batch norm synchronized across ranks, then `drop` and `act`) on
    custom_bn's SyncBatchNorm, so CPU over gloo too. Unlike timm's it is not a torch
    SyncBatchNorm, which DistributedDataParallel refuses on CPU ("SyncBatchNorm layers only
    work with GPU modules")."""

    def forward(self, x: Tensor) -> Tensor:
        leaf = _fx_leaf(self, x)
        if leaf is not None:
            return leaf
        return _drop_then_act(self, super().forward(x))


# timm's classes -> ours, for convert_batchnorm.
REPLACEMENTS = {
    norm_act.BatchNormAct2d: BatchNormAct2d,
    norm_act.FrozenBatchNormAct2d: FrozenBatchNormAct2d,
    norm_act.SyncBatchNormAct: SyncBatchNormAct,
}
BATCH_NORM_ACT = (norm_act.BatchNormAct2d, norm_act.SyncBatchNormAct)
