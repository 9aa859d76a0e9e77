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

from ._activation import Activation, activation_of, apply_activation, set_activation, set_inplace
from ._state import BatchNormState
from .convert import _timm
from .integrations.torch_nn import BatchNormBase, NormBase
from .modules import BatchNormReLU2d, _FusedActivation2d, _fx_leaf

ops = torch.ops.custom_bn


def _global_statistics(input, running, ranks):
    """(mean, invstd, counts) of the batch over every rank of the group: the local (count,
    mean, M2) all-gathered and merged, which also updates the running stats. `running` is
    (running_mean, running_var, num_batches_tracked, momentum, eps), `ranks` (process group,
    its size)."""
    process_group, world_size = ranks
    count, mean, m2 = ops.batch_norm_stats(input)
    local = torch.cat([count, mean, m2])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local, group=process_group)
    stats = torch.stack(gathered)
    channels = mean.numel()
    counts, means, m2s = stats[:, 0], stats[:, 1 : channels + 1], stats[:, channels + 1 :]
    mean, invstd = ops.batch_norm_gather_stats_with_counts(means, m2s, counts, *running)
    return mean, invstd, counts


def _all_reduce_sums(sum_dy, sum_dy_xmu, ranks):
    sums = torch.cat([sum_dy, sum_dy_xmu])
    dist.all_reduce(sums, dist.ReduceOp.SUM, group=ranks[0])
    return sums.chunk(2)


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, weight, bias, running, ranks):
        mean, invstd, counts = _global_statistics(input, running, ranks)
        ctx.save_for_backward(input, weight, mean, invstd, counts)
        ctx.ranks = ranks
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
            sum_dy, sum_dy_xmu = _all_reduce_sums(sum_dy, sum_dy_xmu, ctx.ranks)
            grad_input = ops.batch_norm_backward_elemt(
                grad_output, input, mean, invstd, weight, sum_dy, sum_dy_xmu, counts
            )
        return grad_input, grad_weight, grad_bias, None, None


class _SyncBatchNormReLUInplaceFunction(torch.autograd.Function):
    """In-place activated batch norm over the ranks (inplace_abn's InPlaceABNSync): writes
    act(sync_batch_norm(input) + residual) over input and keeps what batch_norm_relu_ keeps,
    the output, the residual and the input values the output cannot give back.

    The backward recovers the normalized input x_hat from them (batch_norm_relu_normalized_input),
    then runs SyncBatchNorm's backward on x_hat with mean 0, invstd 1 and weight * invstd, the
    same gradient: the sums of dz and dz * x_hat all-reduced, dz the activation's gradient."""

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running, activation, ranks):
        mean, invstd, counts = _global_statistics(input, running, ranks)
        # The forward stage op normalizes with given statistics in evaluation mode, which takes
        # them as a variance (its invstd is rsqrt(variance + eps) again, to a rounding), and the
        # parameters in their dtype.
        eps = running[4]
        variance = (invstd.double().pow(-2) - eps).to(invstd.dtype)
        ctx.parameter_dtype = input.dtype if weight is None else weight.dtype
        weight, bias = (None if p is None else p.to(mean.dtype) for p in (weight, bias))
        min_val, max_val, negative_slope = activation
        _, _, kept_input = ops.batch_norm_relu_forward_(
            input,
            weight,
            bias,
            running_mean=mean,
            running_var=variance,
            num_batches_tracked=None,
            residual=residual,
            training=False,
            momentum=None,
            eps=eps,
            min_val=min_val,
            max_val=max_val,
            negative_slope=negative_slope,
            keep_input=any(ctx.needs_input_grad),
        )
        ctx.mark_dirty(input)
        ctx.save_for_backward(input, kept_input, weight, bias, residual, mean, invstd, counts)
        ctx.activation, ctx.ranks = activation, ranks
        return input

    @staticmethod
    def backward(ctx, grad_output):
        output, kept_input, weight, bias, residual, mean, invstd, counts = ctx.saved_tensors
        x_hat = ops.batch_norm_relu_normalized_input(
            output, kept_input, weight, bias, residual, mean, invstd, *ctx.activation
        )
        dtype = x_hat.dtype
        scale = invstd if weight is None else weight * invstd
        zeros, ones = torch.zeros_like(invstd), torch.ones_like(invstd)
        # Evaluation mode on x_hat with mean 0 and variance 1: the residual's gradient is dz,
        # the weight's sum(dz * x_hat) and the bias' sum(dz).
        min_val, max_val, negative_slope = ctx.activation
        _, sum_dz_x_hat, sum_dz, dz = ops.batch_norm_relu_backward(
            grad_output.to(dtype),
            output.to(dtype),
            input=x_hat,
            weight=scale,
            running_mean=zeros,
            running_var=ones,
            save_mean=zeros[:0],
            save_invstd=zeros[:0],
            training=False,
            eps=0.0,
            output_mask=[False, True, True, True],
            min_val=min_val,
            max_val=max_val,
            negative_slope=negative_slope,
        )
        input_g, weight_g, bias_g, residual_g = ctx.needs_input_grad[:4]
        grad_input = grad_weight = grad_bias = grad_residual = None
        if input_g:
            sum_dy, sum_dy_xmu = _all_reduce_sums(sum_dz, sum_dz_x_hat, ctx.ranks)
            grad_input = ops.batch_norm_backward_elemt(
                dz, x_hat, zeros, ones, scale, sum_dy, sum_dy_xmu, counts
            ).to(output.dtype)
        if weight_g:
            grad_weight = sum_dz_x_hat.to(ctx.parameter_dtype)
        if bias_g:
            grad_bias = sum_dz.to(ctx.parameter_dtype)
        if residual_g:
            grad_residual = dz.to(residual.dtype)
        return grad_input, grad_weight, grad_bias, grad_residual, None, None, None


