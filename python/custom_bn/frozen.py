"""FrozenBatchNorm2d: batch norm with fixed statistics and affine parameters, as torchvision's."""

import torch
from torch import Tensor

from ._state import registered
from .integrations.torch_nn import NormBase
from .modules import _fx_leaf

_FROZEN_TENSORS = ("weight", "bias", "running_mean", "running_var")


class FrozenBatchNorm2d(torch.nn.Module):
    """Batch norm whose statistics and affine parameters never change, as
    torchvision.ops.FrozenBatchNorm2d (the backbones of detection models use it): always the
    running statistics, through the eval kernel, also after a parent's .train(). weight, bias,
    running_mean and running_var are buffers, so nothing requires grad; the state_dict loads
    from and into torchvision's FrozenBatchNorm2d and torch.nn.BatchNorm2d (whose
    num_batches_tracked it ignores). eps may be 0, as torchvision's detection models set it."""

    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            leaf = _fx_leaf(self, input)
            if leaf is not None:
                return leaf
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")
        if not torch.jit.is_scripting():
            weight, bias, mean, var = registered(self, _FROZEN_TENSORS)
        else:
            weight, bias, mean, var = self.weight, self.bias, self.running_mean, self.running_var
        return torch.ops.custom_bn.batch_norm(input, weight, bias, mean, var, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def frozen_state(source: torch.nn.Module) -> dict[str, Tensor]:
    """Copies of a batch norm's weight, bias and running statistics, each at its own dtype and
    device (a float64 model stays float64); ones and zeros where it has no affine parameters."""
    if source.running_mean is None:
        raise ValueError(
            f"convert_batchnorm(frozen=True): expected batch norm with running statistics to "
            f"freeze, but got {source} (track_running_stats=False)"
        )
    mean = source.running_mean.detach()
    weight = torch.ones_like(mean) if source.weight is None else source.weight.detach().clone()
    bias = torch.zeros_like(mean) if source.bias is None else source.bias.detach().clone()
    return {
        "weight": weight,
        "bias": bias,
        "running_mean": mean.clone(),
        "running_var": source.running_var.detach().clone(),
    }


def freeze(source: NormBase | torch.nn.Module) -> FrozenBatchNorm2d:
    """A FrozenBatchNorm2d with the current statistics and affine parameters of `source` (a
    2-D batch norm, or torchvision's FrozenBatchNorm2d), at their dtypes and device."""
    state = frozen_state(source)
    frozen = FrozenBatchNorm2d(state["running_mean"].numel(), source.eps, device="meta")
    frozen._buffers.update(state)
    return frozen
