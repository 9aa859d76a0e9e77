"""The fused op's activations beyond ReLU (ReLU6, hardtanh, LeakyReLU, identity): each against
torch's batch norm, add and that activation, forward and backward, in every mode and dtype;
gradcheck (forward mode too), gradgradcheck, opcheck, errors, and the module's keywords."""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from samples import SHAPES, make_input, make_sample, reference_batch_norm, tolerance

ops = torch.ops.custom_bn

# name: ((min_val, max_val, negative_slope), torch's function, torch's module)
ACTIVATIONS = {
    "relu": ((0.0, None, 0.0), F.relu, torch.nn.ReLU),
    "relu6": ((0.0, 6.0, 0.0), F.relu6, torch.nn.ReLU6),
    "hardtanh": ((-0.5, 0.75, 0.0), lambda v: F.hardtanh(v, -0.5, 0.75),
                 lambda: torch.nn.Hardtanh(-0.5, 0.75)),
    "leaky_relu": ((0.0, None, 0.1), lambda v: F.leaky_relu(v, 0.1),
                   lambda: torch.nn.LeakyReLU(0.1)),
    "identity": ((0.0, None, 1.0), lambda v: v, torch.nn.Identity),
}  # fmt: skip


def activation_grad(grad, output, min_val, max_val, slope):
    """torch's backward of the activation, from our output (its region tells the gradient)."""
    dz = torch.where(output > min_val, grad, grad * slope)
    return dz if max_val is None else torch.where(output >= max_val, torch.zeros_like(dz), dz)


CASES = [
    (name, dim, layout, dtype_name, training, residual)
    for name in ACTIVATIONS
    for dim, layout in ((2, "contiguous"), (2, "sliced"), (4, "contiguous"), (4, "channels_last"))
    for dtype_name, training, residual in itertools.product(
        ("float32", "float64", "bfloat16+float32"), (True, False), (True, False)
    )
]


@pytest.mark.parametrize("name,dim,layout,dtype_name,training,with_residual", CASES)
def test_parity_with_torch_bn_add_activation(
    name, dim, layout, dtype_name, training, with_residual
):
    activation, torch_fn, _ = ACTIVATIONS[name]
    shape = SHAPES[dim]
    sample = make_sample(shape, dtype_name, layout, training=training)
    with torch.no_grad():  # outputs on both sides of every kink of the narrow hardtanh
        sample.weight.mul_(2)
    dtype = sample.input.dtype
    residual = make_input(shape, dtype, layout) if with_residual else None
    tol = tolerance(dtype)

    ours = sample.clone(requires_grad=True)
    our_residual = residual.clone().requires_grad_() if with_residual else None
    out = ops.batch_norm_relu(*ours.args(), our_residual, *activation)
    reference = sample.clone()
    reference_batch_norm(reference)  # the running statistics of torch
    if ours.running_mean is not None:
        torch.testing.assert_close(ours.running_mean, reference.running_mean, **tol)
        torch.testing.assert_close(ours.running_var, reference.running_var, **tol)

    # float64 from the same values
    wide = sample.clone()
    for field in ("input", "weight", "bias", "running_mean", "running_var"):
        setattr(wide, field, getattr(wide, field).double())
    wide.input.requires_grad_()
    wide.weight.requires_grad_()
    wide.bias.requires_grad_()
    pre_activation = reference_batch_norm(wide)
    if with_residual:
        wide_residual = residual.double().requires_grad_()
        pre_activation = pre_activation + wide_residual
    expected = torch_fn(pre_activation)
    torch.testing.assert_close(out, expected.to(dtype), **tol)
    assert out.stride() == torch.empty_like(sample.input).stride()

    grad = torch.randn_like(out)
    dz = activation_grad(grad, out, *activation)
    # Away from the kinks, our output falls in the region the float64 value falls in.
    clear = pre_activation.detach() - activation[0]
    if activation[1] is not None:
        clear = torch.minimum(clear.abs(), (pre_activation.detach() - activation[1]).abs())
    clear = clear.abs() > 8 * tol["atol"]
    torch.testing.assert_close(
        dz.double()[clear],
        torch.autograd.grad(expected, pre_activation, grad.double(), retain_graph=True)[0][clear],
        **tol,
    )
    out.backward(grad)
    if with_residual:
        assert torch.equal(our_residual.grad, dz)
    pre_activation.backward(dz.double())
    torch.testing.assert_close(ours.input.grad, wide.input.grad.to(dtype), **tol)
    for field in ("weight", "bias"):
        ours_grad, wide_grad = getattr(ours, field).grad, getattr(wide, field).grad
        torch.testing.assert_close(
            ours_grad, wide_grad.to(ours_grad.dtype), rtol=tol["rtol"] * 4, atol=tol["atol"] * 4
        )


