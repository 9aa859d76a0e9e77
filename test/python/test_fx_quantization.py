"""torch.fx and torch.ao.quantization on converted models: our modules stay leaves as torch's
do, and quantization fuses them as torch's (custom_bn/quantization.py), with the results of
the same pipeline run on torch's modules."""

import copy

import custom_bn
import pytest
import torch
import torch.ao.nn.intrinsic as nni
import torch.ao.quantization as tq
import torchvision
from torch import nn
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx, prepare_qat_fx


def _trained_stats(model: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    """Running stats that are not the initial ones, so that folding them is visible."""
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
    return model


def _conv_bn_relu(dims: int = 2) -> nn.Sequential:
    conv, bn = {
        1: (nn.Conv1d, nn.BatchNorm1d),
        2: (nn.Conv2d, nn.BatchNorm2d),
        3: (nn.Conv3d, nn.BatchNorm3d),
    }[dims]
    return nn.Sequential(conv(3, 8, 3), bn(8), nn.ReLU(), conv(8, 4, 1), bn(4))


def _input(dims: int = 2, n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, *([9] * dims))


def test_symbolic_trace_keeps_our_modules_as_leaves_and_runs():
    model = torchvision.models.resnet18(num_classes=10)
    ours = custom_bn.convert_batchnorm(copy.deepcopy(model))
    traced = torch.fx.symbolic_trace(ours)
    targets = [n.target for n in traced.graph.nodes if n.op == "call_module"]
    bn_names = [name for name, m in ours.named_modules() if isinstance(m, custom_bn.BatchNorm2d)]
    assert len(bn_names) == 20 and all(name in targets for name in bn_names)
    assert not any(n.target is torch.ops.custom_bn.batch_norm.default for n in traced.graph.nodes)
    # Same graph as torch's: every BN is one call_module node in the same place.
    assert targets == [
        n.target for n in torch.fx.symbolic_trace(model).graph.nodes if n.op == "call_module"
    ]

    x = torch.randn(2, 3, 64, 64)
    for mode in ("train", "eval"):  # the training flag is the module's, not frozen in the graph
        getattr(model, mode)(), getattr(traced, mode)()
        torch.testing.assert_close(traced(x), model(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(traced.get_buffer("bn1.running_mean"), model.bn1.running_mean)
    assert traced.bn1.num_batches_tracked.item() == model.bn1.num_batches_tracked.item() == 1


@pytest.mark.parametrize(
    "module",
    [custom_bn.BatchNormReLU2d(8), custom_bn.FrozenBatchNorm2d(8), custom_bn.SyncBatchNorm(8)],
)
def test_symbolic_trace_keeps_every_module_kind_as_a_leaf(module):
    model = nn.Sequential(nn.Conv2d(3, 8, 1), module)
    traced = torch.fx.symbolic_trace(model)
    assert [n.target for n in traced.graph.nodes if n.op == "call_module"] == ["0", "1"]
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(traced(x), copy.deepcopy(model)(x))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fx_optimization_fuse_folds_ours_as_torchs(dims):
    # torch's pass matches batch norm by exact type; custom_bn widens its matcher on import
    # (custom_bn/_fx_optimization.py), so ours are folded into the convolution as torch's.
    from torch.fx.experimental.optimization import fuse

    theirs = _trained_stats(_conv_bn_relu(dims), _input(dims), _input(dims)).eval()
    ours = custom_bn.convert_batchnorm(copy.deepcopy(theirs))
    fused_theirs, fused_ours = fuse(theirs), fuse(ours)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused_ours.modules())
    assert [type(m) for m in fused_ours.children()] == [type(m) for m in fused_theirs.children()]
    x = _input(dims)
    torch.testing.assert_close(fused_ours(x), fused_theirs(x))
    torch.testing.assert_close(fused_ours(x), ours(x), rtol=1e-5, atol=1e-5)


def test_fx_optimization_fuse_folds_linear_and_our_batchnorm1d():
    from torch.fx.experimental.optimization import fuse

    theirs = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
    _trained_stats(theirs, torch.randn(8, 6)).eval()
    ours = custom_bn.convert_batchnorm(copy.deepcopy(theirs))
    fused = fuse(ours)
    assert [type(m) for m in fused.children()] == [nn.Linear, nn.ReLU]
    x = torch.randn(4, 6)
    torch.testing.assert_close(fused(x), fuse(theirs)(x))
    torch.testing.assert_close(fused(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_fx_optimization_fuse_of_a_converted_resnet_matches_torchs():
    from torch.fx.experimental.optimization import fuse

    theirs, ours = _resnet_pair()
    fused_theirs, fused_ours = fuse(theirs), fuse(ours)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused_ours.modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fused_ours(x), fused_theirs(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_fuse_modules_folds_ours_as_torchs(dims):
    theirs = _trained_stats(_conv_bn_relu(dims), _input(dims), _input(dims)).eval()
    ours = custom_bn.convert_batchnorm(copy.deepcopy(theirs))
    groups = [["0", "1", "2"], ["3", "4"]]
    fused_theirs = tq.fuse_modules(copy.deepcopy(theirs), groups)
    fused_ours = tq.fuse_modules(ours, groups)
    assert [type(m) for m in fused_ours] == [type(m) for m in fused_theirs]
    assert type(fused_ours[0]).__name__.startswith("ConvReLU") and isinstance(
        fused_ours[3], nn.Conv1d | nn.Conv2d | nn.Conv3d
    )
    x = _input(dims)
    torch.testing.assert_close(fused_ours(x), fused_theirs(x))
    torch.testing.assert_close(fused_ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_fuse_modules_qat_and_prepare_qat_match_torch():
    theirs = _trained_stats(_conv_bn_relu(), _input()).train()
    ours = custom_bn.convert_batchnorm(copy.deepcopy(theirs))
    prepared = []
    for model in (theirs, ours):
        model.qconfig = tq.get_default_qat_qconfig("fbgemm")
        fused = tq.fuse_modules_qat(model, [["0", "1", "2"], ["3", "4"]])
        assert isinstance(fused[0], nni.ConvBnReLU2d) and isinstance(fused[3], nni.ConvBn2d)
        prepared.append(tq.prepare_qat(fused))
    x = _input()
    for _ in range(2):  # QAT steps: observers and the folded batch norm's statistics move alike
        torch.testing.assert_close(prepared[1](x), prepared[0](x))
    torch.testing.assert_close(prepared[1][0].bn.running_var, prepared[0][0].bn.running_var)


def test_fuse_modules_with_the_mapping_passed_explicitly():
    model = custom_bn.convert_batchnorm(_conv_bn_relu()).eval()
    config = {"additional_fuser_method_mapping": custom_bn.quantization.FUSER_METHOD_MAPPING}
    fused = tq.fuse_modules(model, [["0", "1", "2"]], fuse_custom_config_dict=config)
    assert isinstance(fused[0], nni.ConvReLU2d)


def _resnet_pair():
    theirs = torchvision.models.resnet18(num_classes=10)
    _trained_stats(theirs, torch.randn(4, 3, 32, 32))
    return theirs.eval(), custom_bn.convert_batchnorm(copy.deepcopy(theirs)).eval()


def _our_config(explicit: bool):
    """Our backend config passed explicitly, or None: torch's default, which has ours too."""
    return custom_bn.quantization.get_backend_config() if explicit else None


@pytest.mark.parametrize("explicit", [False, True], ids=["default_config", "explicit_config"])
def test_prepare_fx_and_convert_fx_match_torch(explicit):
    theirs, ours = _resnet_pair()
    example = (torch.randn(2, 3, 32, 32),)
    qconfig = tq.get_default_qconfig_mapping("fbgemm")
    calibration = [torch.randn(2, 3, 32, 32) for _ in range(3)]
    results = []
    for model, config in ((theirs, None), (ours, _our_config(explicit))):
        prepared = prepare_fx(model, qconfig, example, backend_config=config)
        for x in calibration:
            prepared(x)
        results.append((prepared, convert_fx(prepared, backend_config=config)))
    # Ours are folded into the convolutions exactly as torch's: no batch norm is left.
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in results[1][1].modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(results[1][0](x), results[0][0](x))
    torch.testing.assert_close(results[1][1](x), results[0][1](x))


@pytest.mark.parametrize("explicit", [False, True], ids=["default_config", "explicit_config"])
def test_prepare_qat_fx_matches_torch(explicit):
    theirs, ours = _resnet_pair()
    example = (torch.randn(2, 3, 32, 32),)
    qconfig = tq.get_default_qat_qconfig_mapping("fbgemm")
    prepared = [
        prepare_qat_fx(model.train(), qconfig, example, backend_config=config)
        for model, config in ((theirs, None), (ours, _our_config(explicit)))
    ]
    assert not any(isinstance(m, custom_bn.BatchNorm2d) for m in prepared[1].modules())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(prepared[1](x), prepared[0](x))
