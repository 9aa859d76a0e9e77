"""custom_bn.integrations: each hook point torch may move turns one integration off with a
warning and leaves the import, the ops and torch.compile working; no private torch name
outside the integrations folder; the op table read from the schemas."""

import ast
import json
import os
import pathlib
import subprocess
import sys

import custom_bn
import pytest
import torch
from conftest import ROOT
from custom_bn import op_table
from custom_bn.integrations import fx, inductor, onnx_torchscript, quantization, vmap

PACKAGE = ROOT / "python" / "custom_bn"
_ENV = {**os.environ, "PYTHONPATH": str(ROOT / "python"), "OMP_NUM_THREADS": "1"}

# Each hook point: "module:attribute", the integration that loses it and, where the name is
# looked up when another module is imported, that module.
HOOK_POINTS = [
    ("torch.library:register_vmap", vmap, None),
    ("torch.fx.experimental.proxy_tensor:CURRENT_DECOMPOSITION_TABLE", inductor, None),
    ("torch._ops:OperatorBase.py_impl", inductor, None),
    ("torch._inductor.decomposition:fast_random_decomps", inductor, None),
    ("torch._inductor.decomposition:register_decomposition", inductor, None),
    ("torch.fx.experimental.optimization:matches_module_pattern", fx, None),
    (
        "torch.ao.quantization.fuser_method_mappings:_DEFAULT_OP_LIST_TO_FUSER_METHOD",
        quantization,
        None,
    ),
    ("torch.ao.quantization.backend_config:BackendConfig", quantization, None),
    (
        "torch.ao.quantization.fx.prepare:get_native_backend_config",
        quantization,
        "torch.ao.quantization.fx.prepare",
    ),
    ("torch.onnx:register_custom_op_symbolic", onnx_torchscript, None),
]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=_ENV, capture_output=True, text=True, timeout=600)


