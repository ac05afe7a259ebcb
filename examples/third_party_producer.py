"""A compression *producer* from outside the package, written against the public protocol only.

``FuseBatchNorm`` folds every BatchNorm that directly follows a convolution into that convolution at the start of
epoch ``epoch`` (fine-tuning goes on with the fused network, which is what runs on the device). It declares its
stage ``kind`` and the ``stage_applier`` that rebuilds the fused architecture on a fresh network, so its
checkpoints restore with ``lightning_segcompress.load_compressed`` in any process that imported this module.
Runs on CPU in about 10 seconds:

    python examples/third_party_producer.py --output fused.ckpt
"""

from __future__ import annotations

import argparse

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import fx, nn

from lightning_segcompress.callbacks import CompressionProducer


class TinySegNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def conv_bn_pairs(network: nn.Module) -> list[list[str]]:
    """``[conv, batchnorm]`` module names where the BatchNorm reads only that convolution's output."""
    graph = fx.symbolic_trace(network).graph
    modules = dict(network.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], nn.BatchNorm2d):
            source = node.args[0]
            if source.op == "call_module" and isinstance(modules[source.target], nn.Conv2d) and len(source.users) == 1:
                pairs.append([source.target, node.target])
    return pairs


def fold(network: nn.Module, conv_name: str, bn_name: str, with_weights: bool = True) -> None:
    """Replace the convolution by one with the BatchNorm folded in (a bias added) and the BatchNorm by Identity.
    ``with_weights=False`` builds the architecture only (a checkpoint's weights load afterwards)."""
    conv, bn = network.get_submodule(conv_name), network.get_submodule(bn_name)
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True).to(conv.weight.device)
    if with_weights:
        weight, bias = torch.nn.utils.fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var,
                                                           bn.eps, bn.weight, bn.bias)
        fused.weight, fused.bias = weight, bias
    _set(network, conv_name, fused)
    _set(network, bn_name, nn.Identity())


def _set(network: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(network.get_submodule(parent) if parent else network, child, module)


class FuseBatchNorm(CompressionProducer):
    """Fold BatchNorm into the preceding convolution at the start of epoch ``epoch``.

    Args:
        epoch: the (0-based) epoch at whose start the network is fused.
        network_attribute: attribute path of the network (default: found automatically).
    """

    kind = "example.fuse_batchnorm"

    @staticmethod
    def stage_applier(network: nn.Module, stage: dict, applied: dict | None) -> None:
        if applied is None:  # a fresh network: build the fused architecture
            for conv_name, bn_name in stage["pairs"]:
                fold(network, conv_name, bn_name, with_weights=False)

    def __init__(self, epoch: int = 1, network_attribute: str | None = None) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}.")
        self.epoch = epoch
        self.network_attribute = network_attribute
        self.fused: list[list[str]] = []

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch != self.epoch or self.fused:
            return
        network = self.network(pl_module)
        pairs = conv_bn_pairs(network)
        originals = {name: network.get_submodule(name) for pair in pairs for name in pair}

        def apply() -> nn.Module:
            for conv_name, bn_name in pairs:
                fold(network, conv_name, bn_name)
            self.record_stage(network, {"pairs": pairs})
            return network

        def undo() -> None:
            for name, module in originals.items():
                _set(network, name, module)

        self.compress(trainer, pl_module, network, apply, undo)
        self.fused = pairs

    def progress_state(self) -> dict:
        return {"fused": self.fused}

    def load_progress_state(self, state: dict) -> None:
        self.fused = list(state.get("fused", []))


class Segmenter(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = TinySegNet()

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="fused.ckpt", help="where the checkpoint of the fused model goes")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images = torch.randn(32, 3, 16, 16)
    labels = (images[:, 0] > 0).long() + (images[:, 1] > 0).long()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=8)
    model, fuse = Segmenter(), FuseBatchNorm(epoch=1)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[fuse], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, loader)
    trainer.save_checkpoint(args.output)
    batchnorms = sum(isinstance(m, nn.BatchNorm2d) for m in model.net.modules())
    print(f"fused {len(fuse.fused)} convolution + BatchNorm pairs; {batchnorms} BatchNorm layers "
          f"left; checkpoint: {args.output}")


if __name__ == "__main__":
    main()
