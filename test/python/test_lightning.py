"""custom_bn.integrations.lightning.SyncBatchNormPlugin: Lightning's DDP on 2 CPU ranks over gloo
with our SyncBatchNorm in place trains exactly as one process on the whole batch, and the model
gets its own layers back after fit."""

import copy

import custom_bn
import pytest
import torch
from torch import nn

lightning = pytest.importorskip("lightning")
timm = pytest.importorskip("timm")
from custom_bn.integrations.lightning import SyncBatchNormPlugin  # noqa: E402

BATCH = 8


def _network() -> nn.Module:
    torch.manual_seed(0)
    return custom_bn.convert_batchnorm(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.Conv2d(6, 4, 3, padding=1),
            timm.layers.BatchNormAct2d(4, act_layer=nn.SiLU),
            nn.Conv2d(4, 4, 1),
            custom_bn.BatchNormReLU2d(4),
            nn.Flatten(),
            nn.Linear(4 * 5 * 5, 3),
        )
    ).double()


def _data():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH, 3, 5, 5, dtype=torch.float64, generator=generator)
    return x, torch.randint(0, 3, (BATCH,), generator=generator)


class Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = _network()

    def training_step(self, batch, _):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        # Lightning adds a DistributedSampler: each rank gets half of the batch.
        dataset = torch.utils.data.TensorDataset(*_data())
        return torch.utils.data.DataLoader(dataset, batch_size=BATCH // 2)


def test_plugin_on_two_cpu_ranks_trains_as_one_process_on_the_whole_batch(tmp_path):
    module = Classifier()
    reference = copy.deepcopy(module.net)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        plugins=[SyncBatchNormPlugin()],
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    # The whole batch, two steps, in this process.
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = _data()
    for _ in range(2):
        optimizer.zero_grad()
        nn.functional.cross_entropy(reference(x), y).backward()
        optimizer.step()
    for (key, want), got in zip(reference.state_dict().items(), module.net.state_dict().values(),
                                strict=True):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=key)
    assert type(module.net[1]) is custom_bn.BatchNorm2d
    assert type(module.net[6]) is custom_bn.BatchNormReLU2d
    assert type(module.net[4]).__module__ == "custom_bn.integrations.timm"


def test_plugin_apply_and_revert_give_back_the_classes():
    plugin = SyncBatchNormPlugin()
    net = _network()
    synced = plugin.apply(net)
    assert type(synced[1]) is custom_bn.SyncBatchNorm
    assert type(synced[4]).__name__ == "SyncBatchNormAct" and type(synced[4].act) is nn.SiLU
    assert type(synced[6]) is custom_bn.SyncBatchNormReLU2d
    reverted = plugin.revert(synced)
    assert type(reverted[1]) is custom_bn.BatchNorm2d
    assert type(reverted[4]).__name__ == "BatchNormAct2d" and type(reverted[4].act) is nn.SiLU
    assert type(reverted[6]) is custom_bn.BatchNormReLU2d
    assert not hasattr(reverted[1], "process_group")
    assert reverted[1].weight is net[1].weight
