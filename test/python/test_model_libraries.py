"""The passes over models from the libraries users train with (timm, segmentation_models_pytorch,
MONAI) at random init, CPU, small inputs, nothing downloaded: what convert_batchnorm and
fuse_batchnorm_relu convert, that the result trains in float64 lockstep with the original and
agrees in eval, that the libraries' own batch norm helpers work on converted models as on
torch's, and that the fused model keeps the library's API."""

import copy
import warnings

import custom_bn
import pytest
import torch
import torch.nn.functional as F
from custom_bn.fusion import fused_batch_norms
from torch import nn

timm = pytest.importorskip("timm")
smp = pytest.importorskip("segmentation_models_pytorch")
monai = pytest.importorskip("monai")


def _batch_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _ours(model: nn.Module) -> int:
    return sum(type(m).__module__.startswith("custom_bn") for m in _batch_norms(model))


def _outputs(model, x):
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out[0]


def _lockstep(model: nn.Module, other: nn.Module, shape, steps=2, classify=True, eval_tol=1e-8):
    """Trains both with the same batches (and dropout masks), then compares them in eval
    (relative tolerance eval_tol)."""
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, other)]
    for step in range(steps):
        x = torch.randn(shape, dtype=torch.float64)
        losses = []
        for m, optimizer in zip((model, other), optimizers, strict=True):
            m.train()
            optimizer.zero_grad()
            torch.manual_seed(step)
            out = _outputs(m, x)
            loss = (
                out.square().mean()
                if not classify
                else F.cross_entropy(out, torch.zeros(shape[0], dtype=torch.long))
            )
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=1e-12)
    for (key, a), b in zip(model.state_dict().items(), other.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-10, msg=lambda m, k=key: f"{k}: {m}")
    model.eval(), other.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(
        _outputs(other, x), _outputs(model, x), rtol=eval_tol, atol=eval_tol / 100
    )


TIMM_COVERAGE = [("efficientnet_b0", 49), ("mobilenetv3_large_100", 46), ("regnetx_002", 44)]


@pytest.mark.parametrize("name, layers", TIMM_COVERAGE, ids=[n for n, _ in TIMM_COVERAGE])
def test_timm_batch_norm_act_layers_all_convert(name, layers):
    model = timm.create_model(name, num_classes=4)
    assert len(_batch_norms(model)) == layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left unconverted
        converted = custom_bn.convert_batchnorm(model, strict=True)
    assert _ours(converted) == layers
    # Every BatchNormAct2d with an activation (SiLU, Hardswish, ReLU) runs the fused op.
    activated = [
        m
        for m in converted.modules()
        if isinstance(m, timm.layers.BatchNormAct2d) and type(m.act) is not nn.Identity
    ]
    with _OpsCalled() as called:
        converted.train()(torch.randn(2, 3, 32, 32))
    assert called.names.count("custom_bn::batch_norm_relu_forward") == len(activated) > 0


def test_timm_efficientnet_converted_trains_in_lockstep():
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=4, drop_rate=0.2).double()
    converted = custom_bn.convert_batchnorm(copy.deepcopy(model), strict=True)
    assert list(converted.state_dict()) == list(model.state_dict())
    _lockstep(model, converted, (2, 3, 48, 48))


def test_timm_frozen_conversion_covers_batch_norm_act():
    model = timm.create_model("efficientnet_b0", num_classes=4).double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    expected = model(x)
    frozen = custom_bn.convert_batchnorm(copy.deepcopy(model), frozen=True, strict=True).train()
    assert _batch_norms(frozen) == []
    torch.testing.assert_close(frozen(x), expected, rtol=1e-9, atol=1e-10)


