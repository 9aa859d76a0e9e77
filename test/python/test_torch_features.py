"""torch features the README's table claims for a converted model, beyond those with suites of
their own (test_func, test_checkpoint, test_compile, test_package): autocast and
torch.export."""

import copy

import custom_bn
import torch


def model_pair():
    torch.manual_seed(0)
    theirs = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3), torch.nn.BatchNorm2d(8),
    )  # fmt: skip
    return theirs, custom_bn.convert_batchnorm(copy.deepcopy(theirs))


def test_autocast_bfloat16_trains_like_torch():
    theirs, ours = model_pair()
    x = torch.randn(4, 3, 10, 10)
    outputs = []
    for model in (theirs, ours):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        outputs.append(out)
    assert outputs[1].dtype == outputs[0].dtype == torch.bfloat16
    torch.testing.assert_close(outputs[1], outputs[0], rtol=3e-2, atol=3e-2)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=5e-2, atol=5e-2)
    for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-2)


def test_export_runs_like_eager_in_eval_and_training():
    for training in (False, True):
        _, ours = model_pair()
        ours.train(training)
        reference = copy.deepcopy(ours)
        x = torch.randn(4, 3, 10, 10)
        program = torch.export.export(ours, (x,)).module()
        torch.testing.assert_close(program(x), reference(x))
        # Training mode records the running-stat updates, and running the program applies them.
        updated = dict(program.named_buffers())
        for name, expected in reference.named_buffers():
            torch.testing.assert_close(updated[name], expected, msg=name)
        if training:
            assert updated["1.num_batches_tracked"].item() == 1
