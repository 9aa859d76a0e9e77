"""torch.ao.quantization with custom_bn's modules in place of torch's.

Quantization folds batch norm into the convolution before it (post-training) or into a fused
QAT module, both of which torch implements on its own BatchNorm classes. So each fusion that
torch defines for a torch.nn.BatchNorm{1,2,3}d gets a twin for ours, which hands torch's fuser
a torch.nn batch norm holding our layer's very parameters and buffers:

- eager mode: `torch.ao.quantization.fuse_modules` and `fuse_modules_qat` find the twins
  without arguments (they are added to torch's table of fuser methods when custom_bn is
  imported; `FUSER_METHOD_MAPPING` passes them explicitly, as
  `fuse_custom_config_dict={"additional_fuser_method_mapping": ...}`);
- FX mode: `prepare_fx`/`prepare_qat_fx`/`convert_fx` find the twins without arguments too
  (their default, torch's native backend config, gets ours added when custom_bn is imported);
  `get_backend_config(base)` adds them to any other config, to pass as `backend_config=`.
"""

import importlib
from collections.abc import Callable
from typing import Any

from torch.ao.quantization import fuser_method_mappings
from torch.ao.quantization.backend_config import (
    BackendConfig,
    BackendPatternConfig,
    get_native_backend_config,
)

from .modules import _REPLACEMENTS, _retype

_TORCH_FOR_OURS = {ours: theirs for theirs, ours in _REPLACEMENTS.items()}


def _as_torch(module: Any) -> Any:
    """torch's batch norm class over the same parameters and buffers, for one of ours."""
    theirs = _TORCH_FOR_OURS.get(type(module))
    return module if theirs is None else _retype(module, theirs)


def _with_ours(pattern: Any) -> Any:
    """The pattern with every torch.nn batch-norm class replaced by ours (nested tuples too)."""
    if isinstance(pattern, tuple):
        return tuple(_with_ours(p) for p in pattern)
    return _REPLACEMENTS.get(pattern, pattern) if isinstance(pattern, type) else pattern


def _mentions_batchnorm(pattern: Any) -> bool:
    return _with_ours(pattern) != pattern


def _fuser_for_ours(fuser_method: Callable) -> Callable:
    def fuse(is_qat: bool, *modules: Any) -> Any:
        return fuser_method(is_qat, *(_as_torch(m) for m in modules))

    return fuse


# Every eager fusion torch defines for its batch norm, for ours.
FUSER_METHOD_MAPPING: dict[tuple, Callable] = {
    _with_ours(pattern): _fuser_for_ours(method)
    for pattern, method in fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD.items()
    if _mentions_batchnorm(pattern)
}


def register_fuser_methods() -> None:
    """Adds FUSER_METHOD_MAPPING to torch's default table, so that fuse_modules(model, ...)
    fuses ours as torch's. Called on import."""
    fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD.update(FUSER_METHOD_MAPPING)


def get_backend_config(base: BackendConfig | None = None) -> BackendConfig:
    """`base` (torch's native fbgemm/qnnpack config by default) plus, for every pattern in it
    that names a torch.nn batch norm, the same pattern with ours: the same fusion, observers
    and quantized modules. Pass it as `backend_config=` to prepare_fx, prepare_qat_fx and
    convert_fx."""
    base = get_native_backend_config() if base is None else base
    config = BackendConfig(base.name)
    for pattern_config in base.configs:
        config.set_backend_pattern_config(pattern_config)
        if pattern_config.pattern is None or not _mentions_batchnorm(pattern_config.pattern):
            continue
        ours = pattern_config.to_dict()
        ours["pattern"] = _with_ours(pattern_config.pattern)
        if ours.get("root_module") in _REPLACEMENTS:
            ours["root_module"] = _REPLACEMENTS[ours["root_module"]]
        if "fuser_method" in ours:
            ours["fuser_method"] = _fuser_for_ours(ours["fuser_method"])
        config.set_backend_pattern_config(BackendPatternConfig.from_dict(ours))
    return config


def register_backend_config() -> None:
    """FX quantization called without `backend_config` takes torch's native config from
    `get_native_backend_config`, which each of its passes (fuse, prepare, convert) imported
    by name; each is pointed at that config with ours added, so that the default pipeline
    fuses and quantizes ours as torch's. Called on import."""
    for name in ("fuse", "prepare", "convert"):  # the package's functions shadow the modules
        module = importlib.import_module(f"torch.ao.quantization.fx.{name}")
        native = module.get_native_backend_config
        if hasattr(native, "__wrapped__"):
            continue

        def with_ours(native: Callable[[], BackendConfig] = native) -> BackendConfig:
            return get_backend_config(native())

        with_ours.__wrapped__ = native
        module.get_native_backend_config = with_ours


__all__ = [
    "FUSER_METHOD_MAPPING",
    "get_backend_config",
    "register_backend_config",
    "register_fuser_methods",
]
