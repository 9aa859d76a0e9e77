"""custom_bn.batch_norm against torch.batch_norm and its autograd, across the whole matrix."""

import pytest
import torch
from samples import SHAPES, all_samples, assert_matches_torch, make_sample, reference_batch_norm

ops = torch.ops.custom_bn


@pytest.mark.parametrize("kwargs", [k for _, k in all_samples()], ids=[n for n, _ in all_samples()])
def test_parity_with_torch(kwargs):
    assert_matches_torch(make_sample(**kwargs))


@pytest.mark.parametrize("dim", [2, 3, 4, 5])
def test_several_steps_track_running_stats(dim):
    """Running stats and momentum=None averages over consecutive calls, like torch's module."""
    sample = make_sample(SHAPES[dim], momentum=None)
    sample.num_batches_tracked.zero_()
    ours, ref = sample.clone(), sample.clone()
    for _ in range(4):
        x = torch.randn_like(sample.input) * 3 + 1
        ours.input, ref.input = x, x.clone()
        torch.testing.assert_close(ops.batch_norm(*ours.args()), reference_batch_norm(ref))
    torch.testing.assert_close(ours.running_mean, ref.running_mean)
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.item() == 4


def test_six_dims_work_like_torch():
    assert_matches_torch(make_sample((2, 3, 2, 3, 2, 3)))


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    sample = make_sample((0, 4, 5, 5), training=training)
    rm, rv = sample.running_mean.clone(), sample.running_var.clone()
    nbt = sample.num_batches_tracked.item()
    x = sample.input.requires_grad_()
    w, b = sample.weight.requires_grad_(), sample.bias.requires_grad_()
    out = ops.batch_norm(*sample.args())
    assert out.shape == x.shape
    torch.testing.assert_close(sample.running_mean, rm, rtol=0, atol=0)
    torch.testing.assert_close(sample.running_var, rv, rtol=0, atol=0)
    assert sample.num_batches_tracked.item() == nbt + (1 if training else 0)
    out.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))
    assert x.grad.shape == x.shape


def test_views_as_running_stats_are_written_through():
    stats = torch.stack([torch.zeros(6), torch.ones(6)], dim=1)  # columns: strided views
    ref_mean, ref_var = torch.zeros(6), torch.ones(6)
    x = torch.randn(8, 6, 3)
    out = ops.batch_norm(x, None, None, stats[:, 0], stats[:, 1], True, 0.3, 1e-5)
    expected = torch.batch_norm(x, None, None, ref_mean, ref_var, True, 0.3, 1e-5, False)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(stats[:, 0], ref_mean)
    torch.testing.assert_close(stats[:, 1], ref_var)


def test_variance_of_large_offset_channel_is_accurate():
    """Two-pass statistics: 3 million float32 values with mean 1000 keep their variance."""
    x = torch.randn(1, 1, 3_000_000) * 0.5 + 1000.0
    _, mean, invstd = ops.batch_norm_forward(x, None, None, None, None, None, True, 0.1, 0.0)
    var = x.double().var(unbiased=False)
    assert abs(float(1.0 / invstd.double() ** 2) / float(var) - 1.0) < 1e-4
    assert abs(float(mean) - float(x.double().mean())) < 1e-4


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_results_do_not_depend_on_thread_count(layout):
    sample = make_sample((16, 8, 20, 20), layout=layout)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, threads, 3):
            torch.set_num_threads(n)
            s = sample.clone(requires_grad=True)
            out = ops.batch_norm(*s.args())
            out.backward(torch.ones_like(out) * torch.arange(out.numel()).reshape(out.shape) % 7)
            results.append((out, s.running_mean, s.running_var, s.input.grad, s.weight.grad))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=False):
            assert torch.equal(a, b)


def test_eval_does_not_touch_running_stats_or_counter():
    sample = make_sample((4, 3, 5), training=False)
    before = [
        t.clone() for t in (sample.running_mean, sample.running_var, sample.num_batches_tracked)
    ]
    ops.batch_norm(*sample.args())
    for a, b in zip(
        before, (sample.running_mean, sample.running_var, sample.num_batches_tracked), strict=False
    ):
        assert torch.equal(a, b)


def test_version_counters_of_written_stats_are_bumped():
    sample = make_sample((4, 3, 5))
    versions = [
        t._version for t in (sample.running_mean, sample.running_var, sample.num_batches_tracked)
    ]
    ops.batch_norm(*sample.args())
    after = [
        t._version for t in (sample.running_mean, sample.running_var, sample.num_batches_tracked)
    ]
    assert all(b > a for a, b in zip(versions, after, strict=False))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_and_gradgradcheck(training, affine, layout):
    sample = make_sample(
        (3, 2, 3, 2), dtype_name="float64", layout=layout, training=training, affine=affine
    )
    x = sample.input.requires_grad_()
    params = [p.requires_grad_() for p in (sample.weight, sample.bias) if p is not None]

    def fn(x, *params):
        w, b = params if params else (None, None)
        # Fresh running stats each call: gradcheck calls fn many times.
        rm, rv = sample.running_mean.clone(), sample.running_var.clone()
        return ops.batch_norm(x, w, b, rm, rv, training, 0.1, sample.eps)

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert torch.autograd.gradgradcheck(fn, (x, *params))
