"""fuse_batchnorm_relu: act(bn(x)) and act(bn(x) + identity) in an existing model become one
batch_norm_relu call each, found with torch.fx, without changing what the model computes. act
is a ReLU, ReLU6, Hardtanh or LeakyReLU (slope >= 0), or without the residual a SiLU,
Hardswish or GELU: the activations the fused op applies.

torchvision's BasicBlock and Bottleneck end in `out = self.bn(...); out += identity;
out = self.relu(out)`: three passes over the activation forward and three backward, where the
fused op makes one of each.

How it stays exact, in both modes, on models from any library:
- Each module is traced on its own, with every child a leaf (torch.fx runs none of the
  children's code, so no `self.training` branch of theirs is frozen and no buffer of theirs
  is written). Its trace with training=True must equal its trace with training=False: a
  module whose own code reads the mode (dropout, drop-path) keeps its own forward, and a
  warning names it when it held a pattern.
- Only modules that hold a pattern change, and only their `forward`: the result is made of
  shallow copies of the model's modules (same classes and methods, the very same parameters
  and buffers), and the copy of each such module has the rewritten trace as its `forward`.
  The input model is not modified.
- The batch norm modules stay what they were. The rewritten forward calls
  `batch_norm_relu(bn, x, residual, activation)`, which runs the fused op on the module's
  state when `bn` is a plain BatchNorm2d (torch's or ours) without hooks, and otherwise `bn`
  followed by the add and the activation. So methods that bypass `forward` (timm's
  `forward_features`), a later swap of the module (freezing, SyncBatchNorm conversion) and
  unpickling (which restores the class's own forward) all still compute the original model.
"""

import copy
import inspect
import types
import warnings

import torch
from torch import Tensor, fx, nn

from . import modules
from ._activation import (
    IDENTITY,
    RELU,
    Activation,
    activation_of,
    apply_activation,
    is_smooth,
)
from ._state import batch_norm_arguments
from .fusion_patterns import (
    _BATCHNORM_2D,
    _child,
    _has_hooks,
    _inplace_candidates,
    _match,
    _writable,
)
from .integrations.torch_nn import NormBase
from .sync_batchnorm import SyncBatchNorm, sync_batch_norm_relu_


def batch_norm_relu(
    bn: nn.Module,
    input: Tensor,
    residual: Tensor | None = None,
    activation: Activation = RELU,
    inplace: bool = False,
) -> Tensor:
    """act(bn(input) + residual): the fused op on `bn`'s state when `bn` is a plain
    BatchNorm2d without hooks (with inplace, the in-place op, written over input; also on a
    custom_bn.SyncBatchNorm that replaced it), else the three steps (the add only with a
    residual)."""
    if inplace and type(bn) is SyncBatchNorm and not _has_hooks(bn):
        return sync_batch_norm_relu_(bn, input, residual, activation)
    if type(bn) in _BATCHNORM_2D and not _has_hooks(bn):
        bn._check_input_dim(input)
        arguments = batch_norm_arguments(bn)
        if inplace:
            return torch.ops.custom_bn.batch_norm_relu_(
                input, *arguments, residual, *activation[:3]
            )
        return torch.ops.custom_bn.batch_norm_relu(input, *arguments, residual, *activation)
    output = bn(input)
    return apply_activation(output if residual is None else output + residual, activation)


def inplace_batch_norm_act(module: nn.Module, input: Tensor) -> Tensor:
    """A fused module (BatchNormReLU2d) run in place on input when it is exactly one without
    hooks, else called as it is."""
    if type(module) is modules.BatchNormReLU2d and not _has_hooks(module):
        module._check_input_dim(input)
        arguments = batch_norm_arguments(module)
        return torch.ops.custom_bn.batch_norm_relu_(
            input, *arguments, None, *activation_of(module)[:3]
        )
    return module(input)


