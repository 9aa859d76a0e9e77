"""The library's ops as Python sees them, read from their own schemas (csrc/schemas.cpp).

Each argument and result has a name, from the schema, and a role, from its name:
input-shaped (N, C, *) tensors, per-channel (C,) tensors, the step counter and flags (the
scalars and lists). Whether an argument is written (`Tensor(a!)`) is the schema's too. The
vmap rules and the reference implementation's decompositions work from this table, so no
Python code restates an op's argument list or indexes its arguments by position.
"""

import dataclasses
import enum
import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch


class Role(enum.Enum):
    INPUT_SHAPED = "input-shaped"
    PER_CHANNEL = "per-channel"
    COUNTER = "counter"
    FLAG = "flag"
    # In-place batch norm's kept input values: a flat tensor of any length.
    FLAT = "flat"


_ROLES = {
    Role.INPUT_SHAPED: (
        "input",
        "grad_output",
        "output",
        "residual",
        "grad_input",
        "grad_residual",
    ),
    Role.PER_CHANNEL: (
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "save_mean",
        "save_invstd",
        "grad_weight",
        "grad_bias",
    ),
    Role.COUNTER: ("num_batches_tracked",),
    Role.FLAT: ("kept_input",),
}
_ROLE_OF_NAME = {name: role for role, names in _ROLES.items() for name in names}


@dataclasses.dataclass(frozen=True)
class Argument:
    name: str
    role: Role
    mutated: bool


@dataclasses.dataclass(frozen=True)
class OpSignature:
    name: str
    arguments: tuple[Argument, ...]
    results: tuple[Argument, ...]
    defaults: Mapping[str, Any]

    @property
    def packet(self):
        return getattr(torch.ops.custom_bn, self.name)

    def names(self, role: Role) -> tuple[str, ...]:
        return tuple(a.name for a in self.arguments if a.role is role)

    def mutated(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.arguments if a.mutated)

    def bind(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> dict:
        """{name: value} for a call's arguments, with the schema's defaults for those left out."""
        kwargs = kwargs or {}
        values = {}
        for position, argument in enumerate(self.arguments):
            if position < len(args):
                values[argument.name] = args[position]
            elif argument.name in kwargs:
                values[argument.name] = kwargs[argument.name]
            elif argument.name in self.defaults:
                values[argument.name] = self.defaults[argument.name]
        return values

    def bind_dims(self, in_dims: Sequence[int | None]) -> dict:
        """{name: vmapped dimension}: vmap passes in_dims for the positional arguments only."""
        dims = itertools.chain(in_dims, itertools.repeat(None))
        return {a.name: d for a, d in zip(self.arguments, dims, strict=False)}

    def call(self, values: Mapping[str, Any]) -> Any:
        return self.packet(**values)

    def named_results(self, results: Any) -> dict:
        """{name: value} of the op's results (one result: {"output": it})."""
        if len(self.results) == 1:
            return {self.results[0].name: results}
        return dict(zip((r.name for r in self.results), results, strict=True))

    def adapt(self, function: Callable[..., Any]) -> Callable[..., Any]:
        """function, which takes the op's arguments by name, as a kernel called like the op."""

        @functools.wraps(function)
        def kernel(*args: Any, **kwargs: Any) -> Any:
            return function(**self.bind(args, kwargs))

        return kernel


def _role(name: str, type_: torch.Type) -> Role:
    if isinstance(type_, torch.OptionalType):
        type_ = type_.getElementType()
    is_tensor = isinstance(type_, torch.TensorType)
    if not is_tensor:
        return Role.FLAG
    if name not in _ROLE_OF_NAME:
        raise KeyError(f"custom_bn.op_table: no role for the tensor argument {name!r}")
    return _ROLE_OF_NAME[name]


@functools.cache
def signature(name: str) -> OpSignature:
    """The op `torch.ops.custom_bn.<name>` as its schema states it."""
    schema = getattr(torch.ops.custom_bn, name).default._schema
    arguments = tuple(
        Argument(a.name, _role(a.name, a.type), a.alias_info is not None and a.alias_info.is_write)
        for a in schema.arguments
    )
    defaults = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    # An op's one unnamed result is its output.
    result_names = [r.name or "output" for r in schema.returns]
    results = tuple(
        Argument(name, _role(name, r.type), False)
        for name, r in zip(result_names, schema.returns, strict=True)
    )
    return OpSignature(name, arguments, results, defaults)


# The ops the vmap rules and the decompositions serve; SyncBatchNorm's stage ops are not batched
# or decomposed.
BATCH_NORM_OPS = (
    "batch_norm",
    "batch_norm_relu",
    "batch_norm_forward",
    "batch_norm_relu_forward",
    "batch_norm_eval",
    "batch_norm_backward",
    "batch_norm_relu_backward",
)
