"""A batch norm module's state as the op's arguments: the rule of torch's
`_BatchNorm.forward`, written once for every module of ours (and for torch's own batch norm
modules where a pass calls the fused op on them)."""

import torch
from torch import Tensor


def check_eps(eps: float) -> None:
    """torch.nn.functional.batch_norm's check (torch 2.11), same type and message."""
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive, but got {eps}")


_ABSENT = object()


def registered(module: torch.nn.Module, names: tuple[str, ...]) -> list[Tensor | None]:
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


class BatchNormState:
    """The module-state rule, as a method of every batch norm module of ours (TorchScript
    compiles methods, not free functions over modules); `batch_norm_arguments` applies it to
    any module with torch's `_NormBase` state."""

    def _op_arguments(
        self,
    ) -> tuple[
        Tensor | None,
        Tensor | None,
        Tensor | None,
        Tensor | None,
        bool,
        float | None,
        float,
        Tensor | None,
    ]:
        """batch_norm's arguments after input, in its schema's order: (weight, bias,
        running_mean, running_var, training, momentum, eps, num_batches_tracked), after torch's
        eps check. batch_norm_relu takes the same, then residual.

        As torch.nn.modules.batchnorm._BatchNorm.forward: batch statistics when training or
        without running stats; the op updates the running stats and num_batches_tracked
        (momentum=None: the cumulative average) when training with them."""
        check_eps(self.eps)
        if not torch.jit.is_scripting():
            weight, bias, running_mean, running_var, num_batches_tracked = registered(
                self, _BATCH_NORM_TENSORS
            )
        else:
            weight, bias = self.weight, self.bias
            running_mean, running_var = self.running_mean, self.running_var
            num_batches_tracked = self.num_batches_tracked
        use_batch_stats = self.training or (running_mean is None and running_var is None)
        use_running_stats = not self.training or self.track_running_stats
        updates = self.training and self.track_running_stats
        return (
            weight,
            bias,
            running_mean if use_running_stats else None,
            running_var if use_running_stats else None,
            use_batch_stats,
            self.momentum,
            self.eps,
            num_batches_tracked if updates else None,
        )


def batch_norm_arguments(module: torch.nn.Module):
    """BatchNormState's rule for any module with torch's `_NormBase` state (torch's own
    batch norm modules included)."""
    return BatchNormState._op_arguments(module)
