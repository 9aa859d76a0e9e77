"""Evaluation-mode batch norm under TorchInductor: custom_bn.reference's formula against
our kernel, the compiled code calling no custom_bn op, every other path keeping it, and when
custom_bn.integrations.inductor registers the decompositions (training:
test_inductor_training.py)."""

import subprocess
import sys

import custom_bn
import pytest
import torch
from conftest import ROOT
from custom_bn import reference
from samples import DTYPES, SHAPES, layouts_for, make_input, tolerance
from torch._inductor.utils import run_and_get_code

ops = torch.ops.custom_bn

CASES = [(dim, layout) for dim in SHAPES for layout in layouts_for(dim)]


def _eval_arguments(shape, dtype_name, layout, affine=True, residual=False):
    input_dtype, param_dtype = DTYPES[dtype_name]
    x = make_input(shape, input_dtype, layout)
    c = shape[1]
    weight = torch.rand(c, dtype=param_dtype) + 0.5 if affine else None
    bias = torch.randn(c, dtype=param_dtype) if affine else None
    mean = torch.randn(c, dtype=param_dtype)
    var = torch.rand(c, dtype=param_dtype) + 0.5
    r = make_input(shape, input_dtype, layout) if residual else None
    return x, weight, bias, mean, var, r


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("dim,layout", CASES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (True, True)])
def test_decomposition_equals_the_kernel(dtype_name, dim, layout, affine, relu, residual):
    x, w, b, mean, var, r = _eval_arguments(SHAPES[dim], dtype_name, layout, affine, residual)
    expected = ops.batch_norm_eval(x, w, b, mean, var, 1e-5, relu, r)
    got = reference.run("batch_norm_eval", x, w, b, mean, var, 1e-5, relu, r)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected, **tolerance(x.dtype))


def _compiled(fn, *args):
    """fn's outputs under inductor, and the code inductor generated for it (compiled afresh:
    a cache hit would generate none)."""
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True)
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
    ):
        out, code = run_and_get_code(compiled, *args)
    assert code, "inductor generated no code"
    return out, "\n".join(code)


@pytest.mark.parametrize("dtype_name", ["float32", "float64", "bfloat16+float32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_compiled_eval_is_inductor_code_that_matches_eager(dtype_name, layout):
    x, w, b, mean, var, r = _eval_arguments((3, 8, 5, 6), dtype_name, layout, residual=True)

    def block(x, r):
        plain = ops.batch_norm(x, w, b, mean, var, False, 0.1, 1e-5)
        fused = ops.batch_norm_relu(x, w, b, mean, var, False, 0.1, 1e-5, None, r)
        return torch.relu(plain), fused

    (plain, fused), code = _compiled(block, x, r)
    assert "torch.ops.custom_bn" not in code  # no call (source comments may name the op)
    expected_plain, expected_fused = block(x, r)
    torch.testing.assert_close(plain, expected_plain, **tolerance(x.dtype))
    torch.testing.assert_close(fused, expected_fused, **tolerance(x.dtype))
    if layout == "channels_last":
        assert plain.is_contiguous(memory_format=torch.channels_last)
        assert fused.is_contiguous(memory_format=torch.channels_last)


def test_compiled_eval_with_dynamic_shapes():
    _, w, b, mean, var, _ = _eval_arguments((2, 3, 5), "float32", "contiguous")

    def fn(x):
        return ops.batch_norm(x, w, b, mean, var, False, 0.1, 1e-5)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="inductor", fullgraph=True, dynamic=True)
    for n in (4, 7, 9):
        x = torch.randn(n, 3, 5)
        torch.testing.assert_close(compiled(x), fn(x))


def test_compiled_eval_gradients_match_eager():
    """Fine-tuning with frozen statistics: eval batch norm inside a differentiated graph."""
    model = custom_bn.convert_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU())
    )
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(4, 3, 9, 9)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    grads = []
    for forward in (model, compiled):
        model.zero_grad()
        forward(x).square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager_grad, compiled_grad in zip(*grads, strict=True):
        torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-4)


def test_errors_still_raise_under_compile():
    x = torch.randn(2, 3, 4)

    def fn(x):
        return ops.batch_norm(x, None, None, torch.zeros(4), torch.ones(4), False, 0.1, 1e-5)

    torch._dynamo.reset()
    with pytest.raises(Exception, match="running_mean"):
        torch.compile(fn, backend="inductor", fullgraph=True)(x)


def test_export_and_other_backends_keep_the_op():
    model = custom_bn.convert_batchnorm(
        torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    ).eval()
    program = torch.export.export(model, (torch.randn(2, 3, 5, 5),)).run_decompositions()
    targets = {str(node.target) for node in program.graph.nodes}
    assert "custom_bn.batch_norm_eval.default" in targets
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm)
        return gm

    torch._dynamo.reset()
    torch.compile(model, backend=keep_graph)(torch.randn(2, 3, 5, 5))
    assert "custom_bn.batch_norm" in str(graphs[0].graph)


def _python(code: str) -> str:
    env = {"PYTHONPATH": str(ROOT / "python")}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


def test_import_does_not_load_inductor_and_registers_when_inductor_loads():
    code = (
        "import sys, torch, custom_bn\n"
        "print('torch._inductor.decomposition' in sys.modules)\n"
        "from torch._inductor import decomposition\n"
        "from custom_bn.integrations.inductor import DECOMPOSED\n"
        "ops = [getattr(torch.ops.custom_bn, n).default for n in DECOMPOSED]\n"
        "print(all(op in decomposition.select_decomp_table() for op in ops))\n"
    )
    assert _python(code).split() == ["False", "True"]


def test_registers_when_inductor_was_loaded_first():
    code = (
        "import torch\n"
        "from torch._inductor import decomposition\n"
        "decomposition.select_decomp_table()\n"  # fills inductor's cached table
        "import custom_bn\n"
        "from custom_bn.integrations.inductor import DECOMPOSED\n"
        "ops = [getattr(torch.ops.custom_bn, n).default for n in DECOMPOSED]\n"
        "print(all(op in decomposition.select_decomp_table() for op in ops))\n"
    )
    assert _python(code) == "True"