class _ShallowTracer(fx.Tracer):
    """Traces one module's own code: every child is a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return True


def _fuse_graph(graph: fx.Graph, owner: nn.Module, inplace: bool) -> tuple[str, ...]:
    """Rewrites the fusible chains of `graph` (a trace of `owner`); returns the batch norm
    targets it fused, once per call. With inplace, those whose input a convolution wrote and
    nothing else reads use the in-place op, and so do batch norms without an activation and
    fused modules on such inputs."""
    matches = [m for m in (_match(node, owner) for node in graph.nodes) if m]
    for bn, removed, residual, activation in matches:
        in_place = inplace and not is_smooth(activation) and _writable(bn.args[0], owner)
        args = (bn.args[0], residual, activation, in_place)
        _replace(graph, removed[0], batch_norm_relu, bn.target, args, (*removed, bn))
    targets = [bn.target for bn, *_ in matches]
    if not inplace:
        return tuple(targets)
    for node in _inplace_candidates(graph, owner, {bn for bn, *_ in matches}):
        if type(_child(node, owner)) in _BATCHNORM_2D:
            args = (node.args[0], None, IDENTITY, True)
            _replace(graph, node, batch_norm_relu, node.target, args, (node,))
        else:
            _replace(graph, node, inplace_batch_norm_act, node.target, node.args[:1], (node,))
        targets.append(node.target)
    return tuple(targets)


def _replace(graph: fx.Graph, last: fx.Node, function, target: str, args: tuple, removed) -> None:
    """Replaces the uses of `last` by function(module `target`, *args), then erases
    `removed`."""
    with graph.inserting_before(last):
        call = graph.call_function(function, (graph.get_attr(target), *args))
    last.replace_all_uses_with(call)
    for node in removed:
        graph.erase_node(node)


def _trace(module: nn.Module, training: bool) -> fx.Graph:
    mode = module.training
    module.training = training
    try:
        return _ShallowTracer().trace(module)
    finally:
        module.training = mode


def _code(graph: fx.Graph) -> str:
    return graph.python_code(root_module="self").src


def _shallow_copy(module: nn.Module) -> nn.Module:
    """The same class over the same children, parameters, buffers and hooks, in new tables,
    so that replacing a child or the forward of the copy leaves `module` as it was."""
    twin = copy.copy(module)
    for table in ("_modules", "_parameters", "_buffers", "_forward_hooks", "_forward_pre_hooks"):
        if table in module.__dict__:
            twin.__dict__[table] = copy.copy(module.__dict__[table])
    return twin


class _Fuser:
    def __init__(self, inplace: bool):
        self.inplace = inplace
        self.mode_dependent: list[str] = []

    def fuse(self, module: nn.Module, path: str) -> nn.Module:
        """`module` itself when nothing below it fuses, else a rewritten copy."""
        if isinstance(module, (NormBase, modules.BatchNormReLU2d)):
            return module
        children = {}
        for name, child in module.named_children():
            fused = self.fuse(child, f"{path}.{name}" if path else name)
            if fused is not child:
                children[name] = fused
        result = module
        if children:
            result = _shallow_copy(module)
            result._modules.update(children)
        return self._rewrite_forward(result, module, path)

    def _rewrite_forward(self, module: nn.Module, original: nn.Module, path: str) -> nn.Module:
        if not _traceable_signature(module):
            return module
        state = {name: t.detach().clone() for name, t in module.named_buffers(recurse=False)}
        try:
            graph = _trace(module, training=True)
            same_in_eval = _code(graph) == _code(_trace(module, training=False))
        except Exception:  # noqa: BLE001  Untraceable here (control flow on values, ...).
            return module
        finally:
            # The module's own code ran under fx: undo any write it made to its buffers.
            with torch.no_grad():
                for name, value in state.items():
                    if not torch.equal(getattr(module, name), value):
                        getattr(module, name).copy_(value)
        targets = _fuse_graph(graph, module, self.inplace)
        if not targets:
            return module
        if not same_in_eval:
            self.mode_dependent.append(path or type(module).__name__)
            return module
        if module is original:
            module = _shallow_copy(module)
        graph.lint()
        rewritten = fx.GraphModule(module, graph, class_name=type(module).__name__)
        module.forward = types.MethodType(type(rewritten).forward, module)
        module._fused_batch_norms = targets
        return module


def _traceable_signature(module: nn.Module) -> bool:
    """Whether fx can trace the module's forward without fixing an argument: positional
    tensors only (a default such as `mask=None` would be traced as given and baked in), and
    the class's own forward (fx traces that, not one set on the instance)."""
    if "forward" in module.__dict__:
        return False
    parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
    return all(
        p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        for p in parameters
    )


