"""AOTInductor end to end: a converted ResNet-18 exported in eval, compiled with
aoti_compile_and_package, loaded in fresh processes (Python with and without custom_bn, and the
C++ example examples/aoti_classify.cpp linked to the library), matching eager; and a
training-mode package run without the library."""

import pathlib
import subprocess
import sys

import custom_bn
import pytest
import torch
import torchvision
from conftest import ROOT, library_path

SHAPE = (2, 3, 64, 64)


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """(path of the .pt2, input, eager output)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    with torch.no_grad():
        model(torch.randn(*SHAPE))  # running stats that are not the initial ones
    model = custom_bn.convert_batchnorm(model).eval()
    x = torch.randn(*SHAPE)
    program = torch.export.export(model, (x,))
    path = tmp_path_factory.mktemp("aoti") / "resnet18.pt2"
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    with torch.no_grad():
        expected = model(x)
    return path, x, expected


def _python(code: str) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT / "python")}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_package_runs_in_a_fresh_python_process_that_imports_custom_bn(package, tmp_path):
    path, x, expected = package
    torch.save(x, tmp_path / "x.pt")
    result = _python(
        "import torch, custom_bn\n"
        f"model = torch._inductor.aoti_load_package({str(path)!r})\n"
        f"torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
    )
    assert result.returncode == 0, result.stderr
    torch.testing.assert_close(torch.load(tmp_path / "y.pt"), expected, rtol=1e-4, atol=1e-4)


def _run_without_the_library(path, x, tmp_path) -> torch.Tensor:
    """The package's output for x, from a fresh Python process that never loads custom_bn."""
    torch.save(x, tmp_path / "x.pt")
    result = _python(
        "import sys, torch\n"
        f"model = torch._inductor.aoti_load_package({str(path)!r})\n"
        f"torch.save(model(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})\n"
        "assert not any(name.startswith('custom_bn') for name in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    return torch.load(tmp_path / "y.pt")


def test_eval_package_runs_without_the_library(package, tmp_path):
    # Inductor compiles batch norm into its own code (custom_bn._inductor), so the package
    # calls no custom_bn op: a process that never loads the library runs it.
    path, x, expected = package
    got = _run_without_the_library(path, x, tmp_path)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_training_package_runs_without_the_library(tmp_path):
    """A training-mode program too: batch statistics, computed by inductor's code."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU())
    model = custom_bn.convert_batchnorm(model).train()
    x = torch.randn(4, 3, 12, 12)
    program = torch.export.export(model, (x,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "t.pt2"))
    got = _run_without_the_library(path, x, tmp_path)
    torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-4)


def test_cpp_example_runs_the_package(package, tmp_path):
    build = pathlib.Path(library_path()).parent
    if not (build / "CMakeCache.txt").exists():
        pytest.skip(f"{build} is not a CMake build directory with examples/aoti_classify")
    path, x, expected = package
    raw = tmp_path / "x.f32"
    x[:1].contiguous().numpy().tofile(raw)
    command = [str(build / "aoti_classify"), str(path), str(raw), "1", *map(str, SHAPE[1:])]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(":", 1) for line in result.stdout.strip().splitlines())
    logits = torch.tensor([float(v) for v in lines["logits"].split()])
    torch.testing.assert_close(logits, expected[0], rtol=1e-4, atol=1e-4)
    assert int(lines["top class"]) == expected[0].argmax().item()
