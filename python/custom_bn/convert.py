"""convert_batchnorm: torch's (and torchvision's, timm's) batch norm layers become ours."""

import sys
import warnings
from collections import Counter
from collections.abc import Callable

from torch import nn

from . import frozen as frozen_module
from . import modules
from .integrations.torch_nn import BatchNormBase, LazyNormBase

_LAZY = {
    nn.LazyBatchNorm1d: modules.LazyBatchNorm1d,
    nn.LazyBatchNorm2d: modules.LazyBatchNorm2d,
    nn.LazyBatchNorm3d: modules.LazyBatchNorm3d,
}


def _lazy(module: LazyNormBase) -> nn.Module:
    """An unmaterialized lazy module of ours with the same options, device and dtype."""
    factory = {}
    state = module.weight if module.affine else module.running_mean
    if state is not None:
        factory = {"device": state.device, "dtype": state.dtype}
    lazy = _LAZY[type(module)](
        module.eps, module.momentum, module.affine, module.track_running_stats, **factory
    )
    return lazy.train(module.training)


def _timm():
    """custom_bn.integrations.timm when the process has imported timm (a model of the process
    may then hold its layers), else None."""
    if "timm" not in sys.modules:
        return None
    from .integrations import timm

    return timm


def _converter(module: nn.Module, frozen: bool) -> Callable[[nn.Module], nn.Module] | None:
    """How to convert `module` itself, or None to look at its children."""
    kind = type(module)
    if frozen and kind in (nn.BatchNorm2d, modules.BatchNorm2d):
        return frozen_module.freeze
    if kind in modules._REPLACEMENTS:
        return lambda m: modules._retype(m, modules._REPLACEMENTS[kind])
    if kind in _LAZY:
        return _lazy
    if _is_torchvision_frozen(kind):
        return _retype_torchvision_frozen
    timm = _timm()
    if timm is not None:
        if frozen and kind in (timm.norm_act.BatchNormAct2d, timm.BatchNormAct2d):
            return lambda m: timm.frozen_from(m, frozen_module.frozen_state(m))
        if kind in timm.REPLACEMENTS:
            return lambda m: modules._retype(m, timm.REPLACEMENTS[kind])
    return None


def _is_torchvision_frozen(kind: type) -> bool:
    torchvision = sys.modules.get("torchvision")
    return torchvision is not None and kind is torchvision.ops.misc.FrozenBatchNorm2d


def _retype_torchvision_frozen(module: nn.Module) -> frozen_module.FrozenBatchNorm2d:
    """Ours over the same buffers and eps (torchvision's keeps no num_features)."""
    ours = modules._retype(module, frozen_module.FrozenBatchNorm2d)
    ours.num_features = module.weight.numel()
    return ours


def _unconvertible(module: nn.Module, frozen: bool) -> Counter:
    """Batch norm layers that convert_batchnorm would leave as they are, by class name."""
    left = Counter()
    for m in module.modules():
        kind = type(m)
        if kind.__module__.startswith("custom_bn.") or _converter(m, frozen) is not None:
            continue
        if isinstance(m, BatchNormBase) or _is_torchvision_frozen(kind):
            left[f"{kind.__module__}.{kind.__qualname__}"] += 1
    return left


def _convert(module: nn.Module, frozen: bool) -> nn.Module:
    converter = _converter(module, frozen)
    if converter is not None:
        return converter(module)
    for name, child in module.named_children():
        converted = _convert(child, frozen)
        if converted is not child:
            setattr(module, name, converted)
    return module


def convert_batchnorm(module: nn.Module, frozen: bool = False, strict: bool = False) -> nn.Module:
    """Replaces the batch norm layers of `module` (or `module` itself) by ours, keeping
    parameters and buffers (the very tensors), state_dict keys, training mode and device:

    - torch.nn.BatchNorm{1,2,3}d -> custom_bn.BatchNorm{1,2,3}d;
    - torch.nn.LazyBatchNorm{1,2,3}d not yet materialized -> custom_bn's lazy modules;
    - torchvision.ops.FrozenBatchNorm2d -> custom_bn.FrozenBatchNorm2d;
    - timm's BatchNormAct2d, FrozenBatchNormAct2d and SyncBatchNormAct -> those of
      custom_bn.integrations.timm (the fused op where the activation is a ReLU).

    With frozen=True, 2-D batch norm layers (also timm's BatchNormAct2d) become frozen ones
    with copies of their current statistics and affine parameters, at their dtype and device.

    Other batch norm layers (SyncBatchNorm, subclasses from other libraries) stay as they are
    and are reported: a warning with their counts by class, or with strict=True a ValueError
    raised before anything is converted."""
    left = _unconvertible(module, frozen)
    if left:
        counts = ", ".join(f"{count} {name}" for name, count in sorted(left.items()))
        message = f"convert_batchnorm left batch norm layers it does not convert: {counts}"
        if strict:
            raise ValueError(message)  # before anything is converted
        warnings.warn(message, stacklevel=2)
    return _convert(module, frozen)
