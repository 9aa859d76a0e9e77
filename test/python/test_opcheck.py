"""torch.library.opcheck on every op: schema and aliasing, autograd registration, fake
(Meta) kernels, and AOT dispatch with dynamic shapes."""

import pytest
import torch
from samples import make_sample

ops = torch.ops.custom_bn


def batch_norm_samples():
    yield "train", make_sample((4, 3, 5, 5))
    yield "eval", make_sample((4, 3, 5, 5), training=False)
    yield "no-stats", make_sample((6, 4), running_stats=False)
    yield "channels-last", make_sample((2, 3, 4, 4), layout="channels_last")
    yield "mixed-bf16", make_sample((3, 4, 6), dtype_name="bfloat16+float32")
    yield "momentum-none", make_sample((4, 3, 5), momentum=None)
    yield "no-affine-5d", make_sample((2, 3, 2, 3, 2), affine=False)
    s = make_sample((4, 3, 5))
    stats = torch.stack([torch.zeros(3), torch.ones(3)], dim=1)
    s.running_mean, s.running_var = stats[:, 0], stats[:, 1]  # views
    yield "stats-are-views", s


SAMPLES = list(batch_norm_samples())


@pytest.mark.parametrize("sample", [s for _, s in SAMPLES], ids=[n for n, _ in SAMPLES])
def test_batch_norm(sample):
    s = sample.clone(requires_grad=True)
    torch.library.opcheck(ops.batch_norm, s.args())


@pytest.mark.parametrize("sample", [s for _, s in SAMPLES], ids=[n for n, _ in SAMPLES])
def test_forward_and_backward(sample):
    s = sample.clone()
    torch.library.opcheck(ops.batch_norm_forward, s.forward_args())
    _, save_mean, save_invstd = ops.batch_norm_forward(*s.forward_args())
    grad = torch.randn_like(s.input)
    for mask in ([True, True, True], [True, False, False], [False, True, True]):
        torch.library.opcheck(
            ops.batch_norm_backward, s.backward_args(grad, save_mean, save_invstd, mask)
        )


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16+float32"])
def test_stage_ops(layout, dtype_name):
    s = make_sample((4, 3, 5, 5), layout=layout, dtype_name=dtype_name)
    x = s.input
    torch.library.opcheck(ops.batch_norm_stats, (x,))
    count, mean, m2 = ops.batch_norm_stats(x)
    ranks_mean = torch.stack([mean, mean + 1])
    ranks_m2 = torch.stack([m2, m2 * 2])
    counts = torch.cat([count, count + 3])
    torch.library.opcheck(
        ops.batch_norm_gather_stats_with_counts,
        (
            ranks_mean,
            ranks_m2,
            counts,
            s.running_mean,
            s.running_var,
            s.num_batches_tracked,
            0.1,
            1e-5,
        ),
    )
    torch.library.opcheck(
        ops.batch_norm_gather_stats_with_counts,
        (ranks_mean, ranks_m2, counts, None, None, None, None, 1e-5),
    )
    mean, invstd = ops.batch_norm_gather_stats_with_counts(
        ranks_mean, ranks_m2, counts, None, None, None, 0.1, 1e-5
    )
    torch.library.opcheck(ops.batch_norm_elemt, (x, s.weight, s.bias, mean, invstd))
    grad = torch.randn_like(x)
    torch.library.opcheck(
        ops.batch_norm_backward_reduce, (grad, x, mean, invstd, s.weight, True, True, True)
    )
    torch.library.opcheck(
        ops.batch_norm_backward_reduce, (grad, x, mean, invstd, s.weight, False, True, False)
    )
    sum_dy, sum_dy_xmu, _, _ = ops.batch_norm_backward_reduce(
        grad, x, mean, invstd, s.weight, True, False, False
    )
    torch.library.opcheck(
        ops.batch_norm_backward_elemt,
        (
            grad,
            x,
            mean,
            invstd,
            s.weight,
            sum_dy,
            sum_dy_xmu,
            torch.tensor([50, 25], dtype=torch.int32),
        ),
    )