def _unshare(module: nn.Module, originals: set[int], copies: dict[int, nn.Module]) -> nn.Module:
    """`module` with every module it shares with the original model replaced by a shallow copy
    (one copy per original, so a module used at two paths stays one module)."""
    if id(module) in copies:
        return copies[id(module)]
    own = _shallow_copy(module) if id(module) in originals else module
    copies[id(module)] = own
    for name, child in own._modules.items():
        if child is not None:
            own._modules[name] = _unshare(child, originals, copies)
    return own


def fused_batch_norms(model: nn.Module) -> list[str]:
    """The paths of the batch norm modules that fuse_batchnorm_relu made `model` call through
    the fused op, once per call site."""
    return [
        f"{path}.{target}" if path else target
        for path, module in model.named_modules()
        for target in module.__dict__.get("_fused_batch_norms", ())
    ]


def fuse_batchnorm_relu(model: nn.Module, inplace: bool = False) -> nn.Module:
    """A model that computes what `model` computes, in training and in eval, in which every
    BatchNorm2d (torch's or ours) followed by an activation the fused op applies (ReLU,
    ReLU6, Hardtanh, LeakyReLU with a slope >= 0, with or without a residual added in
    between; SiLU, Hardswish and GELU modules, without one), with nn.Identity calls anywhere
    in the chain, is one batch_norm_relu call:
    `act(bn(x))` and `act(bn(x) + identity)`, the activation as a module, or ReLU and ReLU6
    as a function or a method, in place or not, the add as `+`, `+=`, `torch.add` or
    `Tensor.add(_)`. The residual must have
    the batch norm output's shape (torchvision's blocks do; the op checks it).

    The result has the class and methods of `model` and shares its parameters and buffers
    (the very tensors, under the same state_dict keys, in the same training mode); its modules
    are copies of the model's, and those whose own forward holds a pattern have a rewritten
    forward (see the module docstring). `model` itself is not modified, also not by a later
    .train() or .eval() of the result. A model with nothing to fuse comes back
    as the same object. A module whose own code depends on the training mode is left as it is,
    with a warning naming it.

    With `inplace=True`, each of these whose input is a convolution's output that nothing else
    reads (torchvision's and timm's blocks: conv -> BN -> act) uses the in-place op
    (torch.ops.custom_bn.batch_norm_relu_, in-place activated batch norm), which writes over
    that output and keeps only its own output for the backward; so do batch norms on such an
    input with no activation after them (the identity: the projection layers of MobileNetV2,
    whose residual add keeps nothing) and fused modules (BatchNormReLU2d) with a piecewise-linear
    activation. The values computed are the same (the gradients to a few roundings); the
    activation memory a training step keeps is less by up to one tensor per batch norm."""
    fuser = _Fuser(inplace)
    fused = fuser.fuse(model, "")
    if fused is not model:
        # Modules of its own, so that .train()/.eval() of the result leaves `model` as it is.
        fused = _unshare(fused, {id(m) for m in model.modules()}, {})
    if fuser.mode_dependent:
        warnings.warn(
            "fuse_batchnorm_relu left unfused the batch norm -> ReLU chains in modules whose "
            "own forward depends on self.training (fusing them would freeze the mode): "
            + ", ".join(fuser.mode_dependent),
            stacklevel=2,
        )
    return fused
