"""Batch norm as TorchInductor's own code, in evaluation and in training mode.

Under TorchInductor (the default backend of torch.compile, and AOTInductor) torch's BatchNorm is
decomposed into reductions and pointwise code that inductor fuses with the ReLU, residual add
and gradient code around it. Opaque calls of our ops would each cost passes of their own that
inductor cannot fuse (docs/perf.md rows 37 and 38). So inductor's decomposition table gets our
ops written as torch operations (custom_bn.reference), with our kernels' formulas.

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

Hook points, all private, as torch has no public way to add to inductor's decompositions or to
give an op a kernel that only tracers see: `proxy_tensor.CURRENT_DECOMPOSITION_TABLE`,
`OpOverload.py_impl` with `DispatchKey.CompositeImplicitAutograd`, and in
`torch._inductor.decomposition` `decompositions`, `register_decomposition` and
`fast_random_decomps`. If inductor's module lacks one when it is imported, the decompositions
are not registered, with a warning, and inductor's import goes on: compiled models keep our
ops as calls.
"""

import torch

from .. import reference
from ..op_table import signature
from .hooks import hook_point, when_imported

_INDUCTOR_DECOMPOSITIONS = "torch._inductor.decomposition"
FEATURE = "torch.compile compiling custom_bn's batch norm into inductor's own code"

# Our ops that inductor compiles from their decompositions; the composite ops reach it as
# these, and the stage ops of SyncBatchNorm (distributed statistics) stay calls of our kernels.
DECOMPOSED = (
    "batch_norm_eval",
    "batch_norm_forward",
    "batch_norm_relu_forward",
    "batch_norm_relu_forward_",
    "batch_norm_backward",
    "batch_norm_relu_backward",
)

# Our ops that mutate the running stats (and the in-place one its input).
_MUTATING = ("batch_norm_forward", "batch_norm_relu_forward", "batch_norm_relu_forward_")


def _op(name: str):
    return getattr(torch.ops.custom_bn, name).default


def _decompose_if_tracing_table_has(op, proxy_tensor):
    """A CompositeImplicitAutograd kernel for tracers: the decomposition the current tracing
    table (make_fx's) holds for op, or NotImplemented, which tracers take as "keep the op"."""

    def kernel(*args, **kwargs):
        decomposition = proxy_tensor.CURRENT_DECOMPOSITION_TABLE.get(op)
        return NotImplemented if decomposition is None else decomposition(*args, **kwargs)

    return kernel


def _register(decomposition_module) -> None:
    name = decomposition_module.__name__
    table = hook_point(name, "decompositions")
    register = hook_point(name, "register_decomposition")
    clear_cache = hook_point(name, "fast_random_decomps", "cache_clear")
    for name in DECOMPOSED:
        if _op(name) not in table:
            register(_op(name))(signature(name).adapt(getattr(reference, name)))
    # The table inductor reads is a cached copy, made on its first compile.
    clear_cache()


def install() -> None:
    proxy_tensor = hook_point("torch.fx.experimental.proxy_tensor")
    hook_point("torch.fx.experimental.proxy_tensor", "CURRENT_DECOMPOSITION_TABLE")
    tracer_key = hook_point("torch._C", "DispatchKey", "CompositeImplicitAutograd")
    hook_point("torch._ops", "OpOverload", "py_impl")
    for name in _MUTATING:
        if tracer_key not in _op(name).py_kernels:
            _op(name).py_impl(tracer_key)(_decompose_if_tracing_table_has(_op(name), proxy_tensor))
    when_imported(_INDUCTOR_DECOMPOSITIONS, FEATURE, lambda module: _register(module))
