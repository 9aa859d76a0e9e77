"""Functional interface, as torch.nn.functional."""

import torch
from torch import Tensor

from ._state import check_eps


def _verify_batch_size(size: list[int]) -> None:
    values_per_channel = size[0]
    for s in size[2:]:
        values_per_channel *= s
    if values_per_channel == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.batch_norm, computed by the custom_bn ops."""
    if training:
        _verify_batch_size(list(input.size()))
    check_eps(eps)
    return torch.ops.custom_bn.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )
