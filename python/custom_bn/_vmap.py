"""Batching rules for torch.vmap (and so for torch.func's ensembles and per-sample gradients).

Batch norm over a vmapped dimension of size B is batch norm with that dimension folded into
the channels: an input (B, N, C, *) becomes (N, B * C, *), per-channel tensors (B, C) become
(B * C,), and each of the B * C channels is normalized by its own statistics, exactly as B
separate calls would. Running stats that are batched (one set per model, as
torch.func.stack_module_state makes them) are updated in place, each by its own batch. With
momentum=None the update factor depends on each model's num_batches_tracked, so that case runs
as B calls on views of the same tensors.

vmap exists in Python only, so its rules live here; autograd, which LibTorch programs use too,
is in the library (csrc/autograd/).
"""

import torch

ops = torch.ops.custom_bn


def _to_front(t, bdim, batch_size):
    """t with its vmapped dimension first: moved there, or (unbatched) expanded."""
    if t is None:
        return None
    return t.movedim(bdim, 0) if bdim is not None else t.expand(batch_size, *t.shape)


def _fold_input(t, bdim, batch_size):
    """(B, N, C, *) -> (N, B * C, *)."""
    t = _to_front(t, bdim, batch_size)
    return t.movedim(0, 1).reshape(t.size(1), -1, *t.shape[3:])


def _unfold_input(t, batch_size):
    """(N, B * C, *) -> (B, N, C, *), a view."""
    return t.reshape(t.size(0), batch_size, -1, *t.shape[2:]).movedim(1, 0)


def _fold_channels(t, bdim, batch_size):
    """(B, C) or (C,) -> (B * C,)."""
    return None if t is None else _to_front(t, bdim, batch_size).reshape(-1)


def _unfold_channels(t, batch_size):
    """(B * C,) -> (B, C) with bdim 0; an empty (eval) statistic stays unbatched."""
    if t is None or t.numel() == 0:
        return t, None
    return t.reshape(batch_size, -1), 0


class _WritableStats:
    """Running stats (B, C) as the (B * C,) tensors an op writes: a view of them where their
    layout allows, else a copy that write_back() copies back."""

    def __init__(self, running_mean, running_var, in_dims, batch_size):
        self.targets = [
            _to_front(t, d, batch_size)
            for t, d in zip((running_mean, running_var), in_dims, strict=True)
        ]
        self.flat = [t.reshape(-1) if t.is_contiguous() else t.contiguous().view(-1)
                     for t in self.targets]  # fmt: skip

    def write_back(self):
        for target, flat in zip(self.targets, self.flat, strict=True):
            if flat.data_ptr() != target.data_ptr():
                target.copy_(flat.view_as(target))


def _check_updatable(name, running_mean, running_var, in_dims):
    if running_mean is not None and (in_dims[0] is None or in_dims[1] is None):
        raise RuntimeError(
            f"vmap: custom_bn.{name} in training mode updates running_mean and running_var once "
            "per batch element, so each needs its own: expected running_mean and running_var "
            "batched along the vmapped dimension (as torch.func.stack_module_state stacks "
            "buffers), but got them unbatched. Pass running stats per batch element, or None."
        )


def _forward_rule(name, relu):
    def rule(info, in_dims, *args):
        if relu:
            (input, weight, bias, running_mean, running_var, num_batches_tracked, residual,
             training, momentum, eps) = args  # fmt: skip
        else:
            (input, weight, bias, running_mean, running_var, num_batches_tracked, training,
             momentum, eps) = args  # fmt: skip
            residual = None
        dims = dict(zip(("input", "weight", "bias", "running_mean", "running_var",
                         "num_batches_tracked"), in_dims, strict=False))  # fmt: skip
        residual_dim = in_dims[6] if relu else None
        batch_size = info.batch_size
        updates = training and running_mean is not None
        if updates:
            _check_updatable(name, running_mean, running_var,
                             (dims["running_mean"], dims["running_var"]))  # fmt: skip
        if updates and momentum is None and dims["num_batches_tracked"] is not None:
            return _forward_per_element(relu, batch_size, in_dims, args)

        x = _fold_input(input, dims["input"], batch_size)
        r = None if residual is None else _fold_input(residual, residual_dim, batch_size)
        w = _fold_channels(weight, dims["weight"], batch_size)
        b = _fold_channels(bias, dims["bias"], batch_size)
        if updates:
            stat_dims = (dims["running_mean"], dims["running_var"])
            stats = _WritableStats(running_mean, running_var, stat_dims, batch_size)
            mean, var = stats.flat
        else:
            mean = _fold_channels(running_mean, dims["running_mean"], batch_size)
            var = _fold_channels(running_var, dims["running_var"], batch_size)
        # One call counts one step for every batch element: the op increments a shared
        # counter; a batched one (one per model) is incremented here, all at once.
        counter = num_batches_tracked if dims["num_batches_tracked"] is None else None
        if relu:
            out, save_mean, save_invstd = ops.batch_norm_relu_forward(
                x, w, b, mean, var, counter, r, training, momentum, eps)  # fmt: skip
        else:
            out, save_mean, save_invstd = ops.batch_norm_forward(
                x, w, b, mean, var, counter, training, momentum, eps)  # fmt: skip
        if updates:
            stats.write_back()
            if num_batches_tracked is not None and counter is None:
                num_batches_tracked.add_(1)
        save_mean, mean_dim = _unfold_channels(save_mean, batch_size)
        save_invstd, invstd_dim = _unfold_channels(save_invstd, batch_size)
        return (_unfold_input(out, batch_size), save_mean, save_invstd), (0, mean_dim, invstd_dim)

    return rule


