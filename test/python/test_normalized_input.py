"""torch.ops.custom_bn.batch_norm_relu_normalized_input: the normalized input that in-place
activated batch norm overwrote, recovered from its output and kept values (the backward of
SyncBatchNormReLU2d(inplace=True) reduces it over the ranks), against float64."""

import itertools

import custom_bn  # noqa: F401  (the fake kernel of batch_norm_relu_forward_)
import pytest
import torch
from samples import PIECEWISE_LINEAR as ACTIVATIONS
from samples import all_samples, make_sample

ops = torch.ops.custom_bn

# Recovery carries the output's rounding times (|x_hat| + (|bias| + |residual|) / |weight|), at
# most a few units of x_hat's; kept values are exact. Low precision keeps every value.
TOLERANCE = {
    torch.float32: {"rtol": 1e-5, "atol": 2e-5},
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.bfloat16: {"rtol": 1e-6, "atol": 1e-6},
    torch.float16: {"rtol": 1e-6, "atol": 1e-6},
}
SAMPLES = [
    (name, kwargs, activation, residual)
    for (index, (name, kwargs)), residual in itertools.product(
        enumerate(all_samples(dtype_names=("float32", "float64", "bfloat16+float32"))),
        (False, True),
    )
    for activation in [list(ACTIVATIONS)[index % len(ACTIVATIONS)]]
]


def _statistics(sample):
    """The mean and invstd a forward of `sample` normalizes with, in the statistics dtype."""
    x = sample.input.double()
    if sample.training:
        dims = [d for d in range(x.dim()) if d != 1]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
    else:
        mean, var = sample.running_mean.double(), sample.running_var.double()
    dtype = torch.float64 if sample.input.dtype == torch.float64 else torch.float32
    return mean.to(dtype), (var + sample.eps).rsqrt().to(dtype)


def _forward(sample, residual, activation):
    """(output, kept_input, mean, invstd) of batch_norm_relu_forward_ on a copy of `sample`."""
    s = sample.clone()
    save_mean, save_invstd, kept = ops.batch_norm_relu_forward_(
        *s.relu_forward_args(residual), *ACTIVATIONS[activation]
    )
    if s.training:
        return s.input, kept, save_mean, save_invstd
    mean, invstd = _statistics(sample)
    return s.input, kept, mean, invstd


@pytest.mark.parametrize(
    "kwargs, activation, with_residual",
    [p[1:] for p in SAMPLES],
    ids=[f"{p[0]}-{p[2]}{'-residual' if p[3] else ''}" for p in SAMPLES],
)
def test_recovers_the_normalized_input(kwargs, activation, with_residual):
    torch.manual_seed(len(kwargs["shape"]))
    sample = make_sample(**kwargs)
    if sample.weight is not None:
        sample.weight[0] = 0.0  # torchvision's zero_init_residual: every value kept
    residual = torch.randn_like(sample.input) if with_residual else None
    output, kept, mean, invstd = _forward(sample, residual, activation)
    args = (sample.weight, sample.bias, residual, mean, invstd, *ACTIVATIONS[activation])
    x_hat = ops.batch_norm_relu_normalized_input(output, kept, *args)
    shape = [1, -1] + [1] * (output.dim() - 2)
    expected = (sample.input.double() - mean.double().view(shape)) * invstd.double().view(shape)
    assert x_hat.dtype == mean.dtype and x_hat.shape == output.shape
    torch.testing.assert_close(x_hat.double(), expected, **TOLERANCE[sample.input.dtype])
    if output.is_contiguous() or output.is_contiguous(memory_format=torch.channels_last):
        assert x_hat.stride() == output.stride()


def _recovery_case():
    sample = make_sample((4, 3, 5, 6))
    residual = torch.randn_like(sample.input)
    output, kept, mean, invstd = _forward(sample, residual, "relu")
    return output, kept, sample.weight, sample.bias, residual, mean, invstd


OPCHECK_CASES = {
    "residual-relu": (dict(shape=(4, 3, 5, 6)), True, "relu"),
    "no-affine-relu6": (dict(shape=(4, 3, 5), affine=False), False, "relu6"),
    "channels-last-identity": (dict(shape=(2, 3, 4, 4), layout="channels_last"), False, "identity"),
    "bf16-every-value": (dict(shape=(3, 4, 6), dtype_name="bfloat16+float32"), True, "leaky_relu"),
    "eval-sliced": (dict(shape=(3, 5, 6, 7), layout="sliced", training=False), True, "hardtanh"),
}


@pytest.mark.parametrize("case", OPCHECK_CASES.values(), ids=OPCHECK_CASES.keys())
def test_opcheck(case):
    kwargs, with_residual, activation = case
    sample = make_sample(**kwargs)
    residual = torch.randn_like(sample.input) if with_residual else None
    output, kept, mean, invstd = _forward(sample, residual, activation)
    args = (sample.weight, sample.bias, residual, mean, invstd, *ACTIVATIONS[activation])
    torch.library.opcheck(ops.batch_norm_relu_normalized_input, (output, kept, *args))


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda a: {1: a[1][:-1]},
            RuntimeError,
            r"kept_input with the \d+ values the forward kept",
        ),
        (lambda a: {1: a[1].view(1, -1)}, RuntimeError, "expected kept_input to be 1-D"),
        (lambda a: {1: a[1].double()}, RuntimeError, "expected kept_input of the output's dtype"),
        (lambda a: {1: a[1].to("meta")}, RuntimeError, "expected kept_input on the input's device"),
        (lambda a: {5: a[5][:2]}, RuntimeError, "mean"),
        (lambda a: {6: a[6].double()}, RuntimeError, "invstd"),
        (lambda a: {4: a[4][:1]}, RuntimeError, "residual"),
        (
            lambda a: {0: a[0].long()},
            NotImplementedError,
            "expected output of dtype .* but got Long",
        ),
    ],
    ids=["count", "dims", "dtype", "device", "mean", "invstd", "residual", "output"],
)
def test_bad_arguments_are_named(change, error, message):
    args = list(_recovery_case())
    for index, value in change(args).items():
        args[index] = value
    with pytest.raises(error, match=message):
        ops.batch_norm_relu_normalized_input(*args)


def test_a_strided_kept_input_is_read_by_its_strides():
    output, kept, *rest = _recovery_case()
    strided = torch.empty(2 * kept.numel())[::2]
    strided.copy_(kept)
    torch.testing.assert_close(
        ops.batch_norm_relu_normalized_input(output, strided, *rest),
        ops.batch_norm_relu_normalized_input(output, kept, *rest),
        rtol=0,
        atol=0,
    )


def test_activation_arguments_are_checked():
    args = _recovery_case()
    with pytest.raises(ValueError, match="negative_slope"):
        ops.batch_norm_relu_normalized_input(*args, 0.0, None, -1.0)
