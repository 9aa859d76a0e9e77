"""custom_bn's ops written as torch operations: the one reference implementation of their
math in Python. TorchInductor compiles batch norm from it (custom_bn.integrations.inductor
registers it as the ops' decompositions) and the tests compare the kernels against it.

Each function takes its op's arguments by name (custom_bn.op_table binds a call's arguments
to them). Each computes what our CPU and CUDA kernels compute (csrc/batch_norm_math.h), in
their compute type: float32 for reduced-precision input, float64 for float64 input, rounded
once to the result's dtype. The kernels reduce in double where these reduce in the compute
type, so results agree to the per-dtype tolerances of the parity tests, not bitwise.
"""

from typing import Any

import torch
from torch import Tensor

from .op_table import signature


def _compute_dtype(input: Tensor) -> torch.dtype:
    return torch.promote_types(input.dtype, torch.float32)


def _per_channel(values: Tensor, input: Tensor) -> Tensor:
    """A (C,) tensor shaped to broadcast along dim 1 of input."""
    return values.view([1, -1] + [1] * (input.dim() - 2))


def _reduced_dims(input: Tensor) -> list[int]:
    return [0, *range(2, input.dim())]


def _values_per_channel(input: Tensor) -> int:
    return input.numel() // input.shape[1]


_SMOOTH_BACKWARD = {
    "silu": torch.ops.aten.silu_backward.default,
    "hardswish": torch.ops.aten.hardswish_backward.default,
    "gelu": torch.ops.aten.gelu_backward.default,
}


def _activate(
    v: Tensor,
    min_val: float,
    max_val: float | None,
    negative_slope: float,
    activation: str = "piecewise_linear",
) -> Tensor:
    """The fused ops' activation (csrc/batch_norm_math.h: activate): a smooth one by name, or
    the piecewise-linear one: v inside (min_val, max_val), min_val + negative_slope * (v -
    min_val) at or below min_val (min_val itself with slope 0), max_val at or above max_val.
    NaN passes through."""
    if activation != "piecewise_linear":
        return getattr(torch.nn.functional, activation)(v)
    if negative_slope == 0:
        below = torch.full_like(v, min_val)
    else:
        below = min_val + negative_slope * (v - min_val)
    out = torch.where(v <= min_val, below, v)
    return out if max_val is None else torch.where(v >= max_val, torch.full_like(v, max_val), out)


def _activation_grad(
    grad: Tensor, output: Tensor, min_val: float, max_val: float | None, negative_slope: float
) -> Tensor:
    """grad times the activation's derivative read from its output (csrc/batch_norm_math.h:
    activation_grad): 1 above min_val, negative_slope at or below it, 0 at or above max_val."""
    below = torch.zeros_like(grad) if negative_slope == 0 else grad * negative_slope
    dz = torch.where(output > min_val, grad, below)
    return dz if max_val is None else torch.where(output >= max_val, torch.zeros_like(grad), dz)


def _normalize(
    input: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    relu: bool,
    residual: Tensor | None,
    min_val: float = 0.0,
    max_val: float | None = None,
    negative_slope: float = 0.0,
    activation: str = "piecewise_linear",
) -> Tensor:
    """act?((input - mean) * invstd * weight + bias + residual), as the kernels' normalize pass."""
    compute = mean.dtype
    scale = invstd if weight is None else invstd * weight.to(compute)
    out = (input.to(compute) - _per_channel(mean, input)) * _per_channel(scale, input)
    if bias is not None:
        out = out + _per_channel(bias.to(compute), input)
    if residual is not None:
        out = out + residual.to(compute)
    if relu:
        out = _activate(out, min_val, max_val, negative_slope, activation)
    return out.to(input.dtype)


def batch_norm_eval(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    relu: bool = False,
    residual: Tensor | None = None,
    min_val: float = 0.0,
    max_val: float | None = None,
    negative_slope: float = 0.0,
    activation: str = "piecewise_linear",
) -> Tensor:
    compute = _compute_dtype(input)
    invstd = torch.rsqrt(running_var.to(compute) + eps)
    activation = (min_val, max_val, negative_slope, activation)
    return _normalize(
        input, running_mean.to(compute), invstd, weight, bias, relu, residual, *activation
    )


def _update_running_stats(
    mean: Tensor,
    biased_var: Tensor,
    count: int,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor | None,
    momentum: float | None,
) -> None:
    """(1 - m) * running + m * batch, with the unbiased variance; m = 1 / num_batches_tracked
    (already incremented) for momentum=None. Written in place, as the kernels write them."""
    if momentum is None:
        factor = num_batches_tracked.to(torch.float64).reciprocal().to(mean.dtype)
    else:
        factor = momentum
    unbiased_var = biased_var * count / (count - 1)
    new_mean = (1 - factor) * running_mean.to(mean.dtype) + factor * mean
    new_var = (1 - factor) * running_var.to(mean.dtype) + factor * unbiased_var
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)


def _forward(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    relu: bool,
    residual: Tensor | None = None,
    min_val: float = 0.0,
    max_val: float | None = None,
    negative_slope: float = 0.0,
    activation: str = "piecewise_linear",
) -> tuple[Tensor, Tensor, Tensor]:
    compute = _compute_dtype(input)
    activation = (min_val, max_val, negative_slope, activation)
    if not training:
        empty = input.new_empty((0,), dtype=compute)
        out = batch_norm_eval(
            input, weight, bias, running_mean, running_var, eps, relu, residual, *activation
        )
        return out, empty, empty
    if running_mean is not None and num_batches_tracked is not None:
        num_batches_tracked.add_(1)  # also for an empty batch, as torch's module counts it
    count = _values_per_channel(input)
    if count == 0:
        zeros = input.new_zeros((input.shape[1],), dtype=compute)
        return torch.empty_like(input), zeros, zeros
    biased_var, mean = torch.var_mean(input.to(compute), dim=_reduced_dims(input), correction=0)
    invstd = torch.rsqrt(biased_var + eps)
    if running_mean is not None:
        _update_running_stats(
            mean, biased_var, count, running_mean, running_var, num_batches_tracked, momentum
        )
    out = _normalize(input, mean, invstd, weight, bias, relu, residual, *activation)
    return out, mean, invstd


