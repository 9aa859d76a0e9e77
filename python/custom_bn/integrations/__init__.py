"""custom_bn's integrations with other libraries and torch subsystems, each in its own file.

`install()` (run by `import custom_bn`) installs those that hook into torch at import; one
whose hook point torch no longer has turns itself off with a warning naming what no longer
works, and the import goes on."""

import warnings


def install() -> None:
    try:
        from . import onnx_torchscript

        onnx_torchscript.register_symbolics()
    except Exception as error:  # noqa: BLE001  torch moved: export without ours, not no import.
        warnings.warn(
            "custom_bn: torch.onnx.export(..., dynamo=False) will not export custom_bn's ops: "
            f"registering their symbolics failed ({type(error).__name__}: {error})",
            stacklevel=2,
        )