def _forward_per_element(relu, batch_size, in_dims, args):
    """B calls on views of the batch elements' tensors: each updates its own running stats
    with its own num_batches_tracked (momentum=None)."""
    outputs = []
    for element in range(batch_size):
        element_args = [
            a.select(d, element) if isinstance(a, torch.Tensor) and d is not None else a
            for a, d in zip(args, in_dims, strict=True)
        ]
        forward = ops.batch_norm_relu_forward if relu else ops.batch_norm_forward
        outputs.append(forward(*element_args))
    return tuple(torch.stack(parts) for parts in zip(*outputs, strict=True)), (0, 0, 0)


def _backward_rule(relu):
    def rule(info, in_dims, *args):
        batch_size = info.batch_size
        if relu:
            grad_output, output, input, *rest = args
            grad_dim, output_dim, input_dim, *rest_dims = in_dims
        else:
            grad_output, input, *rest = args
            grad_dim, input_dim, *rest_dims = in_dims
        weight, running_mean, running_var, save_mean, save_invstd, training, eps, mask = rest
        channel_args = [
            _fold_channels(t, d, batch_size)
            for t, d in zip((weight, running_mean, running_var, save_mean, save_invstd),
                            rest_dims, strict=False)
        ]  # fmt: skip
        folded = [_fold_input(grad_output, grad_dim, batch_size)]
        if relu:
            folded.append(_fold_input(output, output_dim, batch_size))
        folded.append(_fold_input(input, input_dim, batch_size))
        backward = ops.batch_norm_relu_backward if relu else ops.batch_norm_backward
        grads = backward(*folded, *channel_args, training, eps, mask)
        results, dims = [], []
        for position, grad in enumerate(grads):
            if grad is None:
                results.append(None)
                dims.append(None)
            elif position in (0, 3):  # grad_input, grad_residual
                results.append(_unfold_input(grad, batch_size))
                dims.append(0)
            else:
                results.append(grad.reshape(batch_size, -1))
                dims.append(0)
        return tuple(results), tuple(dims)

    return rule


def _batch_norm_rule(forward_rule):
    """batch_norm: the forward's rule, keeping the output."""

    def rule(info, in_dims, input, weight, bias, running_mean, running_var, training, momentum,
             eps, num_batches_tracked=None):  # fmt: skip
        dims = (*in_dims, None)  # num_batches_tracked may have been left to its default
        forward_args = (input, weight, bias, running_mean, running_var, num_batches_tracked,
                        training, momentum, eps)  # fmt: skip
        forward_dims = (*dims[:5], dims[8], None, None, None)
        outputs, out_dims = forward_rule(info, forward_dims, *forward_args)
        return outputs[0], out_dims[0]

    return rule


def _batch_norm_relu_rule(forward_rule):
    """batch_norm_relu: the fused forward's rule, keeping the output."""

    def rule(info, in_dims, input, weight, bias, running_mean, running_var, training, momentum,
             eps, num_batches_tracked=None, residual=None):  # fmt: skip
        dims = (*in_dims, None, None)
        forward_args = (input, weight, bias, running_mean, running_var, num_batches_tracked,
                        residual, training, momentum, eps)  # fmt: skip
        forward_dims = (*dims[:5], dims[8], dims[9], None, None, None)
        outputs, out_dims = forward_rule(info, forward_dims, *forward_args)
        return outputs[0], out_dims[0]

    return rule


def _eval_rule(info, in_dims, input, weight, bias, running_mean, running_var, eps, relu=False,
               residual=None):  # fmt: skip
    """batch_norm_eval: reads the running stats only, so unbatched ones are shared."""
    dims = (*in_dims, None, None)[:8]
    batch_size = info.batch_size
    x = _fold_input(input, dims[0], batch_size)
    r = None if residual is None else _fold_input(residual, dims[7], batch_size)
    w, b, mean, var = (_fold_channels(t, d, batch_size)
                       for t, d in zip((weight, bias, running_mean, running_var), dims[1:5],
                                       strict=True))  # fmt: skip
    return _unfold_input(ops.batch_norm_eval(x, w, b, mean, var, eps, relu, r), batch_size), 0


def register():
    forward = _forward_rule("batch_norm", relu=False)
    relu_forward = _forward_rule("batch_norm_relu", relu=True)
    for name, rule in (
        ("batch_norm_forward", forward),
        ("batch_norm_relu_forward", relu_forward),
        ("batch_norm", _batch_norm_rule(forward)),
        ("batch_norm_relu", _batch_norm_relu_rule(relu_forward)),
        ("batch_norm_eval", _eval_rule),
        ("batch_norm_backward", _backward_rule(relu=False)),
        ("batch_norm_relu_backward", _backward_rule(relu=True)),
    ):
        torch.library.register_vmap(f"custom_bn::{name}", rule)
