"""The activations the fused op applies: its piecewise-linear (min_val, max_val,
negative_slope) arguments for each activation module that has them (csrc/schemas.cpp)."""

import torch
from torch import Tensor, nn

# (min_val, max_val, negative_slope): ReLU is the op's default.
Activation = tuple[float, float | None, float]
RELU: Activation = (0.0, None, 0.0)
IDENTITY: Activation = (0.0, None, 1.0)


def fused_activation(module: nn.Module) -> Activation | None:
    """The fused op's arguments for `module` (ReLU, ReLU6, Hardtanh, LeakyReLU with a slope
    >= 0, Identity), or None where it computes something else. Exact classes only: a subclass
    may change forward."""
    kind = type(module)
    if kind is nn.ReLU:
        return RELU
    if kind in (nn.ReLU6, nn.Hardtanh):
        return (float(module.min_val), float(module.max_val), 0.0)
    if kind is nn.LeakyReLU and module.negative_slope >= 0:
        return (0.0, None, float(module.negative_slope))
    if kind is nn.Identity:
        return IDENTITY
    return None


def apply_activation(v: Tensor, activation: Activation) -> Tensor:
    """What the fused op's activation computes, as torch's own function of it (ReLU, clamp for
    ReLU6 and hardtanh, leaky_relu), for a batch norm that runs unfused."""
    min_val, max_val, negative_slope = activation
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
    min_val, max_val, negative_slope = activation
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


def activation_of(module: nn.Module) -> Activation:
    return (module.min_val, module.max_val, module.negative_slope)


def activation_repr(module: nn.Module) -> str:
    """The activation's part of a fused module's repr: nothing for a ReLU."""
    if activation_of(module) == RELU:
        return ""
    return (
        f", min_val={module.min_val}, max_val={module.max_val}, "
        f"negative_slope={module.negative_slope}"
    )
