"""torch.fx.experimental.optimization.fuse (Conv/Linear + BatchNorm folding) for our modules.

torch's pass folds a batch norm into the convolution or linear layer before it, and matches
the pair with `matches_module_pattern`, which compares module types exactly
(`type(m) is nn.BatchNorm2d`), so a subclass of `_BatchNorm` is never matched. The folding
itself (`torch.nn.utils.fusion.fuse_conv_bn_eval`) reads only the running statistics, eps and
the affine parameters, which ours have under the same names. So the matcher is widened to
accept ours wherever a pattern names torch's class; everything else is torch's code.

Hook point: `torch.fx.experimental.optimization.matches_module_pattern` (torch offers no
registry of module patterns to add to)."""

from collections.abc import Callable, Iterable
from typing import Any

from ..modules import _REPLACEMENTS
from .hooks import hook_point

FEATURE = "torch.fx.experimental.optimization.fuse folding custom_bn's batch norm into convolutions"
_MODULE = "torch.fx.experimental.optimization"


def _widen(matches: Callable[..., bool]) -> Callable[..., bool]:
    def matches_module_pattern(pattern: Iterable[type], node: Any, modules: dict) -> bool:
        pattern = tuple(pattern)
        ours = tuple(_REPLACEMENTS.get(t, t) for t in pattern)
        return matches(pattern, node, modules) or (ours != pattern and matches(ours, node, modules))

    matches_module_pattern.__wrapped__ = matches
    return matches_module_pattern


def install() -> None:
    """Widens torch's matcher once."""
    current = hook_point(_MODULE, "matches_module_pattern")
    if not hasattr(current, "__wrapped__"):
        hook_point(_MODULE).matches_module_pattern = _widen(current)
