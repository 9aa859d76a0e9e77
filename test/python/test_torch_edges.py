"""Torch's behaviour at the edges, compared with torch in the same process: the eps check,
forward-mode tangents of the running stats, output and gradient layouts of dense inputs with
size-1 dimensions and of empty batches, and the lazy modules."""

import custom_bn
import pytest
import torch
import torch.nn.functional as F
from torch import nn

ops = torch.ops.custom_bn


def _raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001
        return type(error), str(error)
    return None


@pytest.mark.parametrize("eps", [0.0, -1.0])
@pytest.mark.parametrize("training", [True, False])
def test_eps_error_is_torchs(eps, training):
    x = torch.randn(4, 3, 5, 5)
    for theirs, ours in (
        (nn.BatchNorm2d(3, eps=eps), custom_bn.BatchNorm2d(3, eps=eps)),
        (nn.BatchNorm1d(3, eps=eps), custom_bn.BatchNorm1d(3, eps=eps)),
    ):
        theirs.train(training), ours.train(training)
        sample = x if isinstance(theirs, nn.BatchNorm2d) else x[:, :, 0, 0]
        before = ours.state_dict()
        expected = _raised(lambda m=theirs, s=sample: m(s))
        assert expected is not None and expected[0] is ValueError
        assert _raised(lambda m=ours, s=sample: m(s)) == expected
        for key, value in ours.state_dict().items():
            assert torch.equal(value, before[key]), key
    stats = torch.zeros(3), torch.ones(3)
    expected = _raised(lambda: F.batch_norm(x, *stats, training=training, eps=eps))
    assert _raised(lambda: custom_bn.functional.batch_norm(x, *stats, training=training, eps=eps)) \
        == expected  # fmt: skip


def test_fused_module_checks_eps_too():
    with pytest.raises(ValueError, match="eps must be positive, but got 0.0"):
        custom_bn.BatchNormReLU2d(3, eps=0.0)(torch.randn(2, 3, 2, 2))


def test_forward_mode_tangent_of_running_stats_in_eval_is_refused_as_torch_does():
    import torch.autograd.forward_ad as fwAD

    x, tangent = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    messages = []
    for module in (nn.BatchNorm1d(3).double().eval(), custom_bn.BatchNorm1d(3).double().eval()):
        with fwAD.dual_level():
            module.running_mean = fwAD.make_dual(torch.zeros(3, dtype=torch.float64),
                                                 torch.ones(3, dtype=torch.float64))  # fmt: skip
            with pytest.raises(RuntimeError) as raised:
                module(fwAD.make_dual(x, tangent))
            messages.append(str(raised.value))
    assert "not differentiable wrt running_mean and running_var" in messages[1]
    assert messages[0].split("\n")[0] == messages[1].split("\n")[0]


def test_jvp_over_buffers_in_eval_is_refused_not_dropped():
    from torch.func import functional_call, jvp

    bn = custom_bn.BatchNorm1d(3).double().eval()
    x = torch.randn(6, 3, dtype=torch.float64)
    buffers = {k: v for k, v in bn.named_buffers() if v.is_floating_point()}
    tangents = {k: torch.randn_like(v) for k, v in buffers.items()}
    with pytest.raises(RuntimeError, match="not differentiable wrt running_mean"):
        jvp(lambda b: functional_call(bn, b, (x,)), (buffers,), (tangents,))


def _layout_inputs():
    yield "empty channels_last", torch.empty(0, 5, 2, 2).to(memory_format=torch.channels_last)
    yield (
        "empty channels_last_3d",
        torch.empty(0, 3, 2, 2, 2).to(memory_format=torch.channels_last_3d),
    )
    yield "size-1 permuted", torch.arange(6.0).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    yield "1x1 channels_last", torch.randn(2, 3, 1, 1).to(memory_format=torch.channels_last)
    yield "one channel channels_last", torch.randn(2, 1, 3, 3).to(memory_format=torch.channels_last)
    yield (
        "batch of one channels_last",
        torch.randn(1, 3, 2, 2).to(memory_format=torch.channels_last),
    )
    yield "sliced", torch.randn(4, 6, 5, 5)[:, ::2]
    yield "transposed", torch.randn(2, 4, 3).transpose(1, 2)


LAYOUT_INPUTS = list(_layout_inputs())


def _exact_copy(x):
    return torch.empty_strided(x.size(), x.stride()).copy_(x).requires_grad_()


