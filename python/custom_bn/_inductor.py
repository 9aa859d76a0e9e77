"""Evaluation-mode batch norm as TorchInductor's own pointwise code.

In evaluation mode batch norm is a per-channel affine map. Under TorchInductor (the default
backend of torch.compile, and AOTInductor) torch's BatchNorm becomes inductor code that is
fused with the ReLU and residual add around it, so it costs no pass of its own. An opaque
`custom_bn::batch_norm_eval` call would cost one (docs/perf.md row 37). So inductor gets a
decomposition of that op: the same formula as our kernels, in their compute type.

Only inductor's table gets it: `torch.export`, the ONNX exporters, eager mode and the other
compile backends keep `custom_bn::batch_norm_eval`. Training keeps our kernels everywhere.

Importing inductor costs seconds, which eager users should not pay: the decomposition is
registered when `torch._inductor.decomposition` is first imported (torch.compile does that on
its first inductor compile), or at once if it already is.
"""

import importlib.machinery
import sys

import torch

_INDUCTOR_DECOMPOSITIONS = "torch._inductor.decomposition"


def batch_norm_eval(
    input: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    relu: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """relu?((input - mean) * invstd * weight + bias + residual), computed as our CPU and CUDA
    kernels compute it: float32 for reduced-precision input, float64 for float64."""
    compute = torch.promote_types(input.dtype, torch.float32)
    per_channel = [1, -1] + [1] * (input.dim() - 2)
    scale = torch.rsqrt(running_var.to(compute) + eps)
    if weight is not None:
        scale = scale * weight.to(compute)
    out = (input.to(compute) - running_mean.to(compute).view(per_channel)) * scale.view(per_channel)
    if bias is not None:
        out = out + bias.to(compute).view(per_channel)
    if residual is not None:
        out = out + residual.to(compute)
    if relu:
        out = torch.relu(out)
    return out.to(input.dtype)


def _register(decomposition_module) -> None:
    op = torch.ops.custom_bn.batch_norm_eval.default
    if op not in decomposition_module.decompositions:
        decomposition_module.register_decomposition(op)(batch_norm_eval)
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
    module = sys.modules.get(_INDUCTOR_DECOMPOSITIONS)
    if module is not None:
        _register(module)
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
