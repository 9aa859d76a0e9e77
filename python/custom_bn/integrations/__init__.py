"""custom_bn's integrations with torch subsystems and other libraries, each in its own file, and
the only place where custom_bn names torch's private modules, classes and attributes.

`install()` (run by `import custom_bn`) installs those that hook into torch at import. Each
looks up its hook points before it changes anything; where torch has moved one, that
integration turns itself off with one warning naming the feature it loses, and the import of
custom_bn goes on. timm's and Lightning's are used on demand (convert_batchnorm, the Lightning
plugin), not installed."""

import importlib

from .hooks import install_or_warn

# Installed by `import custom_bn`, in this order; each is independent of the others.
INSTALLED = ("vmap", "inductor", "fx", "quantization", "onnx_torchscript", "fake")

# {name: whether it is on}, as the last install() left it.
status: dict[str, bool] = {}


def install() -> dict[str, bool]:
    """Installs every integration of INSTALLED (again, where one already is, changes nothing)."""
    for name in INSTALLED:
        integration = importlib.import_module(f"{__name__}.{name}")
        status[name] = install_or_warn(integration.FEATURE, integration.install)
    return dict(status)
