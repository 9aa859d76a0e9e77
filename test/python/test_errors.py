"""Bad calls raise before writing anything, with messages naming the argument."""

import pytest
import torch
from samples import make_sample

ops = torch.ops.custom_bn


def state_of(s):
    return [t.clone() for t in (s.running_mean, s.running_var, s.num_batches_tracked)]


# A table, one case per entry: kept as laid out.
# fmt: off
CASES = {
    # name: (mutation of a valid sample, error type, words the message must contain)
    "1d-input": (lambda s: setattr(s, "input", torch.randn(5)), RuntimeError,
                 ["input", "at least 2 dimensions", "[5]"]),
    "integer-input": (lambda s: setattr(s, "input", torch.ones(4, 3, dtype=torch.long)),
                      NotImplementedError, ["input", "float32", "Long"]),
    "weight-size": (lambda s: setattr(s, "weight", torch.ones(4)), RuntimeError,
                    ["weight", "3 elements", "[4]"]),
    "bias-size": (lambda s: setattr(s, "bias", torch.ones(2)), RuntimeError,
                  ["bias", "3 elements", "[2]"]),
    "running-mean-size": (lambda s: setattr(s, "running_mean", torch.zeros(5)), RuntimeError,
                          ["running_mean", "3 elements", "[5]"]),
    "running-var-size": (lambda s: setattr(s, "running_var", torch.ones(1)), RuntimeError,
                         ["running_var", "3 elements", "[1]"]),
    "only-running-mean": (lambda s: setattr(s, "running_var", None), ValueError,
                          ["running_mean", "running_var", "both"]),
    "weight-dtype": (lambda s: setattr(s, "weight", torch.ones(3, dtype=torch.float64)),
                     RuntimeError, ["weight", "Float", "Double"]),
    "mixed-param-dtypes": (lambda s: (setattr(s, "input", s.input.bfloat16()),
                                      setattr(s, "weight", s.weight.bfloat16())),
                           RuntimeError, ["BFloat16", "Float"]),
    "weight-on-meta": (lambda s: setattr(s, "weight", torch.ones(3, device="meta")),
                       RuntimeError, ["weight", "device", "meta"]),
    "one-value-per-channel": (lambda s: setattr(s, "input", torch.randn(1, 3)), ValueError,
                              ["Expected more than 1 value per channel when training", "[1, 3]"]),
    "eval-without-stats": (lambda s: (setattr(s, "training", False),
                                      setattr(s, "running_mean", None),
                                      setattr(s, "running_var", None)),
                           RuntimeError, ["running_mean must be defined in evaluation mode"]),
    "momentum-none-without-counter": (lambda s: (setattr(s, "momentum", None),
                                                 setattr(s, "num_batches_tracked", None)),
                                      RuntimeError, ["momentum=None", "num_batches_tracked"]),
    "counter-dtype": (lambda s: setattr(s, "num_batches_tracked", torch.tensor(0.0)),
                      RuntimeError, ["num_batches_tracked", "int64", "Float"]),
}
# fmt: on


@pytest.mark.parametrize("name", CASES)
def test_bad_call_raises_and_mutates_nothing(name):
    mutate, error, words = CASES[name]
    s = make_sample((4, 3, 5))
    mutate(s)
    before = [
        t.clone() if t is not None else None
        for t in (s.running_mean, s.running_var, s.num_batches_tracked)
    ]
    for op in ("batch_norm", "batch_norm_forward"):
        args = s.args() if op == "batch_norm" else s.forward_args()
        with pytest.raises(error) as info:
            getattr(ops, op)(*args)
        for word in words:
            assert word in str(info.value), f"{word!r} not in {info.value}"
        for old, new in zip(
            before, (s.running_mean, s.running_var, s.num_batches_tracked), strict=False
        ):
            if old is not None:
                assert torch.equal(old, new)


def test_backward_checks_grad_output_shape():
    s = make_sample((4, 3, 5))
    _, mean, invstd = ops.batch_norm_forward(s.input, None, None, None, None, None, True, 0.1, 1e-5)
    s.weight = s.running_mean = s.running_var = None
    mask = [True, True, True]
    with pytest.raises(RuntimeError, match="grad_output.*shape"):
        ops.batch_norm_backward(*s.backward_args(torch.randn(4, 3, 6), mean, invstd, mask))
    with pytest.raises(RuntimeError, match="save_mean.*3 elements"):
        ops.batch_norm_backward(*s.backward_args(torch.randn(4, 3, 5), mean[:2], invstd, mask))


