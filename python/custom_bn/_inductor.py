"""Batch norm as TorchInductor's own code, in evaluation and in training mode.

Under TorchInductor (the default backend of torch.compile, and AOTInductor) torch's BatchNorm is
decomposed into reductions and pointwise code that inductor fuses with the ReLU, residual add
and gradient code around it. Opaque calls of our ops would each cost passes of their own that
inductor cannot fuse (docs/perf.md rows 37 and 38). So inductor's decomposition table gets our
ops written as torch operations (custom_bn._decompositions), with our kernels' formulas.

Only inductor's table gets them: `torch.export`, the ONNX exporters, eager mode and the other
compile backends keep our ops. SyncBatchNorm's stage ops (distributed statistics) stay calls.

How the training forward reaches the table: it mutates the running stats, and AOTAutograd's
functionalization would wrap it in `auto_functionalized_v2`, which the table cannot see. So the
forward ops also get a CompositeImplicitAutograd kernel that only tracers see (`py_impl`, run by
the Python dispatcher), which functionalization calls for mutating ops: it applies the decomposition
that the tracing table holds, and declines (NotImplemented, so the op is kept) when the table
holds none. Inductor thus gets the forward as torch operations before it partitions the joint
graph, as it gets torch's BatchNorm, and can recompute a ReLU's mask in the backward instead of
storing it (docs/perf.md row 39). Where a graph still carries the wrapped op (an exported
program compiled by AOTInductor), inductor's post-grad pass replaces the node by the op traced
with its table, and there the decomposition applies too.

Importing inductor costs seconds, which eager users should not pay: the decompositions are
registered when `torch._inductor.decomposition` is first imported (torch.compile does that on
its first inductor compile), or at once if it already is.
"""

import importlib.machinery
import sys

import torch
from torch.fx.experimental import proxy_tensor

from . import _decompositions

_INDUCTOR_DECOMPOSITIONS = "torch._inductor.decomposition"


# Our ops that inductor compiles from their decompositions; the stage ops of SyncBatchNorm
# (distributed statistics) stay calls of our kernels.
_DECOMPOSED = (
    "batch_norm_eval",
    "batch_norm_forward",
    "batch_norm_relu_forward",
    "batch_norm_backward",
    "batch_norm_relu_backward",
)


# Our ops that mutate the running stats.
_MUTATING = ("batch_norm_forward", "batch_norm_relu_forward")


def _decompose_if_tracing_table_has(op):
    """A CompositeImplicitAutograd kernel for tracers: the decomposition the current tracing
    table (make_fx's) holds for op, or NotImplemented, which tracers take as "keep the op"."""

    def kernel(*args, **kwargs):
        decomposition = proxy_tensor.CURRENT_DECOMPOSITION_TABLE.get(op)
        return NotImplemented if decomposition is None else decomposition(*args, **kwargs)

    return kernel


def _register_tracer_kernels() -> None:
    for name in _MUTATING:
        op = getattr(torch.ops.custom_bn, name).default
        if torch._C.DispatchKey.CompositeImplicitAutograd not in op.py_kernels:
            op.py_impl(torch._C.DispatchKey.CompositeImplicitAutograd)(
                _decompose_if_tracing_table_has(op)
            )


def _register(decomposition_module) -> None:
    for name in _DECOMPOSED:
        op = getattr(torch.ops.custom_bn, name).default
        if op not in decomposition_module.decompositions:
            decomposition_module.register_decomposition(op)(getattr(_decompositions, name))
    # The table inductor reads is a cached copy, made on its first compile.
    decomposition_module.fast_random_decomps.cache_clear()


class _RegisterOnImport:
    """A meta path finder that lets the ordinary finders load inductor's decomposition
    module, then registers ours in it before the import returns."""

    def find_spec(self, name, path, target=None):
        if name != _INDUCTOR_DECOMPOSITIONS:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def execute_then_register(module):
            execute(module)
            _register(module)

        spec.loader.exec_module = execute_then_register
        return spec


def register() -> None:
    _register_tracer_kernels()
    module = sys.modules.get(_INDUCTOR_DECOMPOSITIONS)
    if module is not None:
        _register(module)
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
