"""A Lightning plugin that synchronizes batch norm with custom_bn.SyncBatchNorm, which also
runs on CPU over gloo (Lightning's own `sync_batchnorm=True` puts torch's SyncBatchNorm in
place, which needs CUDA, and its revert after `fit` leaves torch's `_BatchNormXd` in the
model, not the layer it replaced).

    trainer = lightning.Trainer(strategy="ddp", plugins=[SyncBatchNormPlugin()], ...)

`apply` converts with custom_bn.SyncBatchNorm.convert_sync_batchnorm (torch's and our batch
norm layers, the fused BatchNormReLU2d and timm's layers keep their activation); `revert` gives
each synchronized layer back the class it had, over the same parameters and buffers.
"""

from lightning.pytorch.plugins import LayerSync
from torch import nn

from ..modules import _retype
from ..sync_batchnorm import SyncBatchNorm


class SyncBatchNormPlugin(LayerSync):
    def __init__(self, process_group=None):
        self.process_group = process_group
        self._classes: dict[int, type] = {}

    def apply(self, model: nn.Module) -> nn.Module:
        before = {name: type(m) for name, m in model.named_modules()}
        synced = SyncBatchNorm.convert_sync_batchnorm(model, self.process_group)
        for name, module in synced.named_modules():
            if before.get(name) not in (None, type(module)):
                self._classes[id(module)] = before[name]
        return synced

    def revert(self, model: nn.Module) -> nn.Module:
        original = self._classes.get(id(model))
        if original is not None:
            reverted = _retype(model, original)
            reverted.__dict__.pop("process_group", None)
            model = reverted
        for name, child in list(model.named_children()):
            model.add_module(name, self.revert(child))
        return model