def test_gather_checks_shapes_and_mutates_nothing():
    rm, rv, nbt = torch.zeros(3), torch.ones(3), torch.tensor(0)
    with pytest.raises(RuntimeError, match="counts with 2 elements"):
        ops.batch_norm_gather_stats_with_counts(
            torch.zeros(2, 3), torch.ones(2, 3), torch.ones(3), rm, rv, nbt, 0.1, 1e-5
        )
    with pytest.raises(RuntimeError, match="m2 of the shape of mean"):
        ops.batch_norm_gather_stats_with_counts(
            torch.zeros(2, 3), torch.ones(2, 4), torch.ones(2), rm, rv, nbt, 0.1, 1e-5
        )
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3)) and nbt.item() == 0


def test_no_strange_input_crashes():
    """Odd shapes, strides and dtypes either work or raise; none may crash the process."""
    odd_inputs = [
        torch.randn(3, 0, 4),
        torch.randn(2, 3, 0),
        torch.randn(5, 1),
        torch.randn(2, 3).expand(4, 2, 3),
        torch.randn(1, 3, 1, 1).expand(4, 3, 2, 2),
        torch.randn(4, 3, 5).flip(2),
        torch.randn(4, 6, 5)[:, ::2].transpose(0, 2),
        torch.tensor([[1.0, float("nan")], [2.0, float("inf")]]),
        torch.randn(4, 3, dtype=torch.complex64),
        torch.ones(4, 3, dtype=torch.bool),
    ]
    for x in odd_inputs:
        c = x.shape[1] if x.dim() > 1 else 1
        for training in (True, False):
            try:
                ops.batch_norm(x, None, None, torch.zeros(c), torch.ones(c), training, 0.1, 1e-5)
            except (RuntimeError, ValueError):
                pass


# Each case as torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias,
# training) takes it; ours must raise the same exception type.
X = torch.randn(4, 3, 5)
TYPE_CASES = {
    "1-D input": (torch.randn(5), torch.zeros(5), torch.ones(5), None, None, True),
    "integer input": (
        torch.ones(4, 3, dtype=torch.long),
        torch.zeros(3),
        torch.ones(3),
        None,
        None,
        True,
    ),
    "weight size": (X, torch.zeros(3), torch.ones(3), torch.ones(4), None, True),
    "bias size": (X, torch.zeros(3), torch.ones(3), None, torch.ones(2), True),
    "running_mean size": (X, torch.zeros(5), torch.ones(3), None, None, True),
    "only running_mean": (X, torch.zeros(3), None, None, None, True),
    "weight dtype": (
        X,
        torch.zeros(3),
        torch.ones(3),
        torch.ones(3, dtype=torch.float64),
        None,
        True,
    ),
    "one value per channel": (torch.randn(1, 3), None, None, None, None, True),
    "eval without stats": (X, None, None, None, None, False),
    "weight on another device": (
        X,
        torch.zeros(3),
        torch.ones(3),
        torch.ones(3, device="meta"),
        None,
        True,
    ),
}


@pytest.mark.parametrize("name", TYPE_CASES)
def test_error_types_match_torch(name):
    x, rm, rv, w, b, training = TYPE_CASES[name]
    try:
        torch.nn.functional.batch_norm(x, rm, rv, w, b, training)
    except Exception as error:  # noqa: BLE001  (any type: it is what we compare)
        theirs = pytest.ExceptionInfo.from_exc_info((type(error), error, error.__traceback__))
    else:
        pytest.skip(f"torch {torch.__version__} accepts this call (later versions reject it)")
    with pytest.raises(Exception) as ours:
        ops.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5)
    # What catches torch's error catches ours (torch 2.11 raises NotImplementedError for a
    # non-floating input, torch 2.6 its base class RuntimeError).
    assert isinstance(ours.value, type(theirs.value)), f"{ours.value!r} vs torch's {theirs.value!r}"


@pytest.mark.parametrize(
    "module, shape",
    [("BatchNorm1d", (4, 3, 2)), ("BatchNorm2d", (4, 3, 2, 2)), ("BatchNorm3d", (4, 3, 2, 2, 2))],
)
def test_module_errors_match_torch(module, shape):
    import custom_bn

    wrong_dims = torch.randn(4)
    wrong_channels = torch.randn(shape)  # 3 channels into a module for 4
    for bad in (wrong_dims, wrong_channels):
        ours_module, torch_module = getattr(custom_bn, module)(4), getattr(torch.nn, module)(4)
        before = {k: v.clone() for k, v in ours_module.state_dict().items()}
        with pytest.raises(Exception) as theirs:
            torch_module(bad)
        with pytest.raises(Exception) as ours:
            ours_module(bad)
        assert isinstance(ours.value, type(theirs.value)), f"{ours.value!r} vs {theirs.value!r}"
        for key, value in ours_module.state_dict().items():
            assert torch.equal(value, before[key]), f"{key} changed by a failed call"