def test_a_moved_hook_point_turns_one_integration_off():
    """Each hook point removed in turn, each in a process of its own (hook_removal.py)."""
    specs = [hook + (f"@{later}" if later else "") for hook, _, later in HOOK_POINTS]
    result = _run(
        [sys.executable, str(pathlib.Path(__file__).with_name("hook_removal.py")), *specs]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    reports = json.loads(result.stdout.strip().splitlines()[-1])
    failures = {}
    for (hook, integration, _), spec in zip(HOOK_POINTS, specs, strict=True):
        report = reports[spec]
        name = integration.__name__.rsplit(".", 1)[-1]
        others_on = all(on for n, on in report.get("installed", {}).items() if n != name)
        messages = report.get("warnings", [])
        lost = hook.split(":")[1].split(".")[-1]
        named = len(messages) == 1 and integration.FEATURE in messages[0] and lost in messages[0]
        if "error" in report or not named or not others_on:
            failures[hook] = report
    assert failures == {}


def _python(code: str) -> str:
    result = _run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_a_failing_registration_does_not_escape_inductors_import():
    _python(
        "import warnings, torch, custom_bn\n"
        "from custom_bn.integrations import inductor\n"
        "def moved(module): raise AttributeError('decompositions')\n"
        "inductor._register = moved\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import torch._inductor.decomposition\n"
        "assert any(inductor.FEATURE in str(w.message) for w in caught), caught\n"
        "model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.ReLU())\n"
        "x = torch.randn(2, 5)\n"
        "torch.testing.assert_close(torch.compile(model)(x), model(x))\n"
    )


def _torch_names(tree: ast.Module) -> set[str]:
    """The names a module binds to torch's modules and objects by its imports."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(
                (a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("torch")
            )
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            names.update(a.asname or a.name for a in node.names)
    return names


def _private_torch_uses(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text())
    torch_names = _torch_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
            )
            imported = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                if module.startswith("torch") and any(p.startswith("_") for p in module.split(".")):
                    found.append(f"{path.name}:{node.lineno} imports {module}")
            if modules[0].startswith("torch"):
                found += [
                    f"{path.name}:{node.lineno} imports {n}" for n in imported if n.startswith("_")
                ]
        elif (
            isinstance(node, ast.Attribute)
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ):
            chain, root = [node.attr], node.value
            while isinstance(root, ast.Attribute):
                chain.append(root.attr)
                root = root.value
            from_torch = isinstance(root, ast.Name) and root.id in torch_names
            ours = "custom_bn" in chain  # torch.ops.custom_bn._result_cache_bytes: our op
            if from_torch and not ours:
                found.append(
                    f"{path.name}:{node.lineno} uses {'.'.join([root.id, *reversed(chain)])}"
                )
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if node.value.startswith("torch._"):
                found.append(f"{path.name}:{node.lineno} names {node.value}")
    return found


def test_private_torch_names_only_in_the_integrations_folder():
    outside = [
        p for p in PACKAGE.rglob("*.py") if "integrations" not in p.relative_to(PACKAGE).parts
    ]
    found = [use for path in outside for use in _private_torch_uses(path)]
    assert found == []
    # The check finds what it looks for: the integrations do use private names.
    inside = [
        use for p in (PACKAGE / "integrations").glob("*.py") for use in _private_torch_uses(p)
    ]
    assert any("torch._C" in use for use in inside) and any("torch_nn.py" in use for use in inside)


def test_no_positional_argument_lists_in_the_package():
    for path in PACKAGE.rglob("*.py"):
        assert "fmt: skip" not in path.read_text(), path


# What each op writes, by its schema.
WRITES = {
    "batch_norm": {"running_mean", "running_var", "num_batches_tracked"},
    "batch_norm_relu": {"running_mean", "running_var", "num_batches_tracked"},
    "batch_norm_forward": {"running_mean", "running_var", "num_batches_tracked"},
    "batch_norm_relu_forward": {"running_mean", "running_var", "num_batches_tracked"},
    "batch_norm_eval": set(),
    "batch_norm_backward": set(),
    "batch_norm_relu_backward": set(),
}


@pytest.mark.parametrize("name", op_table.BATCH_NORM_OPS)
def test_the_op_table_reads_the_schema(name):
    op = op_table.signature(name)
    schema = getattr(torch.ops.custom_bn, name).default._schema
    assert [a.name for a in op.arguments] == [a.name for a in schema.arguments]
    assert set(op.mutated()) == WRITES[name]
    assert "input" in op.names(op_table.Role.INPUT_SHAPED)
    assert "weight" in op.names(op_table.Role.PER_CHANNEL)
    assert "eps" in op.names(op_table.Role.FLAG)
    values = op.bind(range(len(op.arguments)))
    assert list(values) == [a.name for a in schema.arguments]
    assert list(values.values()) == list(range(len(op.arguments)))


def test_the_op_table_fills_defaults_and_names_results():
    op = op_table.signature("batch_norm_relu")
    values = op.bind(("x", "w", "b", "m", "v", True, 0.1, 1e-5))
    assert values["num_batches_tracked"] is None and values["residual"] is None
    backward = op_table.signature("batch_norm_relu_backward")
    assert [r.name for r in backward.results] == [
        "grad_input",
        "grad_weight",
        "grad_bias",
        "grad_residual",
    ]
    assert [r.role for r in op_table.signature("batch_norm_forward").results] == [
        op_table.Role.INPUT_SHAPED,
        op_table.Role.PER_CHANNEL,
        op_table.Role.PER_CHANNEL,
    ]


def test_import_installs_every_integration_and_loads_quantization_and_onnx_on_first_use():
    output = _python(
        "import sys, warnings\n"
        "warnings.filterwarnings('error', message='custom_bn')\n"
        "import custom_bn\n"
        "print(all(custom_bn.integrations.status.values()))\n"
        "print('custom_bn.quantization' in sys.modules, 'custom_bn.onnx' in sys.modules)\n"
        "print(len(custom_bn.quantization.FUSER_METHOD_MAPPING) > 0)\n"
    )
    assert output.split() == ["True", "False", "False", "True"]
    assert custom_bn.quantization.get_backend_config() is not None
