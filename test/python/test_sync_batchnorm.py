"""custom_bn.SyncBatchNorm across 2-3 processes on loopback (gloo), against one process
running custom_bn's BatchNorm on the concatenated batch."""

import custom_bn
import pytest
import sync_workers
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT  # noqa: F401  (loads the library in this process)

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(),
    reason="torch.distributed with gloo is not available",
)


def spawn(fn, world_size, *args, tmp_path):
    mp.spawn(
        fn, args=(world_size, str(tmp_path / "rendezvous"), *args), nprocs=world_size, join=True
    )


@pytest.mark.parametrize(
    "world_size, split",
    [(2, (4, 4)), (3, (1, 5, 2)), (3, (3, 0, 5))],
    ids=["even", "uneven", "empty-rank"],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_parity_with_whole_batch(world_size, split, momentum, tmp_path):
    spawn(sync_workers.parity, world_size, split, momentum, None, tmp_path=tmp_path)


@pytest.mark.parametrize(
    "world_size, split, activation, residual, dtype",
    [
        (3, (1, 5, 2), "relu", True, "float32"),
        (3, (3, 0, 5), "leaky_relu", False, "float64"),
        (2, (4, 4), "relu6", True, "bfloat16"),
        (2, (2, 6), "identity", True, "float64"),
    ],
    ids=["uneven-relu-residual", "empty-rank-leaky", "even-relu6-bf16", "identity-residual"],
)
def test_inplace_parity_with_whole_batch(world_size, split, activation, residual, dtype, tmp_path):
    spawn(
        sync_workers.inplace_parity,
        world_size,
        split,
        activation,
        residual,
        dtype,
        tmp_path=tmp_path,
    )


def test_distributed_data_parallel_trains_in_place_like_one_process(tmp_path):
    spawn(sync_workers.ddp_training, 2, "gloo", "cpu", True, tmp_path=tmp_path)


def test_inplace_compiles_without_graph_breaks(tmp_path):
    spawn(sync_workers.inplace_compiled, 2, tmp_path=tmp_path)


def test_subgroup_of_the_world(tmp_path):
    # Ranks 0 and 2 synchronise with each other; rank 1 stays out.
    spawn(sync_workers.parity, 3, (3, 5), 0.1, [0, 2], tmp_path=tmp_path)


def test_distributed_data_parallel_trains_like_one_process(tmp_path):
    spawn(sync_workers.ddp_training, 2, tmp_path=tmp_path)


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs 2 CUDA devices")
def test_nccl_parity(tmp_path):
    spawn(sync_workers.parity, 2, (4, 4), 0.1, None, "nccl", "cuda", tmp_path=tmp_path)


def test_single_process_and_eval_use_the_local_op():
    bn = custom_bn.SyncBatchNorm(4)
    reference = torch.nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(bn(x), reference(x))
    bn.eval(), reference.eval()
    torch.testing.assert_close(bn(x), reference(x))


def test_convert_sync_batchnorm_keeps_state():
    model = sync_workers.SmallCNN()
    model(torch.randn(4, 1, 6, 6))
    converted = custom_bn.SyncBatchNorm.convert_sync_batchnorm(model)
    layers = [m for m in converted.modules() if isinstance(m, custom_bn.SyncBatchNorm)]
    assert len(layers) == 2
    assert layers[1].momentum is None
    assert layers[0].num_batches_tracked.item() == 1
    assert list(converted.state_dict()) == list(sync_workers.SmallCNN().state_dict())


def test_input_checks_match_torch():
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        custom_bn.SyncBatchNorm(3)(torch.randn(3))


def test_readme_example_runs():
    import os
    import re
    import subprocess
    import sys

    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sync_batchnorm_gloo.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    # The two processes share stdout: their lines may interleave.
    means = re.findall(r"running_mean\[:3\] (\[[^\]]*\])", result.stdout)
    assert len(means) == 2 and means[0] == means[1], "both ranks share batch statistics"


def test_inplace_module_single_process_is_the_in_place_op():
    fused = custom_bn.BatchNormReLU2d(4, inplace=True, max_val=6.0)
    with torch.no_grad():
        fused.bias.normal_()
    synced = custom_bn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert type(synced) is custom_bn.SyncBatchNormReLU2d
    assert synced.inplace and synced.max_val == 6.0
    assert "inplace=True" in repr(synced)
    reference = custom_bn.BatchNormReLU2d(4, inplace=True, max_val=6.0)
    reference.load_state_dict(fused.state_dict())
    x = torch.randn(5, 4, 3, 3)
    for training in (True, False):
        synced.train(training), reference.train(training)
        ours, expected = x.clone(), x.clone()
        assert synced(ours) is ours  # written over its input
        torch.testing.assert_close(ours, reference(expected), rtol=0, atol=0)
    torch.testing.assert_close(synced.running_mean, reference.running_mean, rtol=0, atol=0)


def test_inplace_module_needs_a_piecewise_linear_activation():
    with pytest.raises(ValueError, match="SyncBatchNormReLU2d: inplace=True needs a piecewise"):
        custom_bn.SyncBatchNormReLU2d(4, activation="silu", inplace=True)
    module = custom_bn.SyncBatchNormReLU2d(4, negative_slope=0.1)
    assert not module.inplace and module.negative_slope == 0.1