def batch_norm_forward(**arguments: Any) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(**arguments, relu=False)


def batch_norm_relu_forward(**arguments: Any) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(**arguments, relu=True)


def batch_norm_relu_forward_(keep_input: bool, **arguments: Any) -> tuple[Tensor, Tensor, Tensor]:
    """In place: batch_norm_relu_forward's output written over the input. kept_input is the
    whole input, in order, which the backward op reads as such (it has the output's number of
    elements); the kernels keep only the values their backward cannot recover (a number that
    depends on the data, which a compiler's graph would have to carry as a symbol)."""
    input = arguments["input"]
    out, mean, invstd = _forward(**arguments, relu=True)
    kept = input.reshape(-1).clone() if keep_input else input.new_empty((0,))
    input.copy_(out)
    return mean, invstd, kept


def batch_norm(**arguments: Any) -> Tensor:
    return _forward(**arguments, relu=False)[0]


def batch_norm_relu(**arguments: Any) -> Tensor:
    return _forward(**arguments, relu=True)[0]


def _backward_stats(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """(mean, invstd) a backward normalizes with, in the compute type: the batch's saved ones
    in training, the running ones in eval."""
    compute = _compute_dtype(input)
    if training:
        return save_mean.to(compute), save_invstd.to(compute)
    return running_mean.to(compute), torch.rsqrt(running_var.to(compute) + eps)


def batch_norm_backward(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    save_mean: Tensor,
    save_invstd: Tensor,
    training: bool,
    eps: float,
    output_mask: list[bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of input, weight and bias: the kernels' sums of dy and dy * (x - mean), then
    grad_x = a * (dy - mean(dy)) + b * (x - mean) with their per-channel coefficients."""
    compute = _compute_dtype(input)
    mean, invstd = _backward_stats(
        input, running_mean, running_var, save_mean, save_invstd, training, eps
    )
    dy = grad_output.to(compute)
    centred = input.to(compute) - _per_channel(mean, input)
    dims = _reduced_dims(input)
    sum_dy = dy.sum(dims)
    sum_dy_xmu = (dy * centred).sum(dims)
    param_dtype = input.dtype if weight is None else weight.dtype
    need_input, need_weight, need_bias = output_mask
    grad_input = None
    if need_input:
        scale = invstd if weight is None else invstd * weight.to(compute)
        count = _values_per_channel(input)
        if training and count > 0:
            k = sum_dy_xmu / count * invstd * invstd
            grad = _per_channel(scale, input) * (dy - _per_channel(sum_dy / count, input))
            grad = grad + _per_channel(-k * scale, input) * centred
        else:
            grad = _per_channel(scale, input) * dy
        grad_input = grad.to(input.dtype)
    grad_weight = (sum_dy_xmu * invstd).to(param_dtype) if need_weight else None
    grad_bias = sum_dy.to(param_dtype) if need_bias else None
    return grad_input, grad_weight, grad_bias


def batch_norm_relu_backward(
    output: Tensor,
    grad_output: Tensor,
    output_mask: list[bool],
    min_val: float = 0.0,
    max_val: float | None = None,
    negative_slope: float = 0.0,
    activation: str = "piecewise_linear",
    bias: Tensor | None = None,
    **arguments: Any,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
    """The activation's gradient, which is also the residual's, then batch norm's backward of
    it: read from the output for a piecewise-linear activation; for a smooth one taken at the
    pre-activation, recomputed from the input (csrc/batch_norm_math.h: activation_grad_at) and
    rounded to the gradient's dtype as the kernels write it."""
    if activation == "piecewise_linear":
        masked = _activation_grad(grad_output, output, min_val, max_val, negative_slope)
    else:
        masked = _smooth_activation_grad(grad_output, activation, bias, arguments)
    *batch_norm_mask, need_residual = output_mask
    grads = batch_norm_backward(grad_output=masked, output_mask=batch_norm_mask, **arguments)
    return (*grads, masked if need_residual else None)


def _smooth_activation_grad(
    grad_output: Tensor, activation: str, bias: Tensor | None, arguments: dict[str, Any]
) -> Tensor:
    """batch_norm_backward's arguments give the pre-activation as the forward computed it."""
    input, weight = arguments["input"], arguments["weight"]
    compute = _compute_dtype(input)
    mean, invstd = _backward_stats(
        input,
        arguments["running_mean"],
        arguments["running_var"],
        arguments["save_mean"],
        arguments["save_invstd"],
        arguments["training"],
        arguments["eps"],
    )
    scale = invstd if weight is None else invstd * weight.to(compute)
    z = (input.to(compute) - _per_channel(mean, input)) * _per_channel(scale, input)
    if bias is not None:
        z = z + _per_channel(bias.to(compute), input)
    backward = _SMOOTH_BACKWARD[activation]
    return backward(grad_output.to(compute), z).to(grad_output.dtype)


def run(name: str, *args: Any, **kwargs: Any) -> Any:
    """What `torch.ops.custom_bn.<name>(*args, **kwargs)` computes, by this module's function
    of that name (the tests' reference; inductor's decompositions are these, adapted so)."""
    return signature(name).adapt(globals()[name])(*args, **kwargs)
