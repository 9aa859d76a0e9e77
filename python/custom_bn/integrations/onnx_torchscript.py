"""The TorchScript-based ONNX exporter (`torch.onnx.export(..., dynamo=False)`, which
ultralytics' export uses): symbolics for custom_bn::batch_norm, batch_norm_relu and
batch_norm_eval, registered when custom_bn is imported. They need neither onnx nor
onnxscript."""

import torch
from torch.onnx import symbolic_helper

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
    output = g.op("BatchNormalization", input, _filled_like(g, weight, 1.0, running_mean),
                  _filled_like(g, bias, 0.0, running_mean), running_mean, running_var,
                  epsilon_f=symbolic_helper._parse_arg(eps, "f"))  # fmt: skip
    if residual is not None and not symbolic_helper._is_none(residual):
        output = g.op("Add", output, residual)
    return g.op("Relu", output) if relu else output


def _training(value) -> bool:
    return bool(symbolic_helper._parse_arg(value, "b"))


def _symbolic_batch_norm_op(
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
):
    if _training(training):
        raise RuntimeError(_TRAINING_ERROR)
    return _symbolic_batch_norm(g, input, weight, bias, running_mean, running_var, eps, False, None)


def _symbolic_batch_norm_relu_op(
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
        g, input, weight, bias, running_mean, running_var, eps, True, residual
    )


def _symbolic_batch_norm_eval_op(
    g, input, weight, bias, running_mean, running_var, eps, relu, residual=None
):
    relu = bool(symbolic_helper._parse_arg(relu, "b"))
    return _symbolic_batch_norm(
        g, input, weight, bias, running_mean, running_var, eps, relu, residual
    )


def register_symbolics() -> None:
    """Registers the symbolics of the TorchScript-based exporter (done on import of custom_bn)."""
    for name, symbolic in (
        ("batch_norm", _symbolic_batch_norm_op),
        ("batch_norm_relu", _symbolic_batch_norm_relu_op),
        ("batch_norm_eval", _symbolic_batch_norm_eval_op),
    ):
        torch.onnx.register_custom_op_symbolic(f"custom_bn::{name}", symbolic, SYMBOLIC_OPSET)