class _OpsCalled(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the ops called below autograd."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(
    "act_layer,fused",
    [
        (nn.ReLU6, True),
        (lambda inplace=False: nn.LeakyReLU(0.2, inplace), True),
        (nn.SiLU, True),
        (nn.Hardswish, True),
        (lambda inplace=False: nn.GELU(), True),
        ("gelu", True),  # timm's own GELU class
        ("gelu_tanh", False),
        ("mish", False),
    ],
    ids=["relu6", "leaky_relu", "silu", "hardswish", "gelu", "timm_gelu", "gelu_tanh", "mish"],
)
def test_timm_batch_norm_act_runs_the_fused_op_where_it_applies_the_activation(act_layer, fused):
    torch.manual_seed(0)
    layer = timm.layers.BatchNormAct2d(6, act_layer=act_layer)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), layer).double()
    converted = custom_bn.convert_batchnorm(copy.deepcopy(model), strict=True)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    for training in (True, False):
        with _OpsCalled() as called:
            copy.deepcopy(converted).train(training)(x)
        if training:
            forward = "batch_norm_relu_forward" if fused else "batch_norm_forward"
            assert f"custom_bn::{forward}" in called.names
        else:
            assert "custom_bn::batch_norm_eval" in called.names
    _lockstep(model, converted, (4, 3, 8, 8), classify=False)
    frozen = custom_bn.convert_batchnorm(copy.deepcopy(model), frozen=True, strict=True)
    torch.testing.assert_close(frozen(x), model.eval()(x), rtol=1e-9, atol=1e-10)


def test_timm_mobilenetv2_runs_its_relu6_layers_on_the_fused_op_in_lockstep():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_100", num_classes=4).double()
    converted = custom_bn.convert_batchnorm(copy.deepcopy(model), strict=True)
    assert _ours(converted) == 52
    with _OpsCalled() as called:
        copy.deepcopy(converted).train()(torch.randn(2, 3, 32, 32, dtype=torch.float64))
    # 35 BatchNormAct2d with ReLU6 on the fused op, the 17 without an activation on batch_norm.
    assert called.names.count("custom_bn::batch_norm_relu_forward") == 35
    assert called.names.count("custom_bn::batch_norm_forward") == 17
    # Trained briefly at these small sizes, this network amplifies float64 rounding enormously
    # in eval: after one step at 2 x 48 px, torch against itself with its parameters moved by
    # 1e-12 (relative) gives outputs 2.7e-6 apart (values up to 48). Torch's kernels and ours
    # round differently (losses 1e-11 apart), which here leaves eval outputs up to 6.5e-8
    # apart, so they are compared to 1e-6; from the same state they agree to 5e-13.
    _lockstep(model, converted, (4, 3, 64, 64), eval_tol=1e-6)


def test_timm_helpers_work_on_converted_models():
    from timm.layers import freeze_batch_norm_2d, unfreeze_batch_norm_2d

    for name, layers in (("resnet18", 20), ("efficientnet_b0", 49)):
        model = custom_bn.convert_batchnorm(timm.create_model(name, num_classes=4))
        assert isinstance(model.bn1, nn.BatchNorm2d)
        frozen = freeze_batch_norm_2d(model)
        assert _batch_norms(frozen) == []
        unfrozen = unfreeze_batch_norm_2d(frozen)
        assert len(_batch_norms(unfrozen)) == layers
    # reparameterize_model walks isinstance checks too.
    model = custom_bn.convert_batchnorm(timm.create_model("resnet18", num_classes=4)).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    torch.testing.assert_close(timm.utils.reparameterize_model(model)(x), expected)


def test_sync_batch_norm_converters_keep_the_activation():
    model = custom_bn.convert_batchnorm(timm.create_model("efficientnet_b0", num_classes=4))
    model = model.double().eval()
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    expected = model(x)
    # timm's converter knows its BatchNormAct2d (ours subclass it); ours gives our
    # synchronized variant of it, which runs without a process group as the local op.
    theirs = timm.layers.convert_sync_batchnorm(copy.deepcopy(model))
    ours = custom_bn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    assert all(hasattr(m, "act") for m in _batch_norms(theirs) if hasattr(model, "act"))
    torch.testing.assert_close(ours(x), expected)
    # torch's converter (and Lightning's, which calls it) leaves the fused module alone.
    fused = nn.Sequential(nn.Conv2d(3, 4, 1), custom_bn.BatchNormReLU2d(4)).double().eval()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert type(converted[1]) is custom_bn.BatchNormReLU2d
    synced = custom_bn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert type(synced[1]) is custom_bn.SyncBatchNormReLU2d
    y = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(synced(y), fused(y))
    assert synced(y).min() >= 0