@pytest.mark.parametrize("name, x", LAYOUT_INPUTS, ids=[n for n, _ in LAYOUT_INPUTS])
@pytest.mark.parametrize("training", [True, False])
def test_output_and_gradient_strides_are_torchs(name, x, training):
    channels = x.size(1)
    results = []
    for batch_norm in (torch.batch_norm, ops.batch_norm):
        inp = _exact_copy(x)
        stats = torch.zeros(channels), torch.ones(channels)
        affine = torch.ones(channels), torch.zeros(channels)
        extra = (False,) if batch_norm is torch.batch_norm else ()
        out = batch_norm(inp, *affine, *stats, training, 0.1, 1e-5, *extra)
        grad = torch.ones_like(out)
        (grad_input,) = torch.autograd.grad(out, inp, grad, allow_unused=True)
        results.append((out, grad_input))
    (theirs, their_grad), (ours, our_grad) = results
    assert ours.stride() == theirs.stride()
    torch.testing.assert_close(ours, theirs)
    if their_grad is not None and x.numel() > 0:
        assert our_grad.stride() == their_grad.stride()
        # With two values per channel (the 1x1 input) training's input gradient is zero but for
        # rounding: both sides are float32 rounding of terms of size 1 (seen: 2e-5 apart).
        torch.testing.assert_close(our_grad, their_grad, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("name, x", LAYOUT_INPUTS, ids=[n for n, _ in LAYOUT_INPUTS])
def test_meta_kernel_predicts_the_output_strides(name, x):
    channels = x.size(1)
    meta = torch.empty_strided(x.size(), x.stride(), device="meta")
    stats = torch.zeros(channels, device="meta"), torch.ones(channels, device="meta")
    out = ops.batch_norm(meta, None, None, *stats, False, 0.1, 1e-5)
    real = ops.batch_norm(
        x, None, None, torch.zeros(channels), torch.ones(channels), False, 0.1, 1e-5
    )
    assert out.stride() == real.stride()


LAZY = [
    (nn.LazyBatchNorm1d, custom_bn.LazyBatchNorm1d, custom_bn.BatchNorm1d, (4, 3)),
    (nn.LazyBatchNorm2d, custom_bn.LazyBatchNorm2d, custom_bn.BatchNorm2d, (4, 3, 5, 5)),
    (nn.LazyBatchNorm3d, custom_bn.LazyBatchNorm3d, custom_bn.BatchNorm3d, (4, 3, 2, 3, 3)),
]


@pytest.mark.parametrize("theirs, ours, becomes, shape", LAZY, ids=["1d", "2d", "3d"])
def test_lazy_modules_materialize_into_ours_as_torchs_do(theirs, ours, becomes, shape):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    t, o = theirs(momentum=None, dtype=torch.float64), ours(momentum=None, dtype=torch.float64)
    assert isinstance(o, theirs) and o.has_uninitialized_params()
    assert set(o.state_dict()) == set(t.state_dict())
    for _ in range(2):
        torch.testing.assert_close(o(x), t(x))
    assert type(o) is becomes and isinstance(o, type(t)) and o.num_features == 3
    for key, value in t.state_dict().items():
        torch.testing.assert_close(o.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("theirs, ours, becomes, shape", LAZY, ids=["1d", "2d", "3d"])
def test_lazy_module_loads_a_state_dict_before_materializing(theirs, ours, becomes, shape):
    source = becomes(3)
    source(torch.randn(shape))
    lazy = ours()
    lazy.load_state_dict(source.state_dict())
    assert not lazy.has_uninitialized_params()
    lazy.eval(), source.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(lazy(x), source(x))
    assert type(lazy) is becomes


def test_convert_batchnorm_converts_unmaterialized_lazy_modules():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d(momentum=0.3), nn.ReLU())

    model, twin = make(), make()
    converted = custom_bn.convert_batchnorm(model, strict=True)
    assert type(converted[1]) is custom_bn.LazyBatchNorm2d and converted[1].momentum == 0.3
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(converted(x), twin(x))
    assert type(converted[1]) is custom_bn.BatchNorm2d
    torch.testing.assert_close(converted[1].running_var, twin[1].running_var)


@pytest.mark.parametrize("module_dtype, input_dtype", [(torch.float32, torch.float64),
                                                       (torch.float64, torch.bfloat16),
                                                       (torch.float16, torch.float32)])  # fmt: skip
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_of_another_dtype_goes_through_as_in_torch(module_dtype, input_dtype, training):
    results = []
    for cls in (nn.BatchNorm2d, custom_bn.BatchNorm2d):
        bn = cls(3, dtype=module_dtype).train(training)
        x = torch.randn(0, 3, 4, 4, dtype=input_dtype, requires_grad=True)
        y = bn(x)
        y.sum().backward()
        results.append((y, x.grad, bn.weight.grad, bn.state_dict()))
    (y, grad, weight_grad, state), (ours, our_grad, our_weight_grad, our_state) = results
    assert (ours.dtype, ours.shape, ours.stride()) == (y.dtype, y.shape, y.stride())
    assert our_grad.shape == grad.shape
    torch.testing.assert_close(our_weight_grad, weight_grad)
    for key, value in state.items():
        assert torch.equal(our_state[key], value), key
    # A non-empty batch of that mix stays an error.
    with pytest.raises(RuntimeError, match="expected weight of dtype"):
        custom_bn.BatchNorm2d(3, dtype=module_dtype)(torch.randn(2, 3, 4, 4, dtype=input_dtype))


def test_empty_batch_of_another_dtype_through_the_fused_op():
    bn = custom_bn.BatchNormReLU2d(3)
    x = torch.randn(0, 3, 2, 2, dtype=torch.float64)
    out = bn(x, torch.randn(0, 3, 2, 2, dtype=torch.float64))
    assert out.dtype == torch.float64 and out.shape == x.shape
    assert bn.num_batches_tracked.item() == 1


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_running_stats_that_require_grad_are_refused_as_torch_does(training, name):
    messages = []
    for batch_norm in (F.batch_norm, custom_bn.functional.batch_norm):
        stats = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
        stats[name].requires_grad_()
        before = {key: value.detach().clone() for key, value in stats.items()}
        x = torch.randn(4, 3, requires_grad=True)
        with pytest.raises(RuntimeError) as raised:
            batch_norm(x, stats["running_mean"], stats["running_var"], training=training)
        messages.append(str(raised.value).split("\n")[0])
        for key, value in stats.items():
            assert torch.equal(value.detach(), before[key]), key
        with torch.no_grad():  # without grad mode there is nothing to refuse, as in torch
            batch_norm(x, stats["running_mean"], stats["running_var"], training=False)
    theirs, ours = messages
    assert (
        ours.replace("custom_bn::batch_norm_forward", "native_batch_norm").replace(
            "custom_bn::batch_norm_eval", "native_batch_norm"
        )
        == theirs
    )
