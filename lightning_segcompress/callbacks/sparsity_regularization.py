"""SparsityRegularization: push BatchNorm scales of any LightningModule towards zero before pruning."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from lightning_segcompress.callbacks.protocol import CompressionCallback, CompressionEvent
from lightning_segcompress.sparsity import (
    METHODS,
    SparsityError,
    add_l1_subgradient,
    batchnorm_layers,
    budget_strengths,
    channel_costs,
    gamma_statistics,
    pooled_features,
    strengths_from_features,
)
from lightning_segcompress.utils.inspection import example_input, select_modules
from lightning_segcompress.utils.shapes import FALLBACK_INPUT_SIZE, batch_input_size, checked_input_size

FEATURE_METHODS = ("acsl", "cap")


class SparsityRegularization(CompressionCallback):
    """Add an L1 penalty on BatchNorm scales (gamma) to the gradients, so that a following
    ``StructuredPruning(importance="bn_scale")`` removes the channels the penalty drove to zero.

    After each backward pass (before the optimizer step) ``gamma.grad += lambda_c * sign(gamma)``, where the
    per-channel strength ``lambda_c`` depends on ``method``:

    - ``slimming``: ``strength`` everywhere (Liu et al. 2017);
    - ``acsl``: ``strength * r_c / mean(r)`` with ``r_c`` the mean |cosine| of channel c's output map with the
      other channels of its layer: redundant channels are pushed harder (reconstruction of ACSL);
    - ``cap``: ``strength * (1 / k_c) / mean(1 / k)`` with ``k_c`` the attention channel c receives in
      ``softmax(F F^T)``:
      channels that give little context are pushed harder (reconstruction after CAP, He et al. 2021);
    - ``budget``: ``strength * cost / mean(cost)`` per layer, cost the MACs (``budget_resource="macs"``) or
      parameters one channel of the layer carries (MorphNet-style block-wise weighting).

    ``acsl``/``cap`` read the BN outputs of one training batch every ``update_every`` steps with forward hooks
    (pooled to ``affinity_size``); under DDP the strengths are averaged across ranks, so all ranks apply the
    same update. The share of scales below ``eps`` and their mean are logged as ``sparsity/gamma_below_eps`` and
    ``sparsity/gamma_mean_abs`` every epoch. After a pruning step the BN layers are found again.

    Args:
        method: ``"slimming"``, ``"acsl"``, ``"cap"`` or ``"budget"``.
        strength: mean L1 strength per channel (REFERENCE: 1e-4 for VGG-like, 1e-5 for ResNets).
        start_epoch: first epoch with the penalty.
        end_epoch: first epoch without it (None: until the fit ends), e.g. the pruning epoch; as everywhere in
            this package, ``end_epoch`` is excluded.
        update_every: training steps between two affinity measurements (``acsl``/``cap``).
        affinity_size: BN outputs are pooled to at most this many pixels per side before affinities.
        budget_resource: ``"macs"`` or ``"params"`` for ``budget``.
        ignored_layers: BN layer names (or regexes) left alone, e.g. the classifier's.
        eps: threshold of the logged sparsity.
        input_size: ``[H, W]`` of the example used for ``budget`` costs; ``None`` (default): the size of the
            fit's training batches (the costs are then computed at the first training batch).
        network_attribute: attribute path of the network in the LightningModule (default: found).

    Example::

        trainer = Trainer(max_epochs=10, callbacks=[
            SparsityRegularization(method="acsl", strength=1e-4, end_epoch=4),
            StructuredPruning(amount=0.5, importance="bn_scale", start_epoch=4),
            KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression")])
    """

    def __init__(
        self,
        method: str = "slimming",
        strength: float = 1e-4,
        start_epoch: int = 0,
        end_epoch: int | None = None,
        update_every: int = 20,
        affinity_size: int = 16,
        budget_resource: str = "macs",
        ignored_layers: list[str] | None = None,
        eps: float = 1e-2,
        input_size: list[int] | None = None,
        network_attribute: str | None = None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}.")
        if strength < 0:
            raise ValueError(f"strength must be >= 0, got {strength}.")
        if start_epoch < 0 or (end_epoch is not None and end_epoch <= start_epoch):
            raise ValueError(f"need 0 <= start_epoch < end_epoch, got {start_epoch} and {end_epoch}.")
        if update_every < 1 or affinity_size < 1:
            raise ValueError("update_every and affinity_size must be >= 1.")
        if budget_resource not in ("macs", "params"):
            raise ValueError(f"budget_resource must be 'macs' or 'params', got {budget_resource!r}.")
        self.method = method
        self.strength = strength
        self.start_epoch = start_epoch
        self.end_epoch = end_epoch
        self.update_every = update_every
        self.affinity_size = affinity_size
        self.budget_resource = budget_resource
        self.ignored_patterns = list(ignored_layers or [])
        self.eps = eps
        self.input_size = checked_input_size(input_size)  # None: the first training batch's size
        self.network_attribute = network_attribute
        self.strengths: dict[str, torch.Tensor] = {}
        self._layers: dict[str, nn.Module] = {}
        self._features: dict[str, torch.Tensor] = {}
        self._handles: list = []
        self._capture = False

    # ---- set-up ----------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._find_layers(pl_module)  # configuration errors now, before any training

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._find_layers(pl_module)  # a resumed checkpoint may have restored a pruned network since setup

    def _find_layers(self, pl_module: pl.LightningModule) -> None:
        network = self.network(pl_module)
        ignored = set(select_modules(network, self.ignored_patterns, "ignored_layers", SparsityError))
        self._remove_hooks()
        self._layers = batchnorm_layers(network, ignored)
        stale = [n for n, s in self.strengths.items()
                 if n not in self._layers or s.numel() != _channels(self._layers[n])]
        for name in stale:  # pruned or gone: measured again at the next update
            self.strengths.pop(name)
        if self.method == "budget":
            if self.input_size is None:  # the costs are computed at the first training batch, at its size
                return
            example = example_input(network, size=tuple(self.input_size))
            costs = channel_costs(network, self._layers, example, self.budget_resource)
            self.strengths = budget_strengths(self.strength, costs, {n: _channels(m) for n, m in self._layers.items()})
        elif self.method == "slimming":
            self.strengths = {n: torch.full((_channels(m),), self.strength) for n, m in self._layers.items()}
        else:
            self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self._layers.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self._capture:
                self._features[name] = pooled_features(output, self.affinity_size)
        return hook

    def _remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()
        self._features.clear()

    def on_after_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             event: CompressionEvent) -> None:
        self._find_layers(pl_module)  # pruning replaced BN parameters and changed their sizes

    # ---- per step --------------------------------------------------------------------------------------------

    def _active(self, trainer: pl.Trainer) -> bool:
        epoch = trainer.current_epoch
        return epoch >= self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.input_size is None:
            self._take_input_size(trainer, pl_module, batch)
        missing = any(name not in self.strengths for name in self._layers)
        self._capture = self.method in FEATURE_METHODS and self._active(trainer) and (
            missing or trainer.global_step % self.update_every == 0)

    def _take_input_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """``input_size=None``: the first training batch's ``[H, W]`` (global rank 0's: every rank applies the same
        strengths)."""
        try:
            size = batch_input_size(batch)
        except TypeError as err:
            size = None
            rank_zero_info(f"SparsityRegularization: input_size=None is the [H, W] of the fit's training batches, but "
                           f"the batch holds no image tensor ({err}); using input_size={list(FALLBACK_INPUT_SIZE)}.")
        if trainer.world_size > 1:
            size = trainer.strategy.broadcast(size, src=0)
        self.input_size = list(size or FALLBACK_INPUT_SIZE)
        if self.method == "budget":
            self._find_layers(pl_module)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if not self._active(trainer) or optimizer is not trainer.optimizers[0]:
            return
        if self._capture:
            self._update_strengths(trainer)
            self._capture = False
        add_l1_subgradient(self._layers, self.strengths)

    def _update_strengths(self, trainer: pl.Trainer) -> None:
        names = [n for n in self._layers if n in self._features]
        if not names:
            return
        values = [strengths_from_features(self.method, self.strength, self._features.pop(n)) for n in names]
        flat = torch.cat(values)
        if trainer.world_size > 1:  # every rank applies the same penalty, so the ranks' weights stay identical
            flat = trainer.strategy.reduce(flat.to(trainer.strategy.root_device), reduce_op="mean").cpu()
        for name, chunk in zip(names, flat.split([v.numel() for v in values])):
            self.strengths[name] = chunk.clone()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stats = gamma_statistics(self._layers, self.eps)
        pl_module.log("sparsity/gamma_below_eps", stats["below_eps"])
        pl_module.log("sparsity/gamma_mean_abs", stats["mean_abs"])

    def progress_state(self) -> dict[str, Any]:
        return {"strengths": {name: s.tolist() for name, s in self.strengths.items()}}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        restored = {name: torch.tensor(s) for name, s in state.get("strengths", {}).items()}
        self.strengths.update({n: s for n, s in restored.items() if n in self._layers
                               and s.numel() == _channels(self._layers[n])})


def _channels(bn: nn.Module) -> int:
    return int(bn.weight.numel())
