"""The backward ops as differentiable ops of their own (csrc/autograd/backward.cpp).

A backward run with create_graph runs the same kernels as one without, so first-order
gradients are bitwise the same; the backward ops' own derivatives (reverse and forward mode)
are checked numerically, mask by mask.
"""

import itertools

import pytest
import torch

ops = torch.ops.custom_bn


def batch_norm_call(fused, training, x, w, b, r):
    rm, rv = torch.randn(x.shape[1], dtype=w.dtype), torch.rand(x.shape[1], dtype=w.dtype) + 0.5
    if fused:
        return ops.batch_norm_relu(x, w, b, rm, rv, training, 0.1, 1e-5, None, r)
    return ops.batch_norm(x, w, b, rm, rv, training, 0.1, 1e-5)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("training", [True, False])
# The larger shape goes a channel at a time on most machines (test_cpu_plan checks the rule).
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (16, 32, 14, 14)])
def test_create_graph_gives_the_same_first_order_gradients(fused, training, shape):
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(shape[1], requires_grad=True)
    b = torch.randn(shape[1], requires_grad=True)
    r = torch.randn(shape, requires_grad=True) if fused else None
    inputs = (x, w, b, r) if fused else (x, w, b)
    torch.manual_seed(1)
    y = batch_norm_call(fused, training, x, w, b, r)
    grad_output = torch.randn_like(y)
    plain = torch.autograd.grad(y, inputs, grad_output, retain_graph=True)
    with_graph = torch.autograd.grad(y, inputs, grad_output, create_graph=True)
    for a, c in zip(plain, with_graph, strict=True):
        assert torch.equal(a, c) and a.stride() == c.stride()
    expected = "BatchNormReluBackwardBackward" if fused else "BatchNormBackwardBackward"
    assert with_graph[0].grad_fn.name() == expected


def backward_op_cases():
    for fused, training, mask in itertools.product(
        (False, True), (True, False), itertools.product((True, False), repeat=3)
    ):
        if any(mask):
            yield fused, training, mask


@pytest.mark.parametrize("fused,training,mask", list(backward_op_cases()))
def test_backward_op_derivatives(fused, training, mask):
    """gradcheck of the backward op itself: its reverse-mode derivative (the double-backward
    formula) and its forward-mode one, for each output mask."""
    torch.manual_seed(0)
    shape, dtype = (3, 2, 3, 2), torch.float64
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    w = torch.randn(2, dtype=dtype, requires_grad=True)
    b = torch.randn(2, dtype=dtype)
    rm, rv = torch.randn(2, dtype=dtype), torch.rand(2, dtype=dtype) + 0.5
    grad_output = torch.randn(shape, dtype=dtype, requires_grad=True)

    def backward(grad_output, x, w):
        # The statistics (and ReLU's output) of this x: the op's derivative treats them as
        # functions of the input, as ATen's of native_batch_norm_backward does.
        args = (x.detach(), w.detach(), b, rm.clone(), rv.clone(), None)
        if fused:
            out, save_mean, save_invstd = ops.batch_norm_relu_forward(
                *args, None, training, 0.1, 1e-5
            )
            results = ops.batch_norm_relu_backward(
                grad_output,
                out,
                x,
                w,
                rm,
                rv,
                save_mean,
                save_invstd,
                training,
                1e-5,
                [*mask, True],
            )
        else:
            _, save_mean, save_invstd = ops.batch_norm_forward(*args, training, 0.1, 1e-5)
            results = ops.batch_norm_backward(
                grad_output, x, w, rm, rv, save_mean, save_invstd, training, 1e-5, list(mask)
            )
        return tuple(t for t in results if t is not None)  # what the mask asked for

    assert torch.autograd.gradcheck(
        backward, (grad_output, x, w), check_forward_ad=True, check_undefined_grad=False
    )


def test_backward_op_refuses_gradients_of_its_constants():
    x = torch.randn(4, 3, 5)
    y, save_mean, save_invstd = ops.batch_norm_forward(
        x, None, None, None, None, None, True, 0.1, 1e-5
    )
    save_mean.requires_grad_()
    with pytest.raises(RuntimeError, match="save_mean"):
        ops.batch_norm_backward(
            torch.ones_like(y), x, None, None, None, save_mean, save_invstd, True, 1e-5, [True] * 3
        )
