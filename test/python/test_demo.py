"""The demo's second part (examples/batch_norm_lessons.py) shows what it says: at the small
learning rate the networks with batch norm learn faster than the one without; the running
statistics track the training set's; in eval an image's normalized features do not depend on
the rest of the batch, in training they do."""

import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import batch_norm_lessons  # noqa: E402
import train_digits  # noqa: E402


@pytest.fixture(scope="module")
def data():
    return train_digits.digits_split()


def test_batch_norm_speeds_up_training_at_the_small_rate(data):
    lr = batch_norm_lessons.LEARNING_RATES["small"]
    final = {
        kind: batch_norm_lessons.train(kind, lr, data, epochs=2)[0][-1][0]
        for kind in batch_norm_lessons.MODELS
    }
    assert final["BN before ReLU (fused)"] < final["no batch norm"] / 3
    assert final["BN after ReLU"] < final["no batch norm"] / 3


def test_the_statistics_and_modes_it_reports(data, capsys):
    lr = batch_norm_lessons.LEARNING_RATES["usual"]
    _, net = batch_norm_lessons.train("BN before ReLU (fused)", lr, data, epochs=2)
    messages = []
    batch_norm_lessons.explain_parameters(net, data, messages.append)
    batch_norm_lessons.explain_modes(net, data, messages.append)
    printed = capsys.readouterr().out
    assert "eval mode:     largest difference 0.00e+00" in printed
    training_difference = float(
        printed.split("training mode: largest difference ")[1].split(":")[0]
    )
    assert training_difference > 1e-3
    bn = batch_norm_lessons.first_batch_norm(net)
    features = batch_norm_lessons.layer_input(net, bn, data["x_train"])
    mean = features.transpose(0, 1).reshape(bn.num_features, -1).mean(1)
    torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=0.05)
