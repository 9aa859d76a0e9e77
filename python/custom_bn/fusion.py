"""fuse_batchnorm_relu: relu(bn(x)) and relu(bn(x) + identity) in an existing model become one
batch_norm_relu call, found with torch.fx.

torchvision's BasicBlock and Bottleneck end in `out = self.bn(...); out += identity;
out = self.relu(out)`: three passes over the activation forward and three backward, where
BatchNormReLU2d makes one of each. The rewrite changes which modules run, not what is computed:
the batch norm module at the same path becomes a BatchNormReLU2d over the very same parameters
and buffers (so state_dict keys, optimizers and the training mode carry over).
"""

import operator

import torch
from torch import fx

from . import modules

_BATCHNORM_2D = (torch.nn.BatchNorm2d, modules.BatchNorm2d)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)


def _is_relu(node: fx.Node, submodules: dict[str, torch.nn.Module]) -> bool:
    if node.op == "call_module":
        return type(submodules[node.target]) is torch.nn.ReLU
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_add(node: fx.Node) -> bool:
    """A plain two-tensor add (no alpha), in place or not."""
    if len(node.args) != 2 or node.kwargs:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _adds_in_place(node: fx.Node) -> bool:
    return node.target in (operator.iadd, "add_")


def _fusible_batchnorm(node: object, submodules: dict[str, torch.nn.Module]) -> bool:
    """A call of a BatchNorm2d on one input whose output feeds only the node after it."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and type(submodules[node.target]) in _BATCHNORM_2D
        and len(node.args) == 1
        and not node.kwargs
        and len(node.users) == 1
    )


def _match(relu: fx.Node, submodules: dict[str, torch.nn.Module]):
    """(batch norm node, add node or None, residual or None) when relu ends a fusible chain."""
    if not _is_relu(relu, submodules) or len(relu.args) != 1:
        return None
    if relu.kwargs and relu.kwargs != {"inplace": relu.kwargs.get("inplace")}:
        return None
    source = relu.args[0]
    if _fusible_batchnorm(source, submodules):
        return source, None, None
    if not isinstance(source, fx.Node) or not _is_add(source) or len(source.users) != 1:
        return None
    first, second = source.args
    if _fusible_batchnorm(first, submodules):
        return first, source, second
    # An in-place add writes its first operand, which the fused call would no longer do.
    if _fusible_batchnorm(second, submodules) and not _adds_in_place(source):
        return second, source, first
    return None


def _fuse_graph(traced: fx.GraphModule) -> int:
    """Rewrites the fusible chains of `traced` in place; returns how many it fused."""
    submodules = dict(traced.named_modules())
    matches = [m for m in (_match(node, submodules) for node in traced.graph.nodes) if m]
    # A batch norm module called elsewhere without a ReLU after it must stay as it is.
    calls = {}
    for node in traced.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    fused_calls = {}
    for bn, _, _ in matches:
        fused_calls[bn.target] = fused_calls.get(bn.target, 0) + 1
    matches = [m for m in matches if fused_calls[m[0].target] == calls[m[0].target]]
    for bn, add, _ in matches:
        relu = next(iter((add or bn).users))
        # Read the operands now: earlier rewrites may have replaced them.
        args = (bn.args[0],)
        if add is not None:
            args += (add.args[1] if add.args[0] is bn else add.args[0],)
        with traced.graph.inserting_before(relu):
            fused = traced.graph.call_module(bn.target, args)
        fused.meta = dict(relu.meta)
        relu.replace_all_uses_with(fused)
        for node in (relu, add, bn):
            if node is not None:
                traced.graph.erase_node(node)
    for target in {bn.target for bn, _, _ in matches}:
        parent, _, name = target.rpartition(".")
        owner = traced.get_submodule(parent)
        setattr(owner, name, modules._retype(getattr(owner, name), modules.BatchNormReLU2d))
    return len(matches)


def fuse_batchnorm_relu(model: torch.nn.Module) -> torch.nn.Module:
    """An equivalent module in which every BatchNorm2d (torch's or ours) followed by a ReLU,
    with or without a residual added in between, is one BatchNormReLU2d call:
    `relu(bn(x))` and `relu(bn(x) + identity)`, ReLU as a module, a function or a method, in
    place or not, the add as `+`, `+=`, `torch.add` or `Tensor.add(_)`. The residual must have
    the batch norm output's shape (torchvision's blocks do; the op checks it).

    The model is traced with torch.fx; where it cannot be traced, each child is fused on its
    own and replaced in place in `model` (as convert_batchnorm does). Parameters and buffers
    are the very tensors of `model`, under the same state_dict keys, in the same training
    mode. A model with nothing to fuse comes back unchanged, as the same object."""
    try:
        traced = fx.symbolic_trace(model)
    except Exception:  # noqa: BLE001  Untraceable (control flow on values, ...): try the children.
        traced = None
    if traced is not None:
        if _fuse_graph(traced) == 0:
            return model
        traced.graph.lint()
        traced.delete_all_unused_submodules()
        traced.recompile()
        # The containers fx made along the module paths take their originals' modes.
        originals = dict(model.named_modules())
        for name, submodule in traced.named_modules():
            if name in originals:
                submodule.training = originals[name].training
        return traced
    for name, child in model.named_children():
        fused = fuse_batchnorm_relu(child)
        if fused is not child:
            setattr(model, name, fused)
    return model