def _fuse_and_compare(model: nn.Module, shape, expect_warning: bool = False):
    model = model.double()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    reference = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused = custom_bn.fuse_batchnorm_relu(model)
    assert any("depends on self.training" in str(w.message) for w in caught) == expect_warning
    assert type(fused) is type(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    x = torch.randn(shape, dtype=torch.float64)
    for training in (True, False):
        reference.train(training), fused.train(training)
        torch.manual_seed(1)
        expected = _outputs(reference, x)
        torch.manual_seed(1)
        torch.testing.assert_close(_outputs(fused, x), expected, rtol=1e-9, atol=1e-10)
    return fused


def test_fused_timm_models_compute_the_same_in_both_modes_and_keep_their_api():
    fused = _fuse_and_compare(timm.create_model("resnet18", num_classes=4), (2, 3, 32, 32))
    # bn1 -> Identity (drop_block) -> act1 in every block, the stem, and bn2 + shortcut.
    assert len(fused_batch_norms(fused)) == 17
    assert fused.forward_features(torch.randn(1, 3, 32, 32, dtype=torch.float64)).dim() == 4
    fused.reset_classifier(7)
    assert fused.get_classifier().out_features == 7
    assert fused.pretrained_cfg == timm.create_model("resnet18").pretrained_cfg
    # Dropout in the head reads self.training: the root stays as it is, with a warning.
    dropout = timm.create_model("resnet18", num_classes=4, drop_rate=0.5)
    fused = _fuse_and_compare(dropout, (2, 3, 32, 32), expect_warning=True)
    assert "bn1" not in fused_batch_norms(fused)
    _fuse_and_compare(timm.create_model("ghostnet_100", num_classes=4), (2, 3, 32, 32),
                      expect_warning=True)  # fmt: skip


def test_smp_models_convert_and_fuse():
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=2)
    fused = _fuse_and_compare(unet, (2, 3, 64, 64))
    assert len(fused_batch_norms(fused)) > 0
    assert fused.predict(torch.randn(1, 3, 64, 64, dtype=torch.float64)).shape == (1, 2, 64, 64)
    assert callable(fused.save_pretrained)
    efficient = smp.Unet("tu-efficientnet_b0", encoder_weights=None, classes=2)
    layers = len(_batch_norms(efficient))
    assert _ours(custom_bn.convert_batchnorm(efficient, strict=True)) == layers
    _fuse_and_compare(smp.DeepLabV3Plus("resnet18", encoder_weights=None, classes=2),
                      (2, 3, 64, 64))  # fmt: skip


def test_smp_unet_converted_trains_in_lockstep():
    torch.manual_seed(0)
    unet = smp.Unet("resnet18", encoder_weights=None, classes=2, decoder_channels=(32, 16, 8, 8, 8))
    unet = unet.double()
    initial = copy.deepcopy(unet)
    converted = custom_bn.convert_batchnorm(copy.deepcopy(unet), strict=True)
    fused = custom_bn.fuse_batchnorm_relu(custom_bn.convert_batchnorm(copy.deepcopy(unet)))
    assert len(fused_batch_norms(fused)) > 0
    _lockstep(unet, converted, (2, 3, 64, 64), classify=False)
    _lockstep(initial, fused, (2, 3, 64, 64), classify=False)


def test_monai_3d_net_converts_and_trains_in_lockstep():
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
               norm="batch").double()  # fmt: skip
    layers = len(_batch_norms(net))
    converted = custom_bn.convert_batchnorm(copy.deepcopy(net), strict=True)
    assert layers > 0 and _ours(converted) == layers
    _lockstep(net, converted, (2, 1, 8, 8, 8), classify=False)


def test_strict_conversion_refuses_before_converting_anything():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.SyncBatchNorm(3))
    with pytest.raises(ValueError, match="1 torch.nn.modules.batchnorm.SyncBatchNorm"):
        custom_bn.convert_batchnorm(model, strict=True)
    assert type(model[0]) is nn.BatchNorm2d
    with pytest.warns(UserWarning, match="does not convert: 1 torch"):
        converted = custom_bn.convert_batchnorm(model)
    assert type(converted[0]) is custom_bn.BatchNorm2d
