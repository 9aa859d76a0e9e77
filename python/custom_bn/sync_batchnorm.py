"""SyncBatchNorm on the custom_bn stage ops: batch statistics over every rank of a process
group, on CPU over gloo as on GPUs over NCCL.

Forward: local (count, mean, M2) -> one all-gather -> parallel Welford merge (which also
updates the running stats) -> elementwise normalize. Backward: local (sum_dy, sum_dy_xmu)
-> one all-reduce -> elementwise input gradient. Weight and bias gradients stay local, as
in torch.nn.SyncBatchNorm, so that DistributedDataParallel averages them.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from ._activation import activation_of, apply_activation, set_activation
from ._state import BatchNormState
from .convert import _timm
from .integrations.torch_nn import BatchNormBase, NormBase
from .modules import BatchNormReLU2d, _FusedActivation2d, _fx_leaf

ops = torch.ops.custom_bn


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        input,
        weight,
        bias,
        running_mean,
        running_var,
        num_batches_tracked,
        momentum,
        eps,
        process_group,
        world_size,
    ):
        count, mean, m2 = ops.batch_norm_stats(input)
        local = torch.cat([count, mean, m2])
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        stats = torch.stack(gathered)
        channels = mean.numel()
        counts, means, m2s = stats[:, 0], stats[:, 1 : channels + 1], stats[:, channels + 1 :]
        mean, invstd = ops.batch_norm_gather_stats_with_counts(
            means, m2s, counts, running_mean, running_var, num_batches_tracked, momentum, eps
        )
        ctx.save_for_backward(input, weight, mean, invstd, counts)
        ctx.process_group = process_group
        return ops.batch_norm_elemt(input, weight, bias, mean, invstd)

    @staticmethod
    def backward(ctx, grad_output):
        input, weight, mean, invstd, counts = ctx.saved_tensors
        input_g, weight_g, bias_g = ctx.needs_input_grad[:3]
        sum_dy, sum_dy_xmu, grad_weight, grad_bias = ops.batch_norm_backward_reduce(
            grad_output, input, mean, invstd, weight, input_g, weight_g, bias_g
        )
        grad_input = None
        if input_g:
            sums = torch.cat([sum_dy, sum_dy_xmu])
            dist.all_reduce(sums, dist.ReduceOp.SUM, group=ctx.process_group)
            sum_dy, sum_dy_xmu = sums.chunk(2)
            grad_input = ops.batch_norm_backward_elemt(
                grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, counts
            )
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None


def _sync_batch_norm(module: torch.nn.Module, input: Tensor) -> Tensor:
    """Batch norm over the ranks of `module.process_group` (or the world) in training; the
    local op in eval and with a single rank."""
    module._check_input_dim(input)
    if input.size(1) == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    arguments = BatchNormState._op_arguments(module)
    weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, counter = arguments
    world_size = 1
    if use_batch_stats and module.training and dist.is_available() and dist.is_initialized():
        group = module.process_group or dist.group.WORLD
        world_size = dist.get_world_size(group)
    if world_size == 1:
        return ops.batch_norm(input, *arguments)
    group = module.process_group or dist.group.WORLD
    return _SyncBatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, counter, momentum, eps, group, world_size
    )


def _sync_options(cls: type, module: torch.nn.Module, process_group) -> torch.nn.Module:
    """A `cls` over the very parameters and buffers of batch norm `module`, in its mode."""
    converted = cls(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        process_group,
    )
    if module.affine:
        with torch.no_grad():
            converted.weight = module.weight
            converted.bias = module.bias
    converted.running_mean = module.running_mean
    converted.running_var = module.running_var
    converted.num_batches_tracked = module.num_batches_tracked
    converted.training = module.training
    if hasattr(module, "qconfig"):
        converted.qconfig = module.qconfig
    return converted


class _Synchronized:
    """torch.nn.SyncBatchNorm's constructor: batch norm's options and a process group."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: dist.ProcessGroup | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group


class SyncBatchNorm(_Synchronized, BatchNormState, BatchNormBase):
    """As torch.nn.SyncBatchNorm (same constructor, state_dict, process_group and
    convert_sync_batchnorm), for any device whose process group can all-gather: CPU tensors
    over gloo as well as CUDA tensors over NCCL. Ranks may hold different batch sizes,
    including none. In eval, or with a single rank, it is the local op."""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        leaf = _fx_leaf(self, input)
        if leaf is not None:
            return leaf
        return _sync_batch_norm(self, input)

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: dist.ProcessGroup | None = None
    ):
        """Replaces every batch norm layer (torch's or custom_bn's) in `module` by a
        synchronized one over `process_group`, keeping parameters, buffers, training mode and
        the activation of fused layers: BatchNormReLU2d becomes SyncBatchNormReLU2d, and
        timm's BatchNormAct2d a SyncBatchNormAct (custom_bn.integrations.timm)."""
        converted = module
        timm = _timm()
        if type(module) is BatchNormReLU2d:
            converted = _sync_options(SyncBatchNormReLU2d, module, process_group)
            set_activation(converted, activation_of(module))
        elif timm is not None and isinstance(module, timm.BATCH_NORM_ACT):
            if not isinstance(module, timm.SyncBatchNormAct):
                converted = _sync_options(timm.SyncBatchNormAct, module, process_group)
                converted.drop, converted.act = module.drop, module.act
        elif isinstance(module, BatchNormBase) and not isinstance(module, SyncBatchNorm):
            converted = _sync_options(cls, module, process_group)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return converted


class SyncBatchNormReLU2d(_Synchronized, _FusedActivation2d, BatchNormState, NormBase):
    """BatchNormReLU2d synchronized as SyncBatchNorm: act(sync_batch_norm(input) + residual),
    with the activation of the BatchNormReLU2d it was converted from (a ReLU when made
    directly). Not a torch `_BatchNorm`, for the reason BatchNormReLU2d is not."""

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        leaf = _fx_leaf(self, input) if residual is None else _fx_leaf(self, input, residual)
        if leaf is not None:
            return leaf
        output = _sync_batch_norm(self, input)
        output = output if residual is None else output + residual
        return apply_activation(output, activation_of(self))
