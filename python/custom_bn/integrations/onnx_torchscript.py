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


def _constant_like(g, value: float, like):
    return g.op("CastLike", g.op("Constant", value_t=torch.tensor(value)), like)


def _smooth_activation(g, output, activation: str):
    """SiLU as x * Sigmoid(x), HardSwish, GELU as x / 2 * (1 + Erf(x / sqrt(2)))."""
    if activation == "silu":
        return g.op("Mul", output, g.op("Sigmoid", output))
    if activation == "hardswish":
        return g.op("HardSwish", output)
    erf = g.op("Erf", g.op("Mul", output, _constant_like(g, 0.7071067811865476, output)))
    half_x = g.op("Mul", output, _constant_like(g, 0.5, output))
    return g.op("Mul", half_x, g.op("Add", erf, _constant_like(g, 1.0, output)))


def _activation(g, output, min_val, max_val, negative_slope, activation="piecewise_linear"):
    """The fused op's activation (custom_bn.onnx._activation, for this exporter): a smooth one,
    or the piecewise-linear one as Relu, Clip, LeakyRelu, nothing (identity), or in general
    Where and Min."""
    if not isinstance(activation, str):
        activation = symbolic_helper._parse_arg(activation, "s")
    if activation != "piecewise_linear":
        return _smooth_activation(g, output, activation)
    low = symbolic_helper._parse_arg(min_val, "f")
    high = None if symbolic_helper._is_none(max_val) else symbolic_helper._parse_arg(max_val, "f")
    slope = symbolic_helper._parse_arg(negative_slope, "f")
    if slope == 0:
        if low == 0 and high is None:
            return g.op("Relu", output)
        bounds = [_constant_like(g, low, output)]
        if high is not None:
            bounds.append(_constant_like(g, high, output))
        return g.op("Clip", output, *bounds)
    if low == 0:
        if slope != 1:
            output = g.op("LeakyRelu", output, alpha_f=slope)
    else:
        low_t = _constant_like(g, low, output)
        below = g.op(
            "Add", low_t, g.op("Mul", _constant_like(g, slope, output), g.op("Sub", output, low_t))
        )
        output = g.op("Where", g.op("LessOrEqual", output, low_t), below, output)
    if high is not None:
        output = g.op("Min", output, _constant_like(g, high, output))
    return output


def _symbolic_batch_norm(
    g, input, weight, bias, running_mean, running_var, eps, relu, residual, activation
):
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
    return _activation(g, output, *activation) if relu else output


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
        min_val=0.0,
        max_val=None,
        negative_slope=0.0,
        activation="piecewise_linear",
    ):
        if _training(training):
            raise RuntimeError(_TRAINING_ERROR)
        activation = (min_val, max_val, negative_slope, activation)
        return _symbolic_batch_norm(
            g, input, weight, bias, running_mean, running_var, eps, relu, residual, activation
        )

    return symbolic


def _symbolic_batch_norm_eval_op(
    g,
    input,
    weight,
    bias,
    running_mean,
    running_var,
    eps,
    relu,
    residual=None,
    min_val=0.0,
    max_val=None,
    negative_slope=0.0,
    activation="piecewise_linear",
):
    relu = bool(symbolic_helper._parse_arg(relu, "b"))
    activation = (min_val, max_val, negative_slope, activation)
    return _symbolic_batch_norm(
        g, input, weight, bias, running_mean, running_var, eps, relu, residual, activation
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
