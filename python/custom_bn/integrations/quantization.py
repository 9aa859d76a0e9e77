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

torch.ao.quantization is deprecated upstream, so this integration is optional: nothing here
runs unless torch's quantization modules are imported (torch imports the fuser table itself;
the FX passes are patched when they are first imported), and if torch has moved or removed a
hook point the integration turns itself off with a warning.

Hook points, private as torch has no registry for either: the eager fuser table
`fuser_method_mappings._DEFAULT_OP_LIST_TO_FUSER_METHOD`, and the name
`get_native_backend_config` in each of `torch.ao.quantization.fx.fuse`, `prepare` and
`convert`, which those passes call when no `backend_config` is given.
"""

import functools
from collections.abc import Callable
from typing import Any

from ..modules import _REPLACEMENTS, _retype
from .hooks import hook_point, when_imported

FEATURE = "torch.ao.quantization fusing and quantizing custom_bn's batch norm by default"
_FUSER_TABLE = ("torch.ao.quantization.fuser_method_mappings", "_DEFAULT_OP_LIST_TO_FUSER_METHOD")
_BACKEND_CONFIG = "torch.ao.quantization.backend_config"
_FX_PASSES = tuple(f"torch.ao.quantization.fx.{name}" for name in ("fuse", "prepare", "convert"))

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


def fuser_method_mapping() -> dict[tuple, Callable]:
    """Every eager fusion torch defines for its batch norm, for ours."""
    return {
        _with_ours(pattern): _fuser_for_ours(method)
        for pattern, method in hook_point(*_FUSER_TABLE).items()
        if _mentions_batchnorm(pattern)
    }


def get_backend_config(base: Any = None) -> Any:
    """`base` (torch's native fbgemm/qnnpack config by default) plus, for every pattern in it
    that names a torch.nn batch norm, the same pattern with ours: the same fusion, observers
    and quantized modules. Pass it as `backend_config=` to prepare_fx, prepare_qat_fx and
    convert_fx."""
    backend_config = hook_point(_BACKEND_CONFIG)
    hook_point(f"{_BACKEND_CONFIG}.utils")  # to_dict() uses it without importing it
    base = backend_config.get_native_backend_config() if base is None else base
    config = backend_config.BackendConfig(base.name)
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
        config.set_backend_pattern_config(backend_config.BackendPatternConfig.from_dict(ours))
    return config


def _with_our_config(native: Callable[[], Any]) -> Callable[[], Any]:
    @functools.wraps(native)
    def get_native_backend_config() -> Any:
        return get_backend_config(native())

    return get_native_backend_config


def _patch_fx_pass(module: Any) -> None:
    """Points one FX pass's default config at torch's native one with ours added."""
    native = hook_point(module.__name__, "get_native_backend_config")
    if not hasattr(native, "__wrapped__"):
        module.get_native_backend_config = _with_our_config(native)


def install() -> None:
    """Adds the fuser methods to torch's default table, so that fuse_modules(model, ...) fuses
    ours as torch's, and has each FX pass, when it is imported, default to a config with ours."""
    table = hook_point(*_FUSER_TABLE)
    hook_point(_BACKEND_CONFIG, "BackendConfig")
    hook_point(_BACKEND_CONFIG, "BackendPatternConfig", "from_dict")
    table.update(fuser_method_mapping())
    for name in _FX_PASSES:
        when_imported(name, FEATURE, _patch_fx_pass)
