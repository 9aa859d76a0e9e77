"""The activations the fused op applies, as its (min_val, max_val, negative_slope, activation)
arguments for each activation module that computes one (csrc/schemas.cpp): the
piecewise-linear ones through the first three, the smooth ones (SiLU, Hardswish, GELU) by name."""

import torch
from torch import Tensor, nn

PIECEWISE_LINEAR = "piecewise_linear"
SMOOTH = ("silu", "hardswish", "gelu")

# (min_val, max_val, negative_slope, activation): ReLU is the op's default.
Activation = tuple[float, float | None, float, str]
RELU: Activation = (0.0, None, 0.0, PIECEWISE_LINEAR)
IDENTITY: Activation = (0.0, None, 1.0, PIECEWISE_LINEAR)
SILU: Activation = (0.0, None, 0.0, "silu")
HARDSWISH: Activation = (0.0, None, 0.0, "hardswish")
GELU: Activation = (0.0, None, 0.0, "gelu")


def piecewise_linear(min_val: float, max_val: float | None, negative_slope: float) -> Activation:
    return (
        float(min_val),
        None if max_val is None else float(max_val),
        float(negative_slope),
        PIECEWISE_LINEAR,
    )


def fused_activation(module: nn.Module) -> Activation | None:
    """The fused op's arguments for `module` (ReLU, ReLU6, Hardtanh, LeakyReLU with a slope
    >= 0, Identity, SiLU, Hardswish, GELU without approximation), or None where it computes
    something else. Exact classes only: a subclass may change forward."""
    kind = type(module)
    if kind is nn.ReLU:
        return RELU
    if kind in (nn.ReLU6, nn.Hardtanh):
        return piecewise_linear(module.min_val, module.max_val, 0.0)
    if kind is nn.LeakyReLU and module.negative_slope >= 0:
        return piecewise_linear(0.0, None, module.negative_slope)
    if kind is nn.Identity:
        return IDENTITY
    if kind is nn.SiLU:
        return SILU
    if kind is nn.Hardswish:
        return HARDSWISH
    if kind is nn.GELU and module.approximate == "none":
        return GELU
    return None


def is_smooth(activation: Activation) -> bool:
    """A smooth activation: the fused op takes no residual with it."""
    return activation[3] != PIECEWISE_LINEAR


def apply_activation(v: Tensor, activation: Activation) -> Tensor:
    """What the fused op's activation computes, as torch's own function of it (ReLU, clamp for
    ReLU6 and hardtanh, leaky_relu, silu, hardswish, gelu), for a batch norm that runs
    unfused."""
    min_val, max_val, negative_slope, kind = activation
    if kind != PIECEWISE_LINEAR:
        return getattr(nn.functional, kind)(v)
    if negative_slope == 0:
        if min_val == 0 and max_val is None:
            return torch.relu(v)
        return torch.clamp(v, min_val, max_val)
    if min_val == 0:
        out = v if negative_slope == 1 else nn.functional.leaky_relu(v, negative_slope)
    else:
        out = torch.where(v <= min_val, min_val + negative_slope * (v - min_val), v)
    return out if max_val is None else torch.clamp(out, max=max_val)


def set_activation(module: nn.Module, activation: Activation) -> None:
    """Gives a fused module its activation, checked as the op checks it."""
    min_val, max_val, negative_slope, kind = activation
    if kind != PIECEWISE_LINEAR:
        if kind not in SMOOTH:
            raise ValueError(
                "activation must be one of 'piecewise_linear', 'silu', 'hardswish' or 'gelu', "
                f"but got {kind!r}"
            )
        if (min_val, max_val, negative_slope) != (0.0, None, 0.0):
            raise ValueError(
                "min_val, max_val and negative_slope describe a piecewise-linear activation; "
                f"with activation={kind!r} they must keep their defaults (0, None, 0), but got "
                f"({min_val}, {max_val}, {negative_slope})"
            )
    if not negative_slope >= 0:
        raise ValueError(
            "negative_slope must be >= 0 (the backward reads the activation's gradient from "
            f"the output), but got {negative_slope}"
        )
    if max_val is not None and min_val > max_val:
        raise ValueError(
            f"min_val cannot be greater than max_val, but got min_val={min_val} and "
            f"max_val={max_val}"
        )
    module.min_val = float(min_val)
    module.max_val = None if max_val is None else float(max_val)
    module.negative_slope = float(negative_slope)
    module.activation = kind


def set_inplace(module: nn.Module, inplace: bool) -> None:
    """Makes a fused module in place (batch_norm_relu_), which its activation must allow."""
    if inplace and module.activation != PIECEWISE_LINEAR:
        raise ValueError(
            f"{type(module).__name__}: inplace=True needs a piecewise-linear activation (one its "
            f"output inverts), but got activation={module.activation!r}"
        )
    module.inplace = bool(inplace)


def activation_of(module: nn.Module) -> Activation:
    return (module.min_val, module.max_val, module.negative_slope, module.activation)


def activation_repr(module: nn.Module) -> str:
    """The activation's part of a fused module's repr: nothing for a ReLU."""
    activation = activation_of(module)
    if activation == RELU:
        return ""
    if is_smooth(activation):
        return f", activation={module.activation!r}"
    return (
        f", min_val={module.min_val}, max_val={module.max_val}, "
        f"negative_slope={module.negative_slope}"
    )
