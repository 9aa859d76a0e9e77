"""ONNX export of custom_bn's batch norm, in evaluation mode, as ONNX BatchNormalization.

- `torch.onnx.export(model, args, dynamo=True, custom_translation_table=custom_translation_table)`:
  the exported program's eval batch norm is the non-mutating `custom_bn::batch_norm_eval`,
  which the table maps (written in onnxscript) to BatchNormalization, then Add (residual) and
  the activation for batch_norm_relu (Relu, Clip, LeakyRelu; Sigmoid and Mul, HardSwish, Erf).
- `torch.onnx.export(model, args, dynamo=False)` (the TorchScript-based exporter): `import
  custom_bn` registers symbolics for `custom_bn::batch_norm`, `batch_norm_relu` and
  `batch_norm_eval` (custom_bn.integrations.onnx_torchscript).

`export(model, args)` is torch.onnx.export with the table added, which first refuses a model
whose batch norm is in training mode. Training mode is refused (by `export`, and by the
TorchScript-based exporter told to keep it; the dynamo exporter called directly fails on the
training op with its own ConversionError): ONNX's training-mode
BatchNormalization updates the running variance with the biased batch variance where torch
uses the unbiased one (onnx PR 3415), so the exported model would silently differ. Export a
model in `.eval()`.
"""

import torch
from onnxscript import opset18 as op

from .integrations.onnx_torchscript import _TRAINING_ERROR, SYMBOLIC_OPSET
from .integrations.torch_nn import BatchNormBase


def _smooth_activation(output, activation: str):
    """SiLU as x * Sigmoid(x), HardSwish, GELU as x / 2 * (1 + Erf(x / sqrt(2))) (opset 18
    has no Gelu)."""
    if activation == "silu":
        return op.Mul(output, op.Sigmoid(output))
    if activation == "hardswish":
        return op.HardSwish(output)
    half = op.CastLike(op.Constant(value_float=0.5), output)
    one = op.CastLike(op.Constant(value_float=1.0), output)
    rsqrt2 = op.CastLike(op.Constant(value_float=0.7071067811865476), output)
    return op.Mul(op.Mul(half, output), op.Add(one, op.Erf(op.Mul(output, rsqrt2))))


def _activation(
    output,
    min_val: float,
    max_val: float | None,
    negative_slope: float,
    activation: str = "piecewise_linear",
):
    """The fused op's activation in ONNX: a smooth one (_smooth_activation), or the
    piecewise-linear one as Relu, Clip (ReLU6, hardtanh), LeakyRelu, nothing (identity), or in
    general Where and Min."""
    if activation != "piecewise_linear":
        return _smooth_activation(output, activation)
    if negative_slope == 0:
        if min_val == 0 and max_val is None:
            return op.Relu(output)
        low = op.CastLike(op.Constant(value_float=min_val), output)
        high = None if max_val is None else op.CastLike(op.Constant(value_float=max_val), output)
        return op.Clip(output, low, high)
    if min_val == 0:
        if negative_slope != 1:
            output = op.LeakyRelu(output, alpha=negative_slope)
    else:
        low = op.CastLike(op.Constant(value_float=min_val), output)
        slope = op.CastLike(op.Constant(value_float=negative_slope), output)
        below = op.Add(low, op.Mul(slope, op.Sub(output, low)))
        output = op.Where(op.LessOrEqual(output, low), below, output)
    if max_val is not None:
        output = op.Min(output, op.CastLike(op.Constant(value_float=max_val), output))
    return output


def _batch_norm_eval(
    input,
    weight,
    bias,
    running_mean,
    running_var,
    eps: float,
    relu: bool = False,
    residual=None,
    min_val: float = 0.0,
    max_val: float | None = None,
    negative_slope: float = 0.0,
    activation: str = "piecewise_linear",
):
    """custom_bn::batch_norm_eval as BatchNormalization (then Add and the activation)."""
    channels = op.Shape(running_mean)
    if weight is None:
        weight = op.CastLike(op.Expand(op.Constant(value_float=1.0), channels), running_mean)
    if bias is None:
        bias = op.CastLike(op.Expand(op.Constant(value_float=0.0), channels), running_mean)
    output = op.BatchNormalization(input, weight, bias, running_mean, running_var, epsilon=eps)
    if residual is not None:
        output = op.Add(output, residual)
    if not relu:
        return output
    return _activation(output, min_val, max_val, negative_slope, activation)


# torch.onnx.export(..., dynamo=True): the eval op. A training-mode program holds the
# mutating batch_norm_forward instead, which the exporter fails on before any table entry
# runs (its ConversionError names custom_bn.batch_norm_forward).
custom_translation_table = {torch.ops.custom_bn.batch_norm_eval.default: _batch_norm_eval}


def export(model: torch.nn.Module, args: tuple, f=None, **kwargs):
    """torch.onnx.export with custom_translation_table added (dynamo=True unless given), after
    checking that no batch norm of `model` is in training mode: raises this module's
    explanation where the dynamo exporter would fail on the training op with its own error."""
    training = [
        name for name, m in model.named_modules() if isinstance(m, BatchNormBase) and m.training
    ]
    if training:
        raise RuntimeError(f"{_TRAINING_ERROR} (modules in training mode: {', '.join(training)})")
    table = {**custom_translation_table, **kwargs.pop("custom_translation_table", {})}
    kwargs.setdefault("dynamo", True)
    if kwargs["dynamo"]:
        kwargs["custom_translation_table"] = table
    return torch.onnx.export(model, args, f, **kwargs)


__all__ = ["SYMBOLIC_OPSET", "custom_translation_table", "export"]
