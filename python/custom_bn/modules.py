"""Drop-ins for torch.nn.BatchNorm{1,2,3}d: same constructor, state_dict and behaviour; the
forward is one call of torch.ops.custom_bn.batch_norm."""

import torch
from torch import Tensor

from ._activation import activation_repr, set_activation, set_inplace
from ._state import BatchNormState
from .integrations.torch_nn import BatchNormBase, NormBase


def _fx_leaf(module: torch.nn.Module, *args: object) -> torch.fx.Proxy | None:
    """While torch.fx traces a model, the call_module node for this call of `module`, as
    torch.fx records for a leaf module; None outside tracing and for the traced root itself.

    torch.fx keeps modules from torch.nn as leaves and traces through all others; ours ask to
    be leaves themselves, so that a traced model keeps them (and their training flag) as it
    keeps torch's batch norm, and passes that match modules by their target (fusion,
    quantization) see them."""
    if not isinstance(args[0], torch.fx.Proxy):
        return None
    tracer = args[0].tracer
    if module is tracer.root:
        return None
    return tracer.create_proxy("call_module", tracer.path_of_module(module), args, {})


class _CustomBatchNorm(BatchNormState, BatchNormBase):
    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            leaf = _fx_leaf(self, input)
            if leaf is not None:
                return leaf
        self._check_input_dim(input)
        return torch.ops.custom_bn.batch_norm(input, *self._op_arguments())


# Subclasses of torch's own classes, so that code asking isinstance(m, nn.BatchNorm2d) (init
# loops, weight-decay filters, timm's freeze and reparameterize helpers) treats ours as batch
# norm; torch's classes give _check_input_dim.
class BatchNorm1d(_CustomBatchNorm, torch.nn.BatchNorm1d):
    """As torch.nn.BatchNorm1d, on (N, C) or (N, C, L) input."""


class BatchNorm2d(_CustomBatchNorm, torch.nn.BatchNorm2d):
    """As torch.nn.BatchNorm2d, on (N, C, H, W) input."""


class BatchNorm3d(_CustomBatchNorm, torch.nn.BatchNorm3d):
    """As torch.nn.BatchNorm3d, on (N, C, D, H, W) input."""


class _FusedActivation2d:
    """What the fused modules (BatchNormReLU2d, SyncBatchNormReLU2d) share: their activation,
    a ReLU by default (also for a module pickled before the activation existed), shown in the
    repr when it is another, given by the keywords below after the batch norm's own
    arguments; `inplace`; 4-D input."""

    min_val: float = 0.0
    max_val: float | None = None
    negative_slope: float = 0.0
    activation: str = "piecewise_linear"
    inplace: bool = False

    def __init__(
        self,
        *args,
        min_val: float = 0.0,
        max_val: float | None = None,
        negative_slope: float = 0.0,
        activation: str = "piecewise_linear",
        inplace: bool = False,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        set_activation(self, (min_val, max_val, negative_slope, activation))
        set_inplace(self, inplace)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + activation_repr(self)
            + (", inplace=True" if self.inplace else "")
        )

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNormReLU2d(_FusedActivation2d, BatchNormState, NormBase):
    """act(BatchNorm2d(input) + residual) as one fused op, torch.ops.custom_bn.batch_norm_relu:
    one pass forward, one backward, and no activation saved beyond the output. The state and
    constructor are BatchNorm2d's (num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, device=None, dtype=None: the same state_dict as
    torch.nn.BatchNorm2d); act is a ReLU unless the keywords say otherwise, as the op takes
    them: ReLU6 is `max_val=6`, Hardtanh(a, b) `min_val=a, max_val=b`, LeakyReLU(s)
    `negative_slope=s` (s >= 0), or a smooth one by name: `activation="silu"`, `"hardswish"`
    or `"gelu"` (then no residual).

    `inplace=True` (piecewise-linear activations only) writes the output over the input and
    keeps for the backward only the output, the residual and the input values the output
    cannot give back (torch.ops.custom_bn.batch_norm_relu_, in-place activated batch norm): the
    memory of one activation per layer. As with torch's in-place ops, the input must be a
    tensor nothing else needs (a convolution's output), not a leaf that requires grad.

    It is deliberately not a torch `_BatchNorm`: SyncBatchNorm converters (torch's, timm's,
    Lightning's) take every `_BatchNorm` for a plain batch norm and would drop the activation.
    custom_bn.SyncBatchNorm.convert_sync_batchnorm turns it into SyncBatchNormReLU2d."""

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if not torch.jit.is_scripting():
            leaf = _fx_leaf(self, input) if residual is None else _fx_leaf(self, input, residual)
            if leaf is not None:
                return leaf
        self._check_input_dim(input)
        if self.inplace:
            return torch.ops.custom_bn.batch_norm_relu_(
                input,
                *self._op_arguments(),
                residual,
                self.min_val,
                self.max_val,
                self.negative_slope,
            )
        return torch.ops.custom_bn.batch_norm_relu(
            input,
            *self._op_arguments(),
            residual,
            self.min_val,
            self.max_val,
            self.negative_slope,
            self.activation,
        )


class LazyBatchNorm1d(_CustomBatchNorm, torch.nn.LazyBatchNorm1d):
    """As torch.nn.LazyBatchNorm1d: num_features from the first input, then a BatchNorm1d of
    ours."""

    cls_to_become = BatchNorm1d


class LazyBatchNorm2d(_CustomBatchNorm, torch.nn.LazyBatchNorm2d):
    """As torch.nn.LazyBatchNorm2d, becoming custom_bn.BatchNorm2d."""

    cls_to_become = BatchNorm2d


class LazyBatchNorm3d(_CustomBatchNorm, torch.nn.LazyBatchNorm3d):
    """As torch.nn.LazyBatchNorm3d, becoming custom_bn.BatchNorm3d."""

    cls_to_become = BatchNorm3d


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _retype(bn: BatchNormBase, cls: type[BatchNormBase]) -> BatchNormBase:
    """A `cls` batch norm over the same attributes, parameters and buffers (the very tensors:
    optimizers and other references to them keep working), training mode and device."""
    retyped = cls.__new__(cls)
    retyped.__dict__.update(bn.__dict__)
    retyped._parameters = dict(bn._parameters)
    retyped._buffers = dict(bn._buffers)
    retyped._modules = dict(bn._modules)
    return retyped
