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
from torch.nn.modules.batchnorm import _BatchNorm

from .modules import _fx_leaf

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


class SyncBatchNorm(_BatchNorm):
    """As torch.nn.SyncBatchNorm (same constructor, state_dict, process_group and
    convert_sync_batchnorm), for any device whose process group can all-gather: CPU tensors
    over gloo as well as CUDA tensors over NCCL. Ranks may hold different batch sizes,
    including none. In eval, or with a single rank, it is the local op."""

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

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            leaf = _fx_leaf(self, input)
            if leaf is not None:
                return leaf
        self._check_input_dim(input)
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        use_running_stats = not self.training or self.track_running_stats
        running_mean = self.running_mean if use_running_stats else None
        running_var = self.running_var if use_running_stats else None
        updates = self.training and self.track_running_stats
        num_batches_tracked = self.num_batches_tracked if updates else None

        world_size = 1
        if use_batch_stats and self.training and dist.is_available() and dist.is_initialized():
            group = self.process_group or dist.group.WORLD
            world_size = dist.get_world_size(group)
        if world_size == 1:
            return ops.batch_norm(
                input,
                self.weight,
                self.bias,
                running_mean,
                running_var,
                use_batch_stats,
                self.momentum,
                self.eps,
                num_batches_tracked,
            )
        return _SyncBatchNormFunction.apply(
            input,
            self.weight,
            self.bias,
            running_mean,
            running_var,
            num_batches_tracked,
            self.momentum,
            self.eps,
            self.process_group or dist.group.WORLD,
            world_size,
        )

    @classmethod
    def convert_sync_batchnorm(
        cls, module: torch.nn.Module, process_group: dist.ProcessGroup | None = None
    ):
        """Replaces every BatchNorm layer (torch's or custom_bn's) in `module` by a
        SyncBatchNorm over `process_group`, keeping parameters, buffers and training mode."""
        converted = module
        if isinstance(module, _BatchNorm) and not isinstance(module, cls):
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
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        del module
        return converted
