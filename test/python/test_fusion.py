"""custom_bn.fuse_batchnorm_relu: BN then ReLU, with or without a residual in between,
becomes one batch_norm_relu call, and the fused model computes and trains as the original."""

import copy

import custom_bn
import pytest
import torch
import torch.nn.functional as F
import torchvision
from custom_bn.fusion import fused_batch_norms
from torch import nn


def _assert_same_in_both_modes(model: nn.Module, fused: nn.Module, x: torch.Tensor) -> None:
    """fused(x) is model(x) in training and in eval, with the same random draws (dropout,
    drop-path)."""
    for training in (True, False):
        model.train(training), fused.train(training)
        torch.manual_seed(1)
        expected = model(x)
        torch.manual_seed(1)
        torch.testing.assert_close(fused(x), expected, rtol=1e-9, atol=1e-11)


def _fused_calls(model: nn.Module) -> int:
    return len(fused_batch_norms(model))


def _train_in_lockstep(model: nn.Module, fused: nn.Module, steps: int, shape) -> None:
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (model, fused)]
    for _ in range(steps):
        x = torch.randn(shape, dtype=torch.float64)
        target = torch.randint(0, 10, (shape[0],))
        losses = []
        for m, optimizer in zip((model, fused), optimizers, strict=True):
            optimizer.zero_grad()
            loss = F.cross_entropy(m(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-9, atol=0)
    fused_state = fused.state_dict()
    assert list(fused_state) == list(model.state_dict())
    for key, value in model.state_dict().items():
        torch.testing.assert_close(
            fused_state[key], value, rtol=1e-7, atol=1e-9, msg=lambda m, key=key: f"{key}: {m}"
        )


# Every block's BN then ReLU (with the residual in the last) and the stem's; in place also the
# downsampling branches' BN (no activation), every one on a convolution's output.
@pytest.mark.parametrize(
    "arch, inplace, fusions",
    [
        ("resnet18", False, 17),
        ("resnet50", False, 49),
        ("resnet18", True, 20),
        ("resnet50", True, 53),
    ],
)
@pytest.mark.parametrize("convert_first", [False, True])
def test_fused_resnet_trains_in_lockstep_in_float64(arch, inplace, fusions, convert_first):
    model = getattr(torchvision.models, arch)(num_classes=10).double()
    if convert_first:
        model = custom_bn.convert_batchnorm(model)
    fused = custom_bn.fuse_batchnorm_relu(copy.deepcopy(model), inplace=inplace)
    assert _fused_calls(fused) == fusions
    _train_in_lockstep(model, fused, steps=2, shape=(4, 3, 64, 64))
    model.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-7, atol=1e-9)


def test_fused_model_keeps_parameters_buffers_mode_and_class():
    model = torchvision.models.resnet18(num_classes=10).eval()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    fused = custom_bn.fuse_batchnorm_relu(model)
    assert type(fused) is torchvision.models.ResNet and fused is not model
    assert not fused.training and not fused.get_submodule("layer1.0.bn2").training
    for name, parameter in model.named_parameters():
        assert fused.get_parameter(name) is parameter
    for name, buffer in model.named_buffers():
        assert fused.get_buffer(name) is buffer
    # The original model is untouched: its modules, their forwards and its state.
    assert "forward" not in model.__dict__ and "forward" not in model.layer1[0].__dict__
    assert fused_batch_norms(model) == []
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    # The fused model's own methods still compute the model (through the unfused modules).
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fused._forward_impl(x), fused(x))
    # Its modules are its own: its mode is not the model's.
    fused.train()
    assert not model.training and not model.layer1[0].bn2.training


def test_fused_model_compiles_fullgraph():
    model = torchvision.models.resnet18(num_classes=10)
    fused = custom_bn.fuse_batchnorm_relu(copy.deepcopy(model))
    compiled = torch.compile(fused, fullgraph=True)
    x = torch.randn(4, 3, 64, 64)
    y = compiled(x)
    y.sum().backward()
    expected = model(x)
    torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fused.bn1.running_var, model.bn1.running_var)


def test_model_without_a_fusible_pattern_comes_back_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sigmoid(), nn.ReLU())
    assert custom_bn.fuse_batchnorm_relu(model) is model
    # BatchNormReLU2d is 2-D: a 3-D batch norm then ReLU stays as it is.
    model = nn.Sequential(nn.BatchNorm3d(4), nn.ReLU())
    assert custom_bn.fuse_batchnorm_relu(model) is model


