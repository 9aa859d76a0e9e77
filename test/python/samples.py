"""Sample inputs for batch norm and the torch reference they are checked against."""

import dataclasses
import itertools
from collections.abc import Iterator

import torch

DTYPES = {
    # name: (input dtype, parameter dtype)
    "float32": (torch.float32, torch.float32),
    "float64": (torch.float64, torch.float64),
    "bfloat16": (torch.bfloat16, torch.bfloat16),
    "float16": (torch.float16, torch.float16),
    "bfloat16+float32": (torch.bfloat16, torch.float32),
    "float16+float32": (torch.float16, torch.float32),
}

# (rtol, atol) per input dtype: reduced precision differs from torch by an ulp of the output.
TOLERANCES = {
    torch.float64: (1e-9, 1e-9),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 3e-2),
}

SHAPES = {2: (12, 5), 3: (4, 6, 7), 4: (3, 5, 6, 7), 5: (2, 3, 4, 5, 3)}
LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed")

# The fused op's piecewise-linear activations as (min_val, max_val, negative_slope): ReLU,
# ReLU6, hardtanh, LeakyReLU, identity.
PIECEWISE_LINEAR = {
    "relu": (0.0, None, 0.0),
    "relu6": (0.0, 6.0, 0.0),
    "hardtanh": (-1.0, 1.0, 0.0),
    "leaky_relu": (0.0, None, 0.1),
    "identity": (0.0, None, 1.0),
}


def tolerance(dtype: torch.dtype) -> dict:
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


def make_input(shape, dtype, layout, device="cpu") -> torch.Tensor:
    """A random tensor of `shape` with the memory layout `layout`."""
    if layout == "contiguous":
        return torch.randn(shape, device=device).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return torch.randn(shape, device=device).to(dtype).to(memory_format=fmt)
    if layout == "sliced":  # every other element along N and the last dim: not dense
        big = list(shape)
        big[0] *= 2
        big[-1] *= 2
        return torch.randn(big, device=device).to(dtype)[::2, ..., ::2]
    if layout == "transposed":  # last two dims swapped in memory
        swapped = list(shape)
        swapped[-1], swapped[-2] = swapped[-2], swapped[-1]
        return torch.randn(swapped, device=device).to(dtype).transpose(-1, -2)
    raise ValueError(layout)


def layouts_for(dim: int):
    return [layout for layout in LAYOUTS if layout != "channels_last" or dim in (4, 5)]


@dataclasses.dataclass
class Sample:
    input: torch.Tensor
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    running_mean: torch.Tensor | None
    running_var: torch.Tensor | None
    training: bool
    momentum: float | None
    eps: float
    num_batches_tracked: torch.Tensor | None

    def clone(self, requires_grad=False) -> "Sample":
        def copy(t, grad=False):
            if t is None:
                return None
            c = t.detach().clone()
            return c.requires_grad_(grad)

        return Sample(
            copy(self.input, requires_grad),
            copy(self.weight, requires_grad),
            copy(self.bias, requires_grad),
            copy(self.running_mean),
            copy(self.running_var),
            self.training,
            self.momentum,
            self.eps,
            copy(self.num_batches_tracked),
        )

    def forward_args(self):
        """The arguments of batch_norm_forward."""
        return (self.input, self.weight, self.bias, self.running_mean, self.running_var,
                self.num_batches_tracked, self.training, self.momentum, self.eps)  # fmt: skip

    def relu_forward_args(self, residual):
        """The arguments of batch_norm_relu_forward."""
        return (*self.forward_args()[:6], residual, self.training, self.momentum, self.eps)

    def backward_args(self, grad, save_mean, save_invstd, mask, output=None):
        """The arguments of batch_norm_backward, or with the forward's output given, of
        batch_norm_relu_backward."""
        inputs = (grad, self.input) if output is None else (grad, output, self.input)
        return (*inputs, self.weight, self.running_mean, self.running_var, save_mean,
                save_invstd, self.training, self.eps, mask)  # fmt: skip

    def args(self):
        return (
            self.input,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            self.training,
            self.momentum,
            self.eps,
            self.num_batches_tracked,
        )

    def __repr__(self):
        return (
            f"Sample(shape={tuple(self.input.shape)}, stride={self.input.stride()}, "
            f"dtype={self.input.dtype}, "
            f"weight={None if self.weight is None else self.weight.dtype}, "
            f"stats={self.running_mean is not None}, training={self.training}, "
            f"momentum={self.momentum})"
        )


