"""The fake kernel of batch_norm_relu_forward_ (in-place activated batch norm), for FakeTensors
(torch.compile, torch.export, opcheck).

Its result kept_input holds the input values the backward cannot recover from the output, a
number that depends on the data. The C++ Meta kernel cannot give such a size and refuses, as
ATen's nonzero does on meta tensors; this kernel, registered over it
(`register_fake(..., allow_override=True)`), gives kept_input a size of its own (an unbacked
symbol, `new_dynamic_size`), after the checks of the out-of-place op's Meta kernel. With
`keep_input=False` the size is 0, as the C++ kernel says.

batch_norm_relu_ returns only its input; the symbol of the kept_input its Autograd kernel saves
is internal to it. Dynamo refuses an op that makes a symbol it does not return, so where no
graph is being recorded (Dynamo running the op on FakeTensors, not AOTAutograd tracing it, which
records batch_norm_relu_forward_ and binds the symbol to its result), the symbol is made as one
that is discarded (`ShapeEnv.ignore_fresh_unbacked_symbols`).

Hook points: `torch.fx.experimental.proxy_tensor.get_proxy_mode` (private), and
`torch.library.register_fake`'s `allow_override` (newer than some torch versions custom_bn
supports). Where one is missing, in-place batch norm under torch.compile is turned off with a
warning; eager mode keeps it."""

import contextlib
import inspect

import torch

from ..op_table import signature
from .hooks import MissingHookPoint, hook_point

FEATURE = "torch.compile tracing in-place activated batch norm (batch_norm_relu_forward_)"
_NAME = "batch_norm_relu_forward_"


def _fake_forward(get_proxy_mode):
    def forward(*args, **kwargs):
        call = signature(_NAME).bind(args, kwargs)
        keep_input = call.pop("keep_input")
        # The out-of-place op's Meta kernel: the same checks, the statistics' sizes.
        _, save_mean, save_invstd = signature("batch_norm_relu_forward").call(call)
        input = call["input"]
        if not keep_input:
            return save_mean, save_invstd, input.new_empty(0)
        # At most input.numel(), a bound torch takes only as a plain int.
        numel = input.numel()
        bound = numel if isinstance(numel, int) else None
        fake_mode = getattr(input, "fake_mode", None)  # None: meta tensors, which cannot
        shape_env = fake_mode.shape_env if fake_mode is not None else None
        discarded = shape_env is not None and get_proxy_mode() is None
        with shape_env.ignore_fresh_unbacked_symbols() if discarded else contextlib.nullcontext():
            kept = torch.library.get_ctx().new_dynamic_size(max=bound)
        return save_mean, save_invstd, input.new_empty(kept)

    return forward


def install() -> None:
    get_proxy_mode = hook_point("torch.fx.experimental.proxy_tensor", "get_proxy_mode")
    if "allow_override" not in inspect.signature(torch.library.register_fake).parameters:
        raise MissingHookPoint("torch.library.register_fake has no allow_override")
    op = f"custom_bn::{_NAME}"
    torch.library.register_fake(op, _fake_forward(get_proxy_mode), allow_override=True)
