"""custom_bn.FrozenBatchNorm2d: the running statistics always, through the eval kernel, also
after a parent's .train(); nothing requires grad; its state_dict is torchvision's
FrozenBatchNorm2d's and loads from torch.nn.BatchNorm2d's; convert_batchnorm(frozen=True)."""

import custom_bn
import pytest
import torch
import torchvision


def trained_bn(channels=4):
    bn = torch.nn.BatchNorm2d(channels).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bn(torch.randn(8, channels, 5, 5, dtype=torch.float64) * 3 + 1)  # moves the running stats
    return bn.eval()


def test_matches_torchvision_and_stays_frozen_under_train():
    source = trained_bn()
    theirs = torchvision.ops.FrozenBatchNorm2d(4).double()
    theirs.load_state_dict(source.state_dict())
    ours = custom_bn.FrozenBatchNorm2d(4).double()
    ours.load_state_dict(theirs.state_dict())
    parent = torch.nn.Sequential(ours).train()
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(parent(x), theirs(x))
    torch.testing.assert_close(parent(x), source(x))
    assert list(ours.parameters()) == []
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    parent(x)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_state_dict_goes_both_ways():
    ours = custom_bn.FrozenBatchNorm2d(4).double()
    ours.load_state_dict(trained_bn().state_dict())  # num_batches_tracked ignored
    assert set(ours.state_dict()) == set(torchvision.ops.FrozenBatchNorm2d(4).state_dict())
    back = torch.nn.BatchNorm2d(4).double()
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back.running_var, ours.running_var)


def test_gradients_flow_to_the_input_only():
    ours = custom_bn.FrozenBatchNorm2d(4).double()
    ours.load_state_dict(trained_bn().state_dict())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(ours, (x,))


def test_convert_batchnorm_frozen():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), trained_bn(), torch.nn.ReLU()).double()
    expected = model.eval()(torch.ones(1, 3, 2, 2, dtype=torch.float64))
    frozen = custom_bn.convert_batchnorm(model, frozen=True).train()
    assert isinstance(frozen[1], custom_bn.FrozenBatchNorm2d)
    torch.testing.assert_close(frozen(torch.ones(1, 3, 2, 2, dtype=torch.float64)), expected)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        custom_bn.convert_batchnorm(torch.nn.BatchNorm2d(3, track_running_stats=False), frozen=True)


def test_frozen_keeps_float64_and_matches_torchvision_exactly():
    source = torch.nn.BatchNorm2d(6).double()
    with torch.no_grad():
        source.weight.normal_(1, 0.3), source.bias.normal_()
        source.running_mean.normal_(), source.running_var.uniform_(0.5, 2)
    ours = custom_bn.convert_batchnorm(torch.nn.Sequential(source), frozen=True)[0]
    theirs = torchvision.ops.FrozenBatchNorm2d(6).double()
    theirs.load_state_dict(source.state_dict())
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].dtype == torch.float64
        assert torch.equal(ours.state_dict()[key], value), key
    x = torch.randn(3, 6, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-13, atol=1e-13)
    # Copies, not the source's tensors: the frozen layer does not move when the source trains.
    assert ours.weight.data_ptr() != source.weight.data_ptr()


def test_torchvision_frozen_batch_norm_converts_keeping_its_state():
    theirs = torchvision.ops.FrozenBatchNorm2d(5, eps=0.0).double()
    with torch.no_grad():
        theirs.running_var.uniform_(0.5, 2), theirs.weight.normal_()
    model = torch.nn.Sequential(theirs)
    x = torch.randn(2, 5, 3, 3, dtype=torch.float64)
    expected = model(x)
    for frozen in (False, True):
        converted = custom_bn.convert_batchnorm(torch.nn.Sequential(theirs), frozen=frozen)
        assert type(converted[0]) is custom_bn.FrozenBatchNorm2d
        assert converted[0].eps == 0.0 and converted[0].num_features == 5
        assert converted.state_dict().keys() == model.state_dict().keys()
        torch.testing.assert_close(converted(x), expected, rtol=1e-13, atol=1e-13)


def _frozen_detector():
    """Faster R-CNN whose ResNet-50 backbone holds torchvision's FrozenBatchNorm2d, as
    `weights_backbone=...` builds it, at random init (nothing is downloaded)."""
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
    from torchvision.ops import FrozenBatchNorm2d

    torch.manual_seed(0)
    backbone = torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d)
    for module in backbone.modules():
        if isinstance(module, FrozenBatchNorm2d):
            module.running_mean.normal_(0, 0.1), module.running_var.uniform_(0.5, 1.5)
    backbone = _resnet_fpn_extractor(backbone, trainable_layers=3)
    return FasterRCNN(backbone, num_classes=3, min_size=96, max_size=96).double().eval()


def test_detection_model_with_frozen_backbone_converts_and_detects_the_same():
    model = _frozen_detector()
    images = [torch.rand(3, 96, 96, dtype=torch.float64)]
    with torch.no_grad():
        expected = model(images)[0]
    frozen_layers = sum(type(m) is torchvision.ops.FrozenBatchNorm2d for m in model.modules())
    for frozen in (False, True):
        converted = custom_bn.convert_batchnorm(_frozen_detector(), frozen=frozen, strict=True)
        ours = sum(type(m) is custom_bn.FrozenBatchNorm2d for m in converted.modules())
        assert ours == frozen_layers == 53
        with torch.no_grad():
            got = converted(images)[0]
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(got[key], expected[key], rtol=1e-9, atol=1e-9)