class _Block(nn.Module):
    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, identity):
        out = self.bn(x)
        if self.form == "iadd":
            out += identity
            return self.relu(out)
        if self.form == "add_right":
            return F.relu(identity + out)
        if self.form == "torch_add":
            return torch.relu(torch.add(out, identity))
        if self.form == "method":
            return out.add_(identity).relu_()
        if self.form == "inplace_functional":
            return F.relu(out, inplace=True)
        raise AssertionError(self.form)


@pytest.mark.parametrize("form", ["iadd", "add_right", "torch_add", "method", "inplace_functional"])
def test_every_spelling_of_relu_and_add_fuses(form):
    model = _Block(form)
    fused = custom_bn.fuse_batchnorm_relu(copy.deepcopy(model))
    assert _fused_calls(fused) == 1
    x, identity = torch.randn(3, 4, 5, 5, requires_grad=True), torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(fused(x, identity.clone()), model(x, identity.clone()))
    torch.testing.assert_close(fused.bn.running_mean, model.bn.running_mean)


def test_in_place_add_into_the_residual_is_left_alone():
    # identity += bn(x) writes identity, which the fused call would not.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x, identity):
            identity += self.bn(x)
            return F.relu(identity), identity

    model = Block()
    assert custom_bn.fuse_batchnorm_relu(model) is model


def test_batch_norm_also_called_without_relu_fuses_only_where_relu_follows():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            return F.relu(self.bn(x)) + self.bn(x * 2)

    model = Shared().double()
    fused = custom_bn.fuse_batchnorm_relu(copy.deepcopy(model))
    assert fused_batch_norms(fused) == ["bn"]
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    for training in (True, False):
        model.train(training), fused.train(training)
        torch.testing.assert_close(fused(x), model(x))
        torch.testing.assert_close(fused.bn.running_var, model.bn.running_var)


def test_untraceable_parent_has_its_children_fused():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), custom_bn.BatchNorm2d(4), nn.ReLU())

        def forward(self, x):
            return self.body(x) if x.sum() > 0 else -self.body(x)

    model = DataDependent()
    expected_x = torch.randn(2, 3, 4, 4)
    expected = copy.deepcopy(model)(expected_x)
    fused = custom_bn.fuse_batchnorm_relu(model)
    assert type(fused) is DataDependent and _fused_calls(fused.body) == 1
    assert _fused_calls(model.body) == 0
    torch.testing.assert_close(fused(expected_x), expected)


# Every Conv2dNormActivation's BN -> ReLU6; the projections' BN has no activation (fused in
# place only, with the identity).
@pytest.mark.parametrize("inplace, fusions", [(False, 35), (True, 52)])
def test_mobilenet_relu6_fuses_and_trains_in_lockstep_in_float64(inplace, fusions):
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35, dropout=0.0).double()
    fused = custom_bn.fuse_batchnorm_relu(copy.deepcopy(model), inplace=inplace)
    assert _fused_calls(fused) == fusions
    _train_in_lockstep(model, fused, steps=2, shape=(4, 3, 64, 64))
    model.eval(), fused.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(fused(x), model(x), rtol=1e-7, atol=1e-9)


def test_mobilenet_with_dropout_fuses_keeping_its_class_modes_and_input():
    # Its classifier's Dropout reads self.training; the root's own forward does not.
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35, dropout=0.5).double()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    fused = custom_bn.fuse_batchnorm_relu(model)
    assert type(fused) is type(model) and fused is not model and _fused_calls(fused) == 35
    # Fusing wrote nothing of the input model and rewrote none of its forwards.
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert _fused_calls(model) == 0
    assert not any("forward" in m.__dict__ for m in model.modules())
    _assert_same_in_both_modes(model, fused, torch.randn(2, 3, 32, 32, dtype=torch.float64))


@pytest.mark.parametrize(
    "activation",
    [nn.ReLU6(inplace=True), nn.Hardtanh(-0.5, 0.5), nn.LeakyReLU(0.2), F.relu6],
    ids=["relu6", "hardtanh", "leaky_relu", "functional_relu6"],
)
def test_each_activation_the_op_applies_fuses(activation):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.act = activation if isinstance(activation, nn.Module) else nn.Identity()

        def forward(self, x, identity):
            out = self.bn(x) + identity
            return self.act(out) if isinstance(activation, nn.Module) else activation(out)

    model = Block()
    fused = custom_bn.fuse_batchnorm_relu(copy.deepcopy(model))
    assert _fused_calls(fused) == 1
    for training in (True, False):
        model.train(training), fused.train(training)
        x, identity = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
        torch.testing.assert_close(fused(x, identity.clone()), model(x, identity.clone()))
    torch.testing.assert_close(fused.bn.running_var, model.bn.running_var)


