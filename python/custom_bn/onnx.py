"""ONNX export of custom_bn's batch norm, in evaluation mode, as ONNX BatchNormalization.

- `torch.onnx.export(model, args, dynamo=True, custom_translation_table=custom_translation_table)`:
  the exported program's eval batch norm is the non-mutating `custom_bn::batch_norm_eval`,
  which the table maps (written in onnxscript) to BatchNormalization, then Add (residual) and
  Relu for batch_norm_relu.
- `torch.onnx.export(model, args, dynamo=False)` (the TorchScript-based exporter): importing
  this module registers symbolics for `custom_bn::batch_norm`, `batch_norm_relu` and
  `batch_norm_eval`.

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


def _batch_norm_eval(
    input, weight, bias, running_mean, running_var, eps: float, relu: bool = False, residual=None
):
    """custom_bn::batch_norm_eval as BatchNormalization (then Add and Relu)."""
    channels = op.Shape(running_mean)
    if weight is None:
        weight = op.CastLike(op.Expand(op.Constant(value_float=1.0), channels), running_mean)
    if bias is None:
        bias = op.CastLike(op.Expand(op.Constant(value_float=0.0), channels), running_mean)
    output = op.BatchNormalization(input, weight, bias, running_mean, running_var, epsilon=eps)
    if residual is not None:
        output = op.Add(output, residual)
    return op.Relu(output) if relu else output


# torch.onnx.export(..., dynamo=True): the eval op. A training-mode program holds the
# mutating batch_norm_forward instead, which the exporter fails on before any table entry
# runs (its ConversionError names custom_bn.batch_norm_forward).
custom_translation_table = {torch.ops.custom_bn.batch_norm_eval.default: _batch_norm_eval}


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


def export(model: torch.nn.Module, args: tuple, f=None, **kwargs):
    """torch.onnx.export with custom_translation_table added (dynamo=True unless given), after
    checking that no batch norm of `model` is in training mode: raises this module's
    explanation where the dynamo exporter would fail on the training op with its own error."""
    training = [name for name, m in model.named_modules()
                if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]  # fmt: skip
    if training:
        raise RuntimeError(f"{_TRAINING_ERROR} (modules in training mode: {', '.join(training)})")
    table = {**custom_translation_table, **kwargs.pop("custom_translation_table", {})}
    kwargs.setdefault("dynamo", True)
    if kwargs["dynamo"]:
        kwargs["custom_translation_table"] = table
    return torch.onnx.export(model, args, f, **kwargs)


def register_symbolics() -> None:
    """Registers the symbolics of the TorchScript-based exporter (done on import)."""
    for name, symbolic in (
        ("batch_norm", _symbolic_batch_norm_op),
        ("batch_norm_relu", _symbolic_batch_norm_relu_op),
        ("batch_norm_eval", _symbolic_batch_norm_eval_op),
    ):
        torch.onnx.register_custom_op_symbolic(f"custom_bn::{name}", symbolic, SYMBOLIC_OPSET)


register_symbolics()

__all__ = ["SYMBOLIC_OPSET", "custom_translation_table", "export", "register_symbolics"]
