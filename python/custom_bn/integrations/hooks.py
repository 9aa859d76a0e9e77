"""What every integration does before it touches torch: find its hook points, and say which
feature is lost when one is gone.

An integration's `install()` first looks up every torch name it will use (`hook_point`), then
changes anything; a missing name raises MissingHookPoint before any change is made.
`custom_bn.integrations.install` turns such an integration off with one warning naming the
feature and the missing name, and the import of custom_bn goes on."""

import importlib
import importlib.machinery
import sys
import warnings
from collections.abc import Callable
from typing import Any


class MissingHookPoint(RuntimeError):
    """A torch name an integration hooks into is no longer where it was."""


def hook_point(module_name: str, *attributes: str) -> Any:
    """`module_name.attribute[.attribute...]`, or MissingHookPoint naming it."""
    path = module_name
    try:
        value = importlib.import_module(module_name)
    except ImportError as error:
        raise MissingHookPoint(f"{module_name} cannot be imported ({error})") from error
    for attribute in attributes:
        path = f"{path}.{attribute}"
        value = getattr(value, attribute, MissingHookPoint)
        if value is MissingHookPoint:
            raise MissingHookPoint(f"{path} is missing")
    return value


def turned_off_warning(feature: str, error: Exception) -> str:
    if not isinstance(error, MissingHookPoint):
        error = f"{type(error).__name__}: {error}"
    return f"custom_bn: {feature} is turned off: this torch has moved what it hooks into ({error})"


def install_or_warn(feature: str, install: Callable[[], None]) -> bool:
    """Runs install(); where torch has moved (any exception), warns once and returns False."""
    try:
        install()
    except Exception as error:  # noqa: BLE001  a moved torch turns a feature off, not the import.
        warnings.warn(turned_off_warning(feature, error), stacklevel=3)
        return False
    return True


class _CallbackOnImport:
    """A meta path finder that lets the ordinary finders load one module, then runs a
    callback on it before its import returns."""

    def __init__(self, module_name: str, callback: Callable[[Any], None]):
        self.module_name, self.callback = module_name, callback

    def find_spec(self, name, path, target=None):
        if name != self.module_name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_callback(module):
            execute(module)
            self.callback(module)

        spec.loader.exec_module = execute_then_callback
        return spec


def when_imported(module_name: str, feature: str, callback: Callable[[Any], None]) -> None:
    """callback(module) now if module_name is imported, else when it is first imported, so
    that users who never import it do not pay for importing it. Where the callback fails
    (torch has moved), `feature` is turned off with a warning and that import goes on."""

    def install(module: Any) -> None:
        install_or_warn(feature, lambda: callback(module))

    module = sys.modules.get(module_name)
    if module is not None:
        install(module)
    elif not any(
        isinstance(finder, _CallbackOnImport) and finder.module_name == module_name
        for finder in sys.meta_path
    ):
        sys.meta_path.insert(0, _CallbackOnImport(module_name, install))