def test_activations_the_op_does_not_apply_are_not_fused():
    for activation in (nn.LeakyReLU(-0.1), nn.GELU(approximate="tanh"), nn.Mish()):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), activation)
        assert custom_bn.fuse_batchnorm_relu(model) is model


@pytest.mark.parametrize("activation", [nn.SiLU, nn.Hardswish, nn.GELU])
def test_smooth_activations_fuse_without_a_residual_only(activation):
    """BN -> SiLU / Hardswish / GELU fuses; with a residual added in between it does not (the
    op takes no residual with a smooth activation)."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
            self.act1, self.act2 = activation(), activation()

        def forward(self, x):
            out = self.act1(self.bn1(self.conv(x)))
            return self.act2(self.bn2(out) + x)

    torch.manual_seed(0)
    model = Block().double()
    reference = copy.deepcopy(model)
    fused = custom_bn.fuse_batchnorm_relu(model)
    assert type(fused) is Block and fused is not model and _fused_calls(fused) == 1
    assert _fused_calls(model) == 0  # the input model's forward is untouched
    for training in (True, False):
        reference.train(training), fused.train(training)
        x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 3
        torch.testing.assert_close(fused(x), reference(x))
    torch.testing.assert_close(fused.bn1.running_var, reference.bn1.running_var)


SWEEP = ["densenet121", "shufflenet_v2_x0_5", "regnet_y_400mf", "mnasnet0_5", "vgg11_bn"]
# BN -> SiLU (EfficientNet) and BN -> Hardswish (MobileNetV3), with stochastic depth and
# dropout, which read self.training.
SWEEP += ["efficientnet_b0", "mobilenet_v3_small"]


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("name", SWEEP)
def test_torchvision_models_fuse_exactly_in_both_modes(name, inplace):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=5).double()
    reference = copy.deepcopy(model)
    converted = custom_bn.convert_batchnorm(model)
    fused = custom_bn.fuse_batchnorm_relu(converted, inplace=inplace)
    assert type(fused) is type(reference) and _fused_calls(fused) > 0
    assert _fused_calls(converted) == 0  # the input model's forward is untouched
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    before = x.clone()
    _assert_same_in_both_modes(reference, fused, x)
    assert torch.equal(x, before)


def test_tracing_leaves_the_input_models_buffers_as_they_were():
    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls += 1  # runs once per trace
            return F.relu(self.bn(x))

    model = Counting()
    fused = custom_bn.fuse_batchnorm_relu(model)
    assert model.calls.item() == 0 and _fused_calls(fused) == 1


def test_forward_with_a_default_argument_is_not_traced():
    # fx would trace `mask` as given (a proxy, so "not None") and bake that branch in.
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x, mask=None):
            out = F.relu(self.bn(x))
            return out if mask is None else out * mask

    model = Masked()
    fused = custom_bn.fuse_batchnorm_relu(model)
    assert fused is model
    assert model(torch.randn(2, 4, 3, 3)).shape == (2, 4, 3, 3)


def test_inplace_resnet_with_zero_init_residual_trains_in_lockstep_in_float64():
    # Every block's last BN starts at weight 0, where the output gives nothing back: the
    # in-place op keeps those inputs, and the weight gradient there must still be right.
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10, zero_init_residual=True).double()
    fused = custom_bn.fuse_batchnorm_relu(copy.deepcopy(model), inplace=True)
    assert _fused_calls(fused) == 20
    _train_in_lockstep(model, fused, steps=3, shape=(4, 3, 64, 64))
    for name, parameter in fused.named_parameters():
        if name.endswith("bn2.weight"):
            assert parameter.abs().sum() > 0, name  # it left zero: its gradient was not lost


def test_inplace_fusion_leaves_the_input_and_other_readers_untouched():
    # The model's input and a convolution output that something else reads stay as they were.
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.bn_in = nn.BatchNorm2d(3)
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            z = torch.relu(self.bn(y))
            return self.bn_in(x).mean() + z + y + torch.relu(self.bn2(self.conv2(z)))

    model = Block().double()
    fused = custom_bn.fuse_batchnorm_relu(copy.deepcopy(model), inplace=True)
    # bn (its input y is read again) and bn_in (the input) out of place, bn2 in place.
    assert _fused_calls(fused) == 2
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    before = x.clone()
    _assert_same_in_both_modes(model, fused, x)
    assert torch.equal(x, before)
