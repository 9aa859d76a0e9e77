"""The custom_bn Python package: modules, functional, convert_batchnorm, compile, script."""

import copy
import os
import pathlib
import shutil
import subprocess
import sys

import custom_bn  # noqa: E402  (conftest puts python/ on the path)
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

TORCH_MODULES = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
OUR_MODULES = {1: custom_bn.BatchNorm1d, 2: custom_bn.BatchNorm2d, 3: custom_bn.BatchNorm3d}
SHAPES = {1: [(16, 6), (8, 6, 5)], 2: [(4, 6, 5, 5)], 3: [(2, 6, 3, 4, 5)]}


def make_pair(d, **options):
    theirs = TORCH_MODULES[d](6, **options)
    ours = OUR_MODULES[d](6, **options)
    if theirs.affine:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"momentum": None},
        {"affine": False},
        {"track_running_stats": False},
        {"momentum": 0.5, "eps": 1e-3},
    ],
    ids=["default", "momentum-none", "no-affine", "untracked", "momentum-eps"],
)
def test_modules_train_like_torch(d, options):
    ours, theirs = make_pair(d, **options)
    for shape in SHAPES[d]:
        for step in range(4):
            if step == 3:
                ours.eval(), theirs.eval()
            x = torch.randn(shape) * (step + 1) + step
            if d == 2 and step % 2:
                x = x.to(memory_format=torch.channels_last)
            x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
            y1, y2 = ours(x1), theirs(x2)
            torch.testing.assert_close(y1, y2)
            assert y1.stride() == y2.stride()
            g = torch.randn_like(y2)
            y1.backward(g), y2.backward(g)
            torch.testing.assert_close(x1.grad, x2.grad)
        ours.train(), theirs.train()
    for (name, a), (_, b) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=False
    ):
        torch.testing.assert_close(a, b, msg=name)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=False):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4)


def test_state_dict_round_trips_both_ways():
    theirs = torch.nn.BatchNorm2d(3)
    theirs(torch.randn(4, 3, 2, 2))
    ours = custom_bn.BatchNorm2d(3)
    ours.load_state_dict(theirs.state_dict())
    assert ours.num_batches_tracked.item() == 1
    ours(torch.randn(4, 3, 2, 2))
    back = torch.nn.BatchNorm2d(3)
    back.load_state_dict(ours.state_dict())
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value)
    assert list(ours.state_dict()) == list(theirs.state_dict())


def test_input_dims_are_checked_like_torch():
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        custom_bn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"expected 2D or 3D input \(got 4D input\)"):
        custom_bn.BatchNorm1d(3)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match=r"expected 5D input \(got 4D input\)"):
        custom_bn.BatchNorm3d(3)(torch.randn(2, 3, 4, 4))


def test_functional_matches_torch():
    x = torch.randn(8, 4, 3)
    rm, rv = torch.zeros(4), torch.ones(4)
    rm2, rv2 = rm.clone(), rv.clone()
    w, b = torch.rand(4), torch.randn(4)
    ours = custom_bn.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.2)
    theirs = F.batch_norm(x, rm2, rv2, w, b, training=True, momentum=0.2)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)
    torch.testing.assert_close(
        custom_bn.functional.batch_norm(x, rm, rv), F.batch_norm(x, rm2, rv2)
    )
    with pytest.raises(ValueError) as ours_error:
        custom_bn.functional.batch_norm(torch.randn(1, 4), None, None, training=True)
    with pytest.raises(ValueError) as torch_error:
        F.batch_norm(torch.randn(1, 4), None, None, training=True)
    assert str(ours_error.value) == str(torch_error.value).replace("torch.Size(", "").replace(
        ")", ""
    )


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3, padding=1),
            torch.nn.BatchNorm2d(8),
            torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, padding=1),
            torch.nn.BatchNorm2d(16, momentum=None),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(2),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Sequential(
            torch.nn.Linear(64, 32),
            torch.nn.BatchNorm1d(32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 3),
        )

    def forward(self, x):
        return self.head(self.features(x))


def train_steps(model, batches, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_convert_batchnorm_keeps_state_and_trains_in_lockstep():
    original = SmallNet()
    original(torch.randn(4, 1, 6, 6))  # some running stats to keep
    converted = custom_bn.convert_batchnorm(copy.deepcopy(original))
    kinds = [type(m) for m in converted.modules()]
    assert custom_bn.BatchNorm2d in kinds and custom_bn.BatchNorm1d in kinds
    assert torch.nn.BatchNorm2d not in kinds and torch.nn.BatchNorm1d not in kinds
    assert converted.features[4].momentum is None
    for (k1, v1), (k2, v2) in zip(
        original.state_dict().items(), converted.state_dict().items(), strict=False
    ):
        assert k1 == k2 and torch.equal(v1, v2)

    batches = [(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))) for _ in range(6)]
    losses_original = train_steps(original, batches)
    losses_converted = train_steps(converted, batches)
    torch.testing.assert_close(losses_converted, losses_original, rtol=1e-4, atol=1e-5)
    for (k1, v1), (_, v2) in zip(
        original.state_dict().items(), converted.state_dict().items(), strict=False
    ):
        torch.testing.assert_close(v2, v1, rtol=1e-4, atol=1e-5, msg=k1)
    original.eval(), converted.eval()
    x = torch.randn(5, 1, 6, 6)
    torch.testing.assert_close(converted(x), original(x), rtol=1e-4, atol=1e-5)


