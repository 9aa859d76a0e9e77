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
