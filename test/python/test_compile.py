"""The ops under torch.compile(fullgraph=True), including momentum=None bookkeeping."""

import pytest
import torch
from samples import make_sample

ops = torch.ops.custom_bn


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_compiled_training_steps_match_eager(backend, layout):
    torch._dynamo.reset()
    sample = make_sample((4, 3, 6, 6), layout=layout, momentum=None)
    sample.num_batches_tracked.zero_()
    eager, compiled_state = sample.clone(), sample.clone()
    weight = sample.weight.detach().clone().requires_grad_()
    weight_c = sample.weight.detach().clone().requires_grad_()

    def step(x, w, state):
        y = ops.batch_norm(
            x,
            w,
            state.bias,
            state.running_mean,
            state.running_var,
            True,
            None,
            1e-5,
            state.num_batches_tracked,
        )
        return torch.relu(y).square().sum()

    compiled_step = torch.compile(step, backend=backend, fullgraph=True, dynamic=False)
    for _ in range(3):
        x = torch.randn_like(sample.input) * 2 + 1
        loss = step(x, weight, eager)
        loss_c = compiled_step(x.clone(), weight_c, compiled_state)
        torch.testing.assert_close(loss_c, loss, rtol=1e-5, atol=1e-4)
        loss.backward()
        loss_c.backward()
    torch.testing.assert_close(weight_c.grad, weight.grad, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(compiled_state.running_mean, eager.running_mean)
    torch.testing.assert_close(compiled_state.running_var, eager.running_var)
    assert compiled_state.num_batches_tracked.item() == eager.num_batches_tracked.item() == 3


def test_compiled_eval_with_dynamic_shapes():
    torch._dynamo.reset()
    sample = make_sample((4, 3, 5), training=False)

    def fn(x):
        return ops.batch_norm(
            x, sample.weight, sample.bias, sample.running_mean, sample.running_var, False, 0.1, 1e-5
        )

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True, dynamic=True)
    for n in (4, 7, 9):
        x = torch.randn(n, 3, 5)
        torch.testing.assert_close(compiled(x), fn(x))