def test_convert_keeps_the_very_parameters_mode_and_device():
    bn = torch.nn.BatchNorm2d(3).eval()
    ours = custom_bn.convert_batchnorm(bn)
    assert isinstance(ours, custom_bn.BatchNorm2d)
    assert ours.weight is bn.weight and ours.running_mean is bn.running_mean
    assert not ours.training
    assert ours.weight.device == bn.weight.device


class Doubled(torch.nn.Module):
    def forward(self, weight):
        return 2 * weight


def test_parametrized_weight_is_what_the_forward_reads():
    # A parametrization moves the weight out of _parameters behind a property; the forward
    # must read the property, as torch's does, and the gradient must reach the original.
    ours, theirs = make_pair(2)
    for bn in (ours, theirs):
        torch.nn.utils.parametrize.register_parametrization(bn, "weight", Doubled())
    x, grad = torch.randn(4, 6, 5, 5), torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(ours(x), theirs(x))
    # Not .sum(): its weight gradient, the sum of normalized values, is rounding noise.
    ours(x).backward(grad)
    theirs(x).backward(grad)
    original = "parametrizations.weight.original"
    torch.testing.assert_close(
        ours.get_parameter(original).grad, theirs.get_parameter(original).grad
    )


@pytest.mark.parametrize("training", [True, False])
def test_functional_call_swaps_parameters_and_buffers(training):
    ours, theirs = make_pair(2)
    ours.train(training), theirs.train(training)
    swapped = {
        "weight": torch.rand(6) + 0.5,
        "bias": torch.randn(6),
        "running_mean": torch.randn(6),
        "running_var": torch.rand(6) + 0.5,
        "num_batches_tracked": torch.tensor(3),
    }
    ours_state = {k: v.clone() for k, v in swapped.items()}
    theirs_state = {k: v.clone() for k, v in swapped.items()}
    x = torch.randn(4, 6, 5, 5)
    out = torch.func.functional_call(ours, ours_state, (x,))
    torch.testing.assert_close(out, torch.func.functional_call(theirs, theirs_state, (x,)))
    for name in swapped:
        torch.testing.assert_close(ours_state[name], theirs_state[name])
    # The module's own state is untouched.
    torch.testing.assert_close(ours.running_mean, torch.zeros(6))
    assert ours.num_batches_tracked.item() == 0


def test_frozen_reads_swapped_and_reassigned_tensors():
    frozen = custom_bn.convert_batchnorm(make_pair(2)[1].eval(), frozen=True)
    reference = torch.nn.BatchNorm2d(6).eval()
    x = torch.randn(4, 6, 5, 5)
    state = {
        "weight": torch.rand(6) + 0.5,
        "bias": torch.randn(6),
        "running_mean": torch.randn(6),
        "running_var": torch.rand(6) + 0.5,
    }
    torch.testing.assert_close(
        torch.func.functional_call(frozen, state, (x,)),
        torch.func.functional_call(reference, state, (x,)),
    )
    # A buffer deleted and set again as a plain attribute is read as one.
    del frozen.bias
    frozen.bias = state["bias"]
    frozen.weight, frozen.running_mean, frozen.running_var = (
        state["weight"], state["running_mean"], state["running_var"]
    )  # fmt: skip
    reference.load_state_dict(state, strict=False)
    torch.testing.assert_close(frozen(x), reference(x))


def test_compile_fullgraph_with_momentum_none_matches_eager():
    torch._dynamo.reset()
    eager = custom_bn.convert_batchnorm(SmallNet())
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True)
    batches = [(torch.randn(16, 1, 6, 6), torch.randint(0, 3, (16,))) for _ in range(4)]
    losses_eager = train_steps(eager, batches)
    losses_compiled = train_steps(compiled, batches)
    torch.testing.assert_close(losses_compiled, losses_eager, rtol=1e-4, atol=1e-5)
    for (k, v1), (_, v2) in zip(
        eager.state_dict().items(), compiled_model.state_dict().items(), strict=False
    ):
        torch.testing.assert_close(v2, v1, rtol=1e-4, atol=1e-5, msg=k)
    assert compiled_model.features[4].num_batches_tracked.item() == 4


def test_torch_jit_script():
    bn = custom_bn.BatchNorm2d(4, momentum=None)
    scripted = torch.jit.script(copy.deepcopy(bn))
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(scripted(x), bn(x))
    torch.testing.assert_close(scripted.running_mean, bn.running_mean)
    assert scripted.num_batches_tracked.item() == 1


def run_import(env_library):
    env = dict(os.environ, CUSTOM_BN_LIBRARY=env_library, PYTHONPATH=str(ROOT / "python"))
    return subprocess.run(
        [sys.executable, "-c", "import custom_bn"], env=env, capture_output=True, text=True
    )


def test_import_fails_clearly_without_the_library(tmp_path):
    result = run_import(str(tmp_path / "missing" / "libcustom_bn.so"))
    assert result.returncode != 0
    assert "libcustom_bn.so not found" in result.stderr and "missing" in result.stderr


def test_import_fails_clearly_for_another_torch(tmp_path):
    library = tmp_path / "libcustom_bn.so"
    shutil.copy(custom_bn.library_path(), library)
    (tmp_path / "torch_version.txt").write_text("1.0.0\n")  # never the running torch
    result = run_import(str(library))
    assert result.returncode != 0
    assert "built against torch 1.0.0" in result.stderr and torch.__version__ in result.stderr


def test_library_path_points_at_the_loaded_library():
    assert pathlib.Path(custom_bn.library_path()).is_file()
    assert hasattr(torch.ops.custom_bn, "batch_norm")
