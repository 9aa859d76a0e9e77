"""Batching rules for torch.vmap (and so for torch.func's ensembles and per-sample gradients).

Batch norm over a vmapped dimension of size B is batch norm with that dimension folded into
the channels: an input-shaped tensor (B, N, C, *) becomes (N, B * C, *), a per-channel one
(B, C) becomes (B * C,), and each of the B * C channels is normalized by its own statistics,
exactly as B separate calls would. Running stats that are batched (one set per model, as
torch.func.stack_module_state makes them) are updated in place, each by its own batch. With
momentum=None the update factor depends on each model's num_batches_tracked, so that case runs
as B calls on views of the same tensors.

One rule serves every op of custom_bn.op_table.BATCH_NORM_OPS: it reads each argument's role
and whether the op writes it from the op's schema. Public API only
(torch.library.register_vmap).
"""

import torch

from ..op_table import BATCH_NORM_OPS, OpSignature, Role, signature
from .hooks import hook_point

FEATURE = "torch.vmap and torch.func transforms over custom_bn's ops"


def _to_front(t, bdim, batch_size):
    """t with its vmapped dimension first: moved there, or (unbatched) expanded."""
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
    return _to_front(t, bdim, batch_size).reshape(-1)


def _unfold_channels(t, batch_size):
    """(B * C,) -> (B, C) with bdim 0; an empty (eval) statistic stays unbatched."""
    if t.numel() == 0:
        return t, None
    return t.reshape(batch_size, -1), 0


class _WritableStat:
    """A batched running stat (B, C) as the (B * C,) tensor an op writes: a view of it where
    its layout allows, else a copy that write_back() copies back."""

    def __init__(self, stat, bdim, batch_size):
        self.target = _to_front(stat, bdim, batch_size)
        contiguous = self.target.is_contiguous()
        self.flat = self.target.reshape(-1) if contiguous else self.target.contiguous().view(-1)

    def write_back(self):
        if self.flat.data_ptr() != self.target.data_ptr():
            self.target.copy_(self.flat.view_as(self.target))


def _check_updatable(op: OpSignature, values: dict, dims: dict) -> None:
    unbatched = [n for n in op.names(Role.PER_CHANNEL) if n in op.mutated() and dims[n] is None]
    if unbatched:
        raise RuntimeError(
            f"vmap: custom_bn.{op.name} in training mode updates running_mean and running_var "
            "once per batch element, so each needs its own: expected running_mean and "
            "running_var batched along the vmapped dimension (as torch.func.stack_module_state "
            f"stacks buffers), but got {' and '.join(unbatched)} unbatched. Pass running stats "
            "per batch element, or None."
        )


def _updates_running_stats(op: OpSignature, values: dict) -> bool:
    written = [n for n in op.names(Role.PER_CHANNEL) if n in op.mutated()]
    return bool(values.get("training")) and any(values[n] is not None for n in written)


def _per_element(op: OpSignature, values: dict, dims: dict, batch_size: int):
    """B calls on views of the batch elements' tensors: each updates its own running stats
    with its own num_batches_tracked (momentum=None)."""
    calls = []
    for element in range(batch_size):
        element_values = {
            name: value.select(dims[name], element)
            if isinstance(value, torch.Tensor) and dims.get(name) is not None
            else value
            for name, value in values.items()
        }
        calls.append(op.named_results(op.call(element_values)))
    stacked = [torch.stack([call[r.name] for call in calls]) for r in op.results]
    dims = [0] * len(stacked)
    return (stacked[0], dims[0]) if len(stacked) == 1 else (tuple(stacked), tuple(dims))


def _rule(op: OpSignature):
    def rule(info, in_dims, *args, **kwargs):
        batch_size = info.batch_size
        values = op.bind(args, kwargs)
        dims = op.bind_dims(in_dims)
        updates = _updates_running_stats(op, values)
        if updates:
            _check_updatable(op, values, dims)
        counters = op.names(Role.COUNTER)
        counter_batched = any(values[n] is not None and dims[n] is not None for n in counters)
        if updates and values.get("momentum", 0.0) is None and counter_batched:
            return _per_element(op, values, dims, batch_size)

        folded, written = {}, []
        for argument in op.arguments:
            name, value = argument.name, values[argument.name]
            if value is None or argument.role is Role.FLAG:
                folded[name] = value
            elif argument.role is Role.INPUT_SHAPED:
                folded[name] = _fold_input(value, dims[name], batch_size)
            elif argument.role is Role.PER_CHANNEL and argument.mutated and updates:
                written.append(_WritableStat(value, dims[name], batch_size))
                folded[name] = written[-1].flat
            elif argument.role is Role.PER_CHANNEL:
                folded[name] = _fold_channels(value, dims[name], batch_size)
            else:
                # One call counts one step for every batch element: the op increments a
                # shared counter; a batched one (one per model) is incremented here.
                folded[name] = value if dims[name] is None else None
        results = op.named_results(op.call(folded))
        for stat in written:
            stat.write_back()
        for name in counters:
            if updates and values[name] is not None and folded[name] is None:
                values[name].add_(1)

        unfolded, out_dims = [], []
        for result in op.results:
            value = results[result.name]
            if value is None:
                value, dim = None, None
            elif result.role is Role.INPUT_SHAPED:
                value, dim = _unfold_input(value, batch_size), 0
            else:
                value, dim = _unfold_channels(value, batch_size)
            unfolded.append(value)
            out_dims.append(dim)
        if len(unfolded) == 1:
            return unfolded[0], out_dims[0]
        return tuple(unfolded), tuple(out_dims)

    return rule


def install() -> None:
    register_vmap = hook_point("torch.library", "register_vmap")
    for name in BATCH_NORM_OPS:
        register_vmap(f"custom_bn::{name}", _rule(signature(name)))
