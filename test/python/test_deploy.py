"""Deployment: evaluation mode is functional (no mutation in an exported eval graph), and
ONNX export (both exporters, custom_bn.onnx) runs in onnxruntime like eager."""

import copy

import custom_bn
import custom_bn.onnx
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import torchvision
from samples import make_sample
from torch import nn

ops = torch.ops.custom_bn


def _with_stats(model: nn.Module, *shape: int) -> nn.Module:
    """Running stats that are not the initial ones, then eval."""
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(*shape))
    return model.eval()


def _resnet18() -> nn.Module:
    return custom_bn.convert_batchnorm(
        _with_stats(torchvision.models.resnet18(num_classes=10), 2, 3, 64, 64)
    )


def test_eval_export_has_no_mutated_buffers_as_torchs():
    theirs = _with_stats(torchvision.models.resnet18(num_classes=10), 2, 3, 64, 64)
    ours = custom_bn.convert_batchnorm(copy.deepcopy(theirs))
    x = torch.randn(2, 3, 64, 64)
    for model in (theirs, ours):
        program = torch.export.export(model, (x,)).run_decompositions()
        assert program.graph_signature.buffers_to_mutate == {}
    targets = {n.target for n in program.graph.nodes if n.op == "call_function"}
    assert ops.batch_norm_eval.default in targets and ops.batch_norm_forward.default not in targets
    torch.testing.assert_close(program.module()(x), ours(x))


def test_training_export_records_and_applies_the_running_stat_updates():
    model = custom_bn.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)))
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    program = torch.export.export(model, (x,)).run_decompositions()
    mutated = set(program.graph_signature.buffers_to_mutate.values())
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= mutated
    # The program keeps our op (only a table holding our decompositions, inductor's,
    # decomposes it).
    assert "torch.ops.custom_bn.batch_norm_forward.default" in program.graph_module.code
    module = program.module()
    torch.testing.assert_close(module(x), reference(x))
    for name, expected in reference.named_buffers():
        torch.testing.assert_close(module.get_buffer(name), expected)


@pytest.mark.parametrize("relu", [False, True])
def test_batch_norm_eval_op(relu):
    # The functional op: torch's eval batch norm (then ReLU), and nothing written.
    s = make_sample((4, 3, 5, 5), training=False, layout="channels_last")
    before = (s.running_mean.clone(), s.running_var.clone())
    residual = torch.randn_like(s.input) if relu else None
    out = ops.batch_norm_eval(
        s.input, s.weight, s.bias, s.running_mean, s.running_var, s.eps, relu, residual
    )
    expected = torch.batch_norm(
        s.input, s.weight, s.bias, s.running_mean, s.running_var, False, 0.1, s.eps, False
    )
    if relu:
        expected = torch.relu(expected + residual)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close((s.running_mean, s.running_var), before, rtol=0, atol=0)
    args = (
        s.input.requires_grad_(),
        s.weight.requires_grad_(),
        s.bias,
        s.running_mean,
        s.running_var,
        s.eps,
        relu,
        residual,
    )
    torch.library.opcheck(ops.batch_norm_eval, args)
    with pytest.raises(ValueError, match="residual .* needs relu=True"):
        ops.batch_norm_eval(
            s.input,
            s.weight,
            s.bias,
            s.running_mean,
            s.running_var,
            s.eps,
            False,
            torch.randn_like(s.input),
        )


def _run_onnx(path, *inputs):
    onnx.checker.check_model(onnx.load(path), full_check=True)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs, strict=False)}
    return [torch.from_numpy(np.asarray(y)) for y in session.run(None, feeds)]


