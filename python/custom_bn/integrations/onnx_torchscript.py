"""The TorchScript-based ONNX exporter (`torch.onnx.export(..., dynamo=False)`, which
ultralytics' export uses): symbolics for custom_bn::batch_norm, batch_norm_relu and
batch_norm_eval, registered when custom_bn is imported. They need neither onnx nor
onnxscript. Public API (torch.onnx.register_custom_op_symbolic) but private helpers of the
symbolics (`symbolic_helper._is_none`, `_parse_arg`), which every custom symbolic uses."""

import torch
from torch.onnx import symbolic_helper

from .hooks import hook_point

# BatchNormalization with scale and statistics of another dtype than the input (float32
# parameters of a bfloat16 model) needs opset 15.
SYMBOLIC_OPSET = 15

_TRAINING_ERROR = (
    "custom_bn.onnx: exporting batch norm in training mode is not supported: ONNX's "
    "BatchNormalization updates running_var with the biased batch variance where torch uses the "
    "unbiased one (onnx PR 3415), so the exported model would differ. Call model.eval() before "
    "torch.onnx.export."
)


def _filled_like(g, value, fill: float, like):
    """value, or (absent) a tensor of `fill` with like's shape and dtype."""
    if not symbolic_helper._is_none(value):
        return value
    filled = g.op("Expand", g.op("Constant", value_t=torch.tensor(fill)), g.op("Shape", like))
    return g.op("CastLike", filled, like)


def _symbolic_batch_norm(g, input, weight, bias, running_mean, running_var, eps, relu, residual):
    if symbolic_helper._is_none(running_mean) or symbolic_helper._is_none(running_var):
        raise RuntimeError(_TRAINING_ERROR)
    output = g.op(
        "BatchNormalization",
        input,
        _filled_like(g, weight, 1.0, running_mean),
        _filled_like(g, bias, 0.0, running_mean),
        running_mean,
        running_var,
        epsilon_f=symbolic_helper._parse_arg(eps, "f"),
    )
    if residual is not None and not symbolic_helper._is_none(residual):
        output = g.op("Add", output, residual)
    return g.op("Relu", output) if relu else output


def _training(value) -> bool:
    return bool(symbolic_helper._parse_arg(value, "b"))


def _symbolic_training_op(relu: bool):
    """The symbolic of batch_norm (relu=False) or batch_norm_relu: evaluation mode only."""

    def symbolic(
        g,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        training,
        momentum,
        eps,
        num_batches_tracked=None,
        residual=None,
    ):
        if _training(training):
            raise RuntimeError(_TRAINING_ERROR)
        return _symbolic_batch_norm(
            g, input, weight, bias, running_mean, running_var, eps, relu, residual
        )

    return symbolic


def _symbolic_batch_norm_eval_op(
    g, input, weight, bias, running_mean, running_var, eps, relu, residual=None
):
    relu = bool(symbolic_helper._parse_arg(relu, "b"))
    return _symbolic_batch_norm(
        g, input, weight, bias, running_mean, running_var, eps, relu, residual
    )


FEATURE = "torch.onnx.export(..., dynamo=False) exporting custom_bn's ops"


def install() -> None:
    """Registers the symbolics of the TorchScript-based exporter (done on import of custom_bn)."""
    register = hook_point("torch.onnx", "register_custom_op_symbolic")
    for name, symbolic in (
        ("batch_norm", _symbolic_training_op(relu=False)),
        ("batch_norm_relu", _symbolic_training_op(relu=True)),
        ("batch_norm_eval", _symbolic_batch_norm_eval_op),
    ):
        register(f"custom_bn::{name}", symbolic, SYMBOLIC_OPSET)
