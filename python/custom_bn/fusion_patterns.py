"""The patterns fuse_batchnorm_relu (custom_bn.fusion) finds in one module's torch.fx trace
(every child a leaf): a batch norm call followed by an activation the fused op applies, with a
residual add and nn.Identity calls between, and for the in-place form the convolution outputs
that may be written over."""

import operator

import torch
from torch import fx, nn

from . import modules
from ._activation import (
    RELU,
    Activation,
    activation_of,
    fused_activation,
    is_smooth,
    piecewise_linear,
)

_BATCHNORM_2D = (nn.BatchNorm2d, modules.BatchNorm2d)
_RELU_FUNCTIONS = (torch.relu, torch.relu_, torch.nn.functional.relu)
_RELU6_FUNCTIONS = (torch.nn.functional.relu6,)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
# Producers whose output the in-place form may overwrite: a new tensor their backward does not
# read.
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _child(node: fx.Node, owner: nn.Module) -> nn.Module | None:
    return owner.get_submodule(node.target) if node.op == "call_module" else None


def _activation(node: fx.Node, owner: nn.Module) -> Activation | None:
    """The fused op's activation for a call of one it applies on one tensor (`inplace` aside):
    a ReLU, ReLU6, Hardtanh, LeakyReLU, SiLU, Hardswish or GELU module, relu or relu6 as a
    function or a method."""
    if len(node.args) != 1 or (node.kwargs and set(node.kwargs) != {"inplace"}):
        return None
    if node.op == "call_module":
        module = _child(node, owner)
        activation = fused_activation(module)
        # An Identity is not an activation here: it is skipped within chains.
        return None if type(module) is nn.Identity or _has_hooks(module) else activation
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return RELU
    if node.op == "call_function" and node.target in _RELU6_FUNCTIONS:
        return piecewise_linear(0.0, 6.0, 0.0)
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return RELU
    return None


def _is_identity(node: object, owner: nn.Module) -> bool:
    """A call of an nn.Identity child (timm's disabled drop_block and anti-aliasing)."""
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return False
    identity = _child(node, owner)
    return type(identity) is nn.Identity and not _has_hooks(identity) and len(node.users) == 1


def _is_add(node: fx.Node) -> bool:
    """A plain two-tensor add (no alpha), in place or not."""
    if len(node.args) != 2 or node.kwargs:
        return False
    if node.op == "call_function":
        return node.target in _ADD_FUNCTIONS
    return node.op == "call_method" and node.target in ("add", "add_")


def _adds_in_place(node: fx.Node) -> bool:
    return node.target in (operator.iadd, "add_")


def _skip_identities(node: object, owner: nn.Module) -> tuple[object, list[fx.Node]]:
    """The node behind a chain of Identity calls, and the chain."""
    chain = []
    while _is_identity(node, owner):
        chain.append(node)
        node = node.args[0]
    return node, chain


def _sole_call(node: object, owner: nn.Module, types: tuple) -> bool:
    """A call of a child of one of `types`, without hooks, whose output one node reads."""
    return (
        isinstance(node, fx.Node)
        and node.op == "call_module"
        and type(_child(node, owner)) in types
        and not _has_hooks(_child(node, owner))
        and len(node.users) == 1
    )


def _fusible_batchnorm(node: object, owner: nn.Module) -> bool:
    """A call of a 2-D batch norm child on one input whose output feeds only the next node."""
    return _sole_call(node, owner, _BATCHNORM_2D) and len(node.args) == 1 and not node.kwargs


def _match(relu: fx.Node, owner: nn.Module):
    """(batch norm node, nodes to remove, residual or None, activation) when relu (a call of an
    activation) ends a fusible chain."""
    activation = _activation(relu, owner)
    if activation is None:
        return None
    source, chain = _skip_identities(relu.args[0], owner)
    if _fusible_batchnorm(source, owner):
        return source, [relu, *chain], None, activation
    # The op takes no residual with a smooth activation (its backward would have to keep it).
    if (
        is_smooth(activation)
        or not isinstance(source, fx.Node)
        or not _is_add(source)
        or len(source.users) != 1
    ):
        return None
    first, second = source.args
    bn, before = _skip_identities(first, owner)
    if _fusible_batchnorm(bn, owner):
        return bn, [relu, *chain, source, *before], second, activation
    # An in-place add writes its first operand, which the fused call would no longer do.
    bn, before = _skip_identities(second, owner)
    if _fusible_batchnorm(bn, owner) and not _adds_in_place(source):
        return bn, [relu, *chain, source, *before], first, activation
    return None


def _writable(node: object, owner: nn.Module) -> bool:
    """Whether the in-place form may overwrite node's value: the output of a convolution child
    without hooks, which nothing else reads."""
    return _sole_call(node, owner, _CONVOLUTIONS)


def _inplace_candidates(graph: fx.Graph, owner: nn.Module, matched: set) -> list[fx.Node]:
    """Batch norm calls on a convolution's output that no activation chain took (in place, with
    the identity), and fused modules (BatchNormReLU2d) with a piecewise-linear activation."""
    found = []
    for node in graph.nodes:
        if node in matched or node.op != "call_module" or len(node.args) != 1 or node.kwargs:
            continue
        child = _child(node, owner)
        if _has_hooks(child) or not _writable(node.args[0], owner):
            continue
        if type(child) in _BATCHNORM_2D:
            found.append(node)
        elif type(child) is modules.BatchNormReLU2d and not is_smooth(activation_of(child)):
            found.append(node)
    return found