def _synchronization(module: torch.nn.Module, input: Tensor):
    """The op arguments of `module` for `input`, and in training with batch statistics over
    several ranks, (weight, bias, running, ranks) for the functions above; else None (then
    the local op runs)."""
    module._check_input_dim(input)
    if input.size(1) == 0:
        raise ValueError("SyncBatchNorm number of input channels should be non-zero")
    arguments = BatchNormState._op_arguments(module)
    weight, bias, running_mean, running_var, use_batch_stats, momentum, eps, counter = arguments
    if not (use_batch_stats and module.training and dist.is_available() and dist.is_initialized()):
        return arguments, None
    group = module.process_group or dist.group.WORLD
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return arguments, None
    running = (running_mean, running_var, counter, momentum, eps)
    return arguments, (weight, bias, running, (group, world_size))


def _sync_batch_norm(module: torch.nn.Module, input: Tensor) -> Tensor:
    """Batch norm over the ranks of `module.process_group` (or the world) in training; the
    local op in eval and with a single rank."""
    arguments, synchronized = _synchronization(module, input)
    if synchronized is None:
        return ops.batch_norm(input, *arguments)
    weight, bias, running, ranks = synchronized
    return _SyncBatchNormFunction.apply(input, weight, bias, running, ranks)


def sync_batch_norm_relu_(
    module: torch.nn.Module, input: Tensor, residual: Tensor | None, activation: Activation
) -> Tensor:
    """act(sync_batch_norm(input) + residual) of synchronized batch norm `module`, written over
    input (in-place activated batch norm over the ranks), act piecewise linear; as
    _sync_batch_norm, batch_norm_relu_ in eval and with a single rank."""
    arguments, synchronized = _synchronization(module, input)
    if synchronized is None:
        return ops.batch_norm_relu_(input, *arguments, residual, *activation[:3])
    weight, bias, running, ranks = synchronized
    return _SyncBatchNormReLUInplaceFunction.apply(
        input, weight, bias, residual, running, activation[:3], ranks
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
    """torch.nn.SyncBatchNorm's constructor: batch norm's options and a process group (then
    the keywords of a fused module's activation, for SyncBatchNormReLU2d)."""

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
        **activation,
    ):
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device=device,
            dtype=dtype,
            **activation,
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
        the activation of fused layers: BatchNormReLU2d becomes SyncBatchNormReLU2d (in place if it
        was), and
        timm's BatchNormAct2d a SyncBatchNormAct (custom_bn.integrations.timm)."""
        converted = module
        timm = _timm()
        if type(module) is BatchNormReLU2d:
            converted = _sync_options(SyncBatchNormReLU2d, module, process_group)
            set_activation(converted, activation_of(module))
            set_inplace(converted, module.inplace)
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
    with BatchNormReLU2d's activation keywords (a ReLU by default) and `inplace`; converted from
    a BatchNormReLU2d, it keeps that module's. Not a torch `_BatchNorm`, for the reason
    BatchNormReLU2d is not.

    `inplace=True` is in-place activated batch norm over the ranks (inplace_abn's
    InPlaceABNSync): the output overwrites the input, and the backward keeps only what
    batch_norm_relu_ keeps, the output, the residual and the input values the output cannot
    give back; the batch statistics and gradient sums are those of SyncBatchNorm."""

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        leaf = _fx_leaf(self, input) if residual is None else _fx_leaf(self, input, residual)
        if leaf is not None:
            return leaf
        if self.inplace:
            return sync_batch_norm_relu_(self, input, residual, activation_of(self))
        output = _sync_batch_norm(self, input)
        output = output if residual is None else output + residual
        return apply_activation(output, activation_of(self))