class _ReLUBlock(nn.Module):
    """A ResNet block's end: relu(bn(conv(x)) + x) through BatchNormReLU2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = custom_bn.BatchNormReLU2d(8)

    def forward(self, x):
        return self.bn(self.conv(x), x), self.bn(x)


class _Activations(nn.Module):
    """bn(x) (+ x) through each activation the fused op applies besides ReLU, one batch norm
    each (fuse_batchnorm_relu makes each one fused call); the smooth ones take no residual."""

    def __init__(self):
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm2d(8) for _ in range(6))
        self.acts = nn.ModuleList(
            [nn.ReLU6(), nn.Hardtanh(-0.5, 0.5), nn.LeakyReLU(0.2), nn.SiLU(), nn.Hardswish(),
             nn.GELU()]
        )  # fmt: skip

    def forward(self, x):
        return (
            self.acts[0](self.bns[0](x) + x),
            self.acts[1](self.bns[1](x)),
            self.acts[2](self.bns[2](x) + x),
            *(act(bn(x)) for act, bn in zip(self.acts[3:], self.bns[3:], strict=True)),
        )


def _models():
    yield "resnet18", _resnet18(), (torch.randn(2, 3, 64, 64),)
    block = _with_stats(_ReLUBlock(), 4, 8, 6, 6)
    yield "batch_norm_relu", block, (torch.randn(4, 8, 6, 6),)
    activations = custom_bn.fuse_batchnorm_relu(_with_stats(_Activations(), 4, 8, 6, 6))
    assert len(custom_bn.fusion.fused_batch_norms(activations)) == 6
    yield "activations", activations, (torch.randn(4, 8, 6, 6) * 3,)
    bn1d = nn.Sequential(nn.Linear(5, 6), custom_bn.BatchNorm1d(6, affine=False))
    yield "batchnorm1d", _with_stats(bn1d, 8, 5), (torch.randn(8, 5),)
    bn3d = nn.Sequential(nn.Conv3d(2, 3, 1), custom_bn.BatchNorm3d(3))
    yield "batchnorm3d", _with_stats(bn3d, 2, 2, 3, 4, 5), (torch.randn(2, 2, 3, 4, 5),)


MODELS = list(_models())


def test_onnx_export_helper_runs_in_onnxruntime(tmp_path):
    name, model, inputs = MODELS[1]
    program = custom_bn.onnx.export(model, inputs)
    program.save(str(tmp_path / "block.onnx"))
    with torch.no_grad():
        expected = model(*inputs)
    for got, want in zip(_run_onnx(str(tmp_path / "block.onnx"), *inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name, model, inputs", MODELS, ids=[m[0] for m in MODELS])
def test_onnx_export_runs_in_onnxruntime_like_eager(tmp_path, dynamo, name, model, inputs):
    path = str(tmp_path / f"{name}.onnx")
    if dynamo:
        program = torch.onnx.export(
            model,
            inputs,
            dynamo=True,
            custom_translation_table=custom_bn.onnx.custom_translation_table,
        )
        program.save(path)
    else:
        torch.onnx.export(model, inputs, path, dynamo=False, opset_version=17)
    # Translated to standard ONNX (BatchNormalization, which both exporters' optimizers may
    # fold into a preceding Conv).
    assert all(node.domain in ("", "ai.onnx") for node in onnx.load(path).graph.node)
    with torch.no_grad():
        expected = model(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    for got, want in zip(_run_onnx(path, *inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_onnx_export_of_training_mode_is_refused(tmp_path):
    # The TorchScript-based exporter exports in eval unless told otherwise; told to keep
    # training mode, our symbolic refuses it.
    model = nn.Sequential(nn.Conv2d(3, 4, 1), custom_bn.BatchNorm2d(4)).train()
    with pytest.raises(RuntimeError, match="training mode is not supported"):
        torch.onnx.export(model, (torch.randn(2, 3, 4, 4),), str(tmp_path / "m.onnx"), dynamo=False,
                          training=torch.onnx.TrainingMode.TRAINING)  # fmt: skip
    # custom_bn.onnx.export refuses it with the reason; the dynamo exporter called directly
    # fails before any translation of ours runs, on the mutating training op (torch's message
    # names it).
    with pytest.raises(
        RuntimeError, match=r"training mode is not supported.*modules in training mode: 1"
    ):
        custom_bn.onnx.export(model, (torch.randn(2, 3, 4, 4),))
    with pytest.raises(Exception, match="custom_bn.batch_norm_forward"):
        torch.onnx.export(
            model,
            (torch.randn(2, 3, 4, 4),),
            dynamo=True,
            custom_translation_table=custom_bn.onnx.custom_translation_table,
        )


_BARE_IMPORT_EXPORT = """
import sys, io
sys.path.insert(0, sys.argv[1])
import torch
import custom_bn  # nothing else of ours: the TorchScript exporter's symbolics come with it
torch.ops.load_library(custom_bn.library_path())
model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), custom_bn.BatchNorm2d(4),
                            custom_bn.BatchNormReLU2d(4)).eval()
torch.onnx.export(model, (torch.randn(2, 3, 4, 4),), io.BytesIO(), dynamo=False)
assert "custom_bn.onnx" not in sys.modules
print("exported")
"""


def test_torchscript_onnx_export_works_after_a_bare_import():
    import pathlib
    import subprocess
    import sys

    package = pathlib.Path(custom_bn.__file__).parents[1]
    done = subprocess.run([sys.executable, "-c", _BARE_IMPORT_EXPORT, str(package)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and "exported" in done.stdout, done.stderr[-3000:]
