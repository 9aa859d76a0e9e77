"""Drop-ins for torch.nn.BatchNorm{1,2,3}d: same constructor, state_dict and behaviour; the
forward is one call of torch.ops.custom_bn.batch_norm."""

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm


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


_ABSENT = object()


def _registered(module: torch.nn.Module, names: tuple[str, ...]) -> list[Tensor | None]:
    """The parameters and buffers `names` of `module`, as `module.<name>` would give them.

    Read from the module's own tables in eager Python: `module.weight` reaches
    nn.Module.__getattr__ only after Python's own attribute lookup has failed, and that
    failure costs about 2 us a name, more than the kernel of many a small layer. A name not in
    its table (a parametrization replaces a parameter by a property) is looked up as an
    attribute; under torch.compile every name is, as dynamo traces attribute reads."""
    if torch.compiler.is_compiling():
        return [getattr(module, name) for name in names]
    parameters, buffers = module._parameters, module._buffers
    values = []
    for name in names:
        value = parameters.get(name, _ABSENT)
        if value is _ABSENT:
            value = buffers.get(name, _ABSENT)
        values.append(getattr(module, name) if value is _ABSENT else value)
    return values


_BATCH_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


class _CustomBatchNorm(_BatchNorm):
    def _op_arguments(
        self,
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None, bool, Tensor | None]:
        """(weight, bias, running_mean, running_var, training, num_batches_tracked) for the op."""
        if not torch.jit.is_scripting():
            weight, bias, running_mean, running_var, num_batches_tracked = _registered(
                self, _BATCH_NORM_TENSORS
            )
        else:
            weight, bias, running_mean, running_var = (
                self.weight, self.bias, self.running_mean, self.running_var
            )  # fmt: skip
            num_batches_tracked = self.num_batches_tracked
        # As torch.nn.modules.batchnorm._BatchNorm.forward: batch statistics when training or
        # without running stats; the op updates the running stats and num_batches_tracked
        # (momentum=None: the cumulative average) when training with them.
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        use_running_stats = not self.training or self.track_running_stats
        updates = self.training and self.track_running_stats
        return (
            weight,
            bias,
            running_mean if use_running_stats else None,
            running_var if use_running_stats else None,
            use_batch_stats,
            num_batches_tracked if updates else None,
        )

    def forward(self, input: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            leaf = _fx_leaf(self, input)
            if leaf is not None:
                return leaf
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, training, num_batches_tracked = (
            self._op_arguments()
        )
        return torch.ops.custom_bn.batch_norm(input, weight, bias, running_mean, running_var,
                                              training, self.momentum, self.eps,
                                              num_batches_tracked)  # fmt: skip


class BatchNorm1d(_CustomBatchNorm):
    """As torch.nn.BatchNorm1d, on (N, C) or (N, C, L) input."""

    def _check_input_dim(self, input):
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_CustomBatchNorm):
    """As torch.nn.BatchNorm2d, on (N, C, H, W) input."""

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_CustomBatchNorm):
    """As torch.nn.BatchNorm3d, on (N, C, D, H, W) input."""

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")


class BatchNormReLU2d(BatchNorm2d):
    """relu(BatchNorm2d(input) + residual) as one fused op, torch.ops.custom_bn.batch_norm_relu:
    one pass forward, one backward, and no activation saved beyond the output. The state is
    BatchNorm2d's (the same state_dict as torch.nn.BatchNorm2d)."""

    def forward(self, input: Tensor, residual: Tensor | None = None) -> Tensor:
        if not torch.jit.is_scripting():
            leaf = _fx_leaf(self, input) if residual is None else _fx_leaf(self, input, residual)
            if leaf is not None:
                return leaf
        self._check_input_dim(input)
        weight, bias, running_mean, running_var, training, num_batches_tracked = (
            self._op_arguments()
        )
        return torch.ops.custom_bn.batch_norm_relu(input, weight, bias, running_mean, running_var,
                                                   training, self.momentum, self.eps,
                                                   num_batches_tracked, residual)  # fmt: skip


_REPLACEMENTS = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def _retype(bn: _BatchNorm, cls: type[_BatchNorm]) -> _BatchNorm:
    """A `cls` batch norm over the same attributes, parameters and buffers (the very tensors:
    optimizers and other references to them keep working), training mode and device."""
    retyped = cls.__new__(cls)
    retyped.__dict__.update(bn.__dict__)
    retyped._parameters = dict(bn._parameters)
    retyped._buffers = dict(bn._buffers)
    retyped._modules = dict(bn._modules)
    return retyped


_FROZEN_TENSORS = ("weight", "bias", "running_mean", "running_var")


class FrozenBatchNorm2d(torch.nn.Module):
    """Batch norm whose statistics and affine parameters never change, as
    torchvision.ops.FrozenBatchNorm2d (the backbones of detection models use it): always the
    running statistics, through the eval kernel, also after a parent's .train(). weight, bias,
    running_mean and running_var are buffers, so nothing requires grad; the state_dict loads
    from and into torchvision's FrozenBatchNorm2d and torch.nn.BatchNorm2d (whose
    num_batches_tracked it ignores)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

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
            weight, bias, mean, var = _registered(self, _FROZEN_TENSORS)
        else:
            weight, bias, mean, var = self.weight, self.bias, self.running_mean, self.running_var
        return torch.ops.custom_bn.batch_norm(input, weight, bias, mean, var, False, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def _freeze_one(bn: _BatchNorm) -> FrozenBatchNorm2d:
    if bn.running_mean is None:
        raise ValueError(
            f"convert_batchnorm(frozen=True): expected batch norm with running statistics to "
            f"freeze, but got {bn} (track_running_stats=False)"
        )
    frozen = FrozenBatchNorm2d(bn.num_features, bn.eps)
    with torch.no_grad():
        for name in ("weight", "bias"):
            if getattr(bn, name) is not None:
                getattr(frozen, name).copy_(getattr(bn, name))
        frozen.running_mean.copy_(bn.running_mean)
        frozen.running_var.copy_(bn.running_var)
    return frozen.to(bn.running_mean.device, bn.running_mean.dtype)


def convert_batchnorm(module: torch.nn.Module, frozen: bool = False) -> torch.nn.Module:
    """Replaces every torch.nn.BatchNorm{1,2,3}d in `module` (or `module` itself) by ours,
    keeping parameters, buffers, training mode and device. Subclasses (SyncBatchNorm, say)
    are left alone. With frozen=True, BatchNorm2d layers (torch's or ours) become
    FrozenBatchNorm2d with their current statistics and affine parameters."""
    if frozen and type(module) in (torch.nn.BatchNorm2d, BatchNorm2d):
        return _freeze_one(module)
    if type(module) in _REPLACEMENTS:
        return _retype(module, _REPLACEMENTS[type(module)])
    for name, child in module.named_children():
        converted = convert_batchnorm(child, frozen)
        if converted is not child:
            setattr(module, name, converted)
    return module
