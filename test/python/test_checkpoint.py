"""Activation checkpointing (torch.utils.checkpoint) recomputes a block's forward during the
backward pass. torch's batch norm then counts the batch twice in its running stats (pytorch
issue 96136); ours recognizes the recomputation and counts it once, while normalizing with
the same batch statistics, so gradients equal the un-checkpointed ones. Eager and compiled."""

import copy

import custom_bn
import pytest
import torch
from torch.utils.checkpoint import checkpoint


def block():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), custom_bn.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 1), custom_bn.BatchNormReLU2d(4, momentum=None),
    ).double()  # fmt: skip


def train_step(model, x, use_checkpoint, use_reentrant):
    if use_checkpoint:
        out = checkpoint(model, x, use_reentrant=use_reentrant)
    else:
        out = model(x)
    out.square().mean().backward()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("use_reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_running_stats_are_updated_once_and_gradients_are_unchanged(use_reentrant, compiled):
    if compiled and use_reentrant:
        pytest.skip("torch.compile supports non-reentrant checkpointing only")
    plain, checkpointed = block(), block()
    x = torch.randn(6, 3, 7, 7, dtype=torch.float64)
    for _ in range(2):
        train_step(plain, x.clone().requires_grad_(), False, use_reentrant)
        if compiled:
            step = torch.compile(lambda m, x: checkpoint(m, x, use_reentrant=False))
            step(checkpointed, x.clone().requires_grad_()).square().mean().backward()
        else:
            train_step(checkpointed, x.clone().requires_grad_(), True, use_reentrant)
    for (name, ours), (_, expected) in zip(
        checkpointed.state_dict().items(), plain.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(ours, expected, msg=name)
    assert checkpointed[1].num_batches_tracked.item() == 2
    for ours, expected in zip(checkpointed.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, expected.grad)


def test_torch_counts_a_checkpointed_batch_twice():
    """The behaviour ours corrects: if torch stops double-counting, this test says so."""
    bn = torch.nn.BatchNorm2d(3).double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    checkpoint(bn, x, use_reentrant=False).sum().backward()
    assert bn.num_batches_tracked.item() == 2
    ours = custom_bn.convert_batchnorm(copy.deepcopy(torch.nn.Sequential(torch.nn.BatchNorm2d(3))))
    checkpoint(ours.double(), x, use_reentrant=False).sum().backward()
    assert ours[0].num_batches_tracked.item() == 1