@pytest.mark.parametrize("name", [n for n in ACTIVATIONS if n != "relu"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_gradgradcheck_and_forward_mode(name, training):
    activation = ACTIVATIONS[name][0]
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    r = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def fn(x, w, b, r):
        args = (x, w, b, rm.clone(), rv.clone(), training, 0.1, 1e-5, None, r)
        return ops.batch_norm_relu(*args, *activation)

    inputs = (x, w, b, r)
    assert torch.autograd.gradcheck(fn, inputs, check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, inputs)


@pytest.mark.parametrize("name", ["relu6", "hardtanh", "leaky_relu"])
@pytest.mark.parametrize("training", [True, False])
def test_opcheck(name, training):
    activation = ACTIVATIONS[name][0]
    s = make_sample((3, 4, 5, 5), "float32", "channels_last", training=training)
    residual = torch.randn_like(s.input)
    grad_sample = s.clone(requires_grad=True)
    torch.library.opcheck(ops.batch_norm_relu, (*grad_sample.args(), residual, *activation))
    forward_args = (*s.relu_forward_args(residual), *activation)
    torch.library.opcheck(ops.batch_norm_relu_forward, forward_args)
    out, save_mean, save_invstd = ops.batch_norm_relu_forward(*forward_args)
    mask = [True, True, True, True]
    backward_args = s.backward_args(torch.randn_like(out), save_mean, save_invstd, mask, out)
    torch.library.opcheck(ops.batch_norm_relu_backward, (*backward_args, *activation))


@pytest.mark.parametrize(
    "activation,argument",
    [((0.0, None, -0.1), "negative_slope"), ((1.0, 0.5, 0.0), "min_val cannot be greater"),
     ((float("inf"), None, 0.0), "min_val"), ((0.0, float("nan"), 0.0), "max_val")],
)  # fmt: skip
def test_bad_activation_raises_value_error_and_changes_nothing(activation, argument):
    s = make_sample((4, 3, 5, 5), "float32", "contiguous", training=True)
    before = s.clone()
    with pytest.raises(ValueError, match=argument):
        ops.batch_norm_relu(*s.args(), None, *activation)
    assert torch.equal(s.running_mean, before.running_mean)
    assert torch.equal(s.num_batches_tracked, before.num_batches_tracked)
    with pytest.raises(ValueError, match=argument):
        ops.batch_norm_eval(s.input, s.weight, s.bias, s.running_mean, s.running_var, 1e-5, True,
                            None, *activation)  # fmt: skip


def test_module_takes_an_activation_and_sync_conversion_keeps_it():
    import custom_bn

    module = custom_bn.BatchNormReLU2d(4, max_val=6.0).double()
    reference = torch.nn.BatchNorm2d(4).double()
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64) * 8
    residual = torch.randn_like(x)
    torch.testing.assert_close(module(x, residual), F.relu6(reference(x) + residual))
    torch.testing.assert_close(module.running_var, reference.running_var)
    assert "max_val=6.0" in repr(module) and "max_val" not in repr(custom_bn.BatchNormReLU2d(4))
    assert list(module.state_dict()) == list(reference.state_dict())
    scripted = torch.jit.script(copy.deepcopy(module).eval())
    torch.testing.assert_close(scripted(x, residual), module.eval()(x, residual))
    # SyncBatchNorm conversion keeps it; without a process group it is the local op.
    synced = custom_bn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(module))
    assert type(synced) is custom_bn.SyncBatchNormReLU2d and synced.max_val == 6.0
    torch.testing.assert_close(synced(x, residual), module(x, residual))
    with pytest.raises(ValueError, match="negative_slope"):
        custom_bn.BatchNormReLU2d(4, negative_slope=-0.1)