def make_sample(
    shape,
    dtype_name="float32",
    layout="contiguous",
    training=True,
    affine=True,
    running_stats=True,
    momentum=0.1,
    eps=1e-5,
    device="cpu",
) -> Sample:
    input_dtype, param_dtype = DTYPES[dtype_name]
    channels = shape[1]
    x = make_input(shape, input_dtype, layout, device)
    # Shift and scale channels apart so that statistics matter.
    x.mul_(2.0).add_(0.5)
    weight = bias = running_mean = running_var = nbt = None
    if affine:
        weight = torch.rand(channels, device=device).add_(0.5).to(param_dtype)
        bias = torch.randn(channels, device=device).to(param_dtype)
    if running_stats:
        running_mean = torch.randn(channels, device=device).to(param_dtype)
        running_var = torch.rand(channels, device=device).add_(0.5).to(param_dtype)
        nbt = torch.tensor(int(torch.randint(0, 5, ())), device=device)
    return Sample(x, weight, bias, running_mean, running_var, training, momentum, eps, nbt)


def all_samples(device="cpu", dims=(2, 3, 4, 5), dtype_names=tuple(DTYPES)) -> Iterator[tuple]:
    """The parity matrix: dims x layouts x dtypes x modes. Yields (id, kwargs for make_sample)."""
    for dim in dims:
        for layout, dtype_name in itertools.product(layouts_for(dim), dtype_names):
            for training, affine, running_stats, momentum in itertools.product(
                (True, False), (True, False), (True, False), (0.1, None)
            ):
                if not training and not running_stats:
                    continue  # an error, tested on its own
                if momentum is None and not (training and running_stats):
                    continue  # momentum only matters when running stats are updated
                kwargs = dict(shape=SHAPES[dim], dtype_name=dtype_name, layout=layout,
                              training=training, affine=affine, running_stats=running_stats,
                              momentum=momentum, device=device)  # fmt: skip
                name = (
                    f"{dim}d-{layout}-{dtype_name}-{'train' if training else 'eval'}"
                    f"-{'affine' if affine else 'noaffine'}"
                    f"-{'stats' if running_stats else 'nostats'}"
                    f"-m{momentum}"
                )
                yield name, kwargs


def reference_batch_norm(s: Sample) -> torch.Tensor:
    """torch.batch_norm with torch.nn.BatchNorm's bookkeeping of num_batches_tracked."""
    momentum = s.momentum
    if s.training and s.running_mean is not None and s.num_batches_tracked is not None:
        s.num_batches_tracked.add_(1)
        if momentum is None:
            momentum = 1.0 / float(s.num_batches_tracked)
    return torch.batch_norm(
        s.input,
        s.weight,
        s.bias,
        s.running_mean,
        s.running_var,
        s.training,
        momentum if momentum is not None else 0.0,
        s.eps,
        False,
    )


def assert_matches_torch(sample: Sample):
    ours, ref = sample.clone(requires_grad=True), sample.clone(requires_grad=True)
    out = torch.ops.custom_bn.batch_norm(*ours.args())
    expected = reference_batch_norm(ref)
    tol = tolerance(sample.input.dtype)

    torch.testing.assert_close(out, expected, **tol)
    assert out.dtype == expected.dtype
    assert out.stride() == expected.stride(), "the output keeps the input's memory format"
    for name in ("running_mean", "running_var"):
        if getattr(ours, name) is not None:
            torch.testing.assert_close(getattr(ours, name), getattr(ref, name), **tol)
    if ours.num_batches_tracked is not None:
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()

    grad = torch.randn_like(expected)
    out.backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(ours.input.grad, ref.input.grad, **tol)
    reduced = sample.input.dtype in (torch.bfloat16, torch.float16)
    if reduced and ours.weight is not None:
        # Per-channel sums of many products: in bfloat16/float16 torch's own sums are off by
        # more than an ulp when the terms cancel, so those compare with float64 torch.
        wide = Sample(
            *(
                t.detach().double().requires_grad_(i < 3) if t is not None else None
                for i, t in enumerate(
                    (
                        sample.input,
                        sample.weight,
                        sample.bias,
                        sample.running_mean,
                        sample.running_var,
                    )
                )
            ),
            sample.training,
            sample.momentum,
            sample.eps,
            None if sample.num_batches_tracked is None else sample.num_batches_tracked.clone(),
        )
        reference_batch_norm(wide).backward(grad.double())
        ref = wide
    for name in ("weight", "bias"):
        if getattr(ours, name) is not None:
            expected_grad = getattr(ref, name).grad.to(getattr(ours, name).dtype)
            torch.testing.assert_close(
                getattr(ours, name).grad, expected_grad, rtol=tol["rtol"] * 4, atol=tol["atol"] * 4
            )
