"""The compression protocol: how compression callbacks cooperate without reaching into each other.

A *producer* changes the network's architecture (:class:`StructuredPruning`, :class:`QuantizationAwareTraining`,
:class:`ShuntReplacement`). Around each of its steps it hands one :class:`CompressionEvent` to every
:class:`CompressionCallback` in ``trainer.callbacks``, in this order:

1. ``filter_plan`` (producers that plan, e.g. structured pruning; on global rank 0, before anything changes): each
   filter gets the proposed plan in ``event.plan`` and returns the part to apply (e.g. :class:`PostPruning` drops the
   pruning groups that cost too much mIoU). Filters may try things on ``event.network`` but must leave it exactly as
   they found it.
2. ``on_before_compression`` (every rank): the network is still as before. ``event.snapshot()`` returns a frozen
   copy of it, made once on first request and shared by every observer; the producer drops its reference after
   the step, so it lives on only where an observer keeps it (e.g. as a distillation teacher).
3. The producer applies the step once, atomically, on every rank.
4. BatchNorm re-estimation (every rank, together): the changed network's BatchNorm running statistics are measured
   again on ``bn_batches`` training batches (the producer's argument; 0 disables), so that nothing judges or
   fine-tunes a network whose statistics belong to another one. Quantization re-estimates the float network just
   before it is prepared instead. ``event.batchnorm`` is the report (layers, batches, seconds).
5. ``on_after_compression`` (every rank): ``event.network`` is the changed network (``event.plan`` what was
   applied). Observers adapt their own state (connectors, penalty strengths, hooks) and never change the network.

Heavy work (exports, timing, scoring, reports) belongs in ``on_before_compression`` or later hooks on rank 0,
never inside a producer's atomic section. Listeners are called in ``trainer.callbacks`` order, and the protocol
is built so that the order does not change the outcome.

A compression callback's state in checkpoints lives under a stable key (its class name), so a resumed fit with
changed hyperparameters keeps the progress and warns about what changed.

A producer subclasses :class:`CompressionProducer`: it declares its stage ``kind`` and the ``stage_applier`` that
replays a recorded stage on a fresh network (registered in :mod:`lightning_segcompress.state.registry`, open to any
package); the base class installs the checkpoint restore, writes the stages into checkpoints and runs its steps
through :func:`run_compression_step`.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from lightning_segcompress.callbacks._batchnorm import reestimate_statistics
from lightning_segcompress.callbacks._checkpoints import install_checkpoint_restore, remove_checkpoint_restore
from lightning_segcompress.callbacks._ddp import rewrap_ddp
from lightning_segcompress.callbacks._training import rebuild_optimizers
from lightning_segcompress.state import register_stage_applier, set_stage, write_to_checkpoint
from lightning_segcompress.utils.batchnorm import BatchNormReport, batchnorm_buffers, restore_batchnorm_buffers
from lightning_segcompress.utils.inspection import find_network, frozen_copy

History = list[list]  # structured pruning groups: [[layer name, is out channels, [indices]], ...]


@dataclass
class CompressionEvent:
    """One compression step, as every listener sees it.

    Attributes:
        kind: the compression stage kind: ``"structured_pruning"``, ``"quantization"`` or ``"shunt"``.
        step: 1-based step of this technique in the fit (pruning schedules have several).
        network: the network being compressed (before the step in ``on_before_compression``, after it in
            ``on_after_compression``).
        epoch, global_step: when the step happens.
        plan: structured pruning only: the groups proposed (filters) or applied (after).
        batchnorm: the BatchNorm re-estimation of this step (None where none ran).
    """

    kind: str
    step: int
    network: nn.Module
    epoch: int = 0
    global_step: int = 0
    plan: History | None = None
    batchnorm: BatchNormReport | None = None
    _snapshot: nn.Module | None = field(default=None, repr=False)
    _before: bool = field(default=True, repr=False)

    def snapshot(self) -> nn.Module:
        """A frozen copy (eval mode, no gradients, no hooks) of the network as it was before the step, shared by
        every listener of this event. Take it in ``on_before_compression``."""
        if self._snapshot is None:
            if not self._before:
                raise RuntimeError("event.snapshot() is the network before the step: request it in "
                                   "on_before_compression, not after the step.")
            self._snapshot = frozen_copy(self.network)
        return self._snapshot


class CompressionCallback(Callback):
    """Base class of every lightning-segcompress callback (and of your own): declared protocol hooks, a stable
    checkpoint key, hyperparameters kept with the progress, and the shared ``network_attribute``/``output_dir``.

    Subclasses override any of the hooks below and keep their progress in :meth:`progress_state` /
    :meth:`load_progress_state` (not ``state_dict``, which the base class uses to add the hyperparameters).

    Example (a callback that logs the channels each pruning step removes)::

        class LogPrunedChannels(CompressionCallback):
            def on_after_compression(self, trainer, pl_module, event):
                if event.kind == "structured_pruning":
                    pl_module.print(f"step {event.step}: {sum(len(g[2]) for g in event.plan)} channels removed")
    """

    network_attribute: str | None = None
    output_dir: str | None = None

    def __new__(cls, *args: Any, **kwargs: Any):
        instance = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(instance, *args, **kwargs)
        except TypeError:  # __init__ reports the bad arguments itself
            return instance
        bound.apply_defaults()
        instance._init_args = {k: v for k, v in list(bound.arguments.items())[1:] if _plain(v)}
        return instance

    # ---- protocol hooks ----------------------------------------------------------------------------------

    def filter_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, event: CompressionEvent) -> Any:
        """Return the part of ``event.plan`` to apply (global rank 0 only; the result is broadcast). ``event.kind``
        says whose plan it is (``"structured_pruning"``: a list of channel groups)."""
        if type(self).filter_pruning_plan is not CompressionCallback.filter_pruning_plan \
                and event.kind == "structured_pruning":
            warnings.warn(f"{type(self).__name__}.filter_pruning_plan is deprecated and will be removed in the next "
                          "release; override filter_plan (check event.kind) instead.", FutureWarning, stacklevel=2)
            return self.filter_pruning_plan(trainer, pl_module, event)
        return event.plan

    def filter_pruning_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                            event: CompressionEvent) -> History:
        """Deprecated: override :meth:`filter_plan`."""
        return event.plan

    def on_before_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                              event: CompressionEvent) -> None:
        """The network is about to change (every rank)."""

    def on_after_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             event: CompressionEvent) -> None:
        """The network just changed (every rank); adapt this callback's own state."""

    # ---- shared plumbing -----------------------------------------------------------------------------------

    def network(self, pl_module: nn.Module) -> nn.Module:
        """The network this callback works on (``network_attribute``, or found automatically)."""
        return find_network(pl_module, self.network_attribute)

    def run_dir(self, trainer: pl.Trainer, name: str) -> Path:
        """``output_dir`` if given, else ``<logger's log_dir or default_root_dir>/<name>``."""
        if self.output_dir:
            return Path(self.output_dir)
        # not trainer.log_dir: that property broadcasts, and these folders are written on rank 0 only (a hang)
        logger = trainer.logger
        base = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
        return Path(base) / name

    # ---- checkpoints ---------------------------------------------------------------------------------------

    @property
    def state_key(self) -> str:
        # stable across hyperparameter changes: Lightning silently skips state whose key it does not find
        return type(self).__qualname__

    def hyperparameters(self) -> dict[str, Any]:
        """The constructor arguments (plain values only), stored next to the progress."""
        return dict(getattr(self, "_init_args", {}))

    def progress_state(self) -> dict[str, Any]:
        """What a resumed fit needs to continue (plain data and tensors)."""
        return {}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`progress_state` returned."""

    def take_renamed(self, old: str, new: str, old_value: Any, new_value: Any, default: Any) -> Any:
        """Take a deprecated argument spelling for one release: warn, and use its value unless ``new`` was given.
        The stored hyperparameters keep the value under ``new``."""
        owner = type(self).__name__
        value = new_value
        if old_value is not None:
            warnings.warn(f"{owner}({old}=...) is deprecated and will be removed in the next release; use {new}=... "
                          "instead.", FutureWarning, stacklevel=3)
            if new_value != default and new_value != old_value:
                raise ValueError(f"{owner} got both {old}={old_value!r} (deprecated) and {new}={new_value!r}; give "
                                 f"only {new}.")
            value = old_value
        args = getattr(self, "_init_args", None)
        if args is not None:
            args.pop(old, None)
            if _plain(value):
                args[new] = value
        return value

    def state_dict(self) -> dict[str, Any]:
        progress = self.progress_state()
        # a pure observer stores nothing, so resuming without it gives no "missing callback" warning
        return {"hyperparameters": self.hyperparameters(), **progress} if progress else {}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Take the state of a checkpoint written before the key was stable (``Name{'amount': 0.5, ...}``), so its
        progress is not silently lost. Lightning calls this right before ``load_state_dict``."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return
        legacy = [key for key in states if isinstance(key, str) and key.startswith(self.state_key + "{")]
        if len(legacy) == 1:
            states[self.state_key] = states[legacy[0]]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("hyperparameters")
        if saved is not None:
            current = self.hyperparameters()
            changed = {k: (saved[k], current[k]) for k in saved if k in current and saved[k] != current[k]}
            if changed:
                listing = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in sorted(changed.items()))
                rank_zero_warn(f"{type(self).__name__} resumes with changed hyperparameters ({listing}); its "
                               "progress is kept and the new values apply from here on.")
        self.load_progress_state({k: v for k, v in state_dict.items() if k != "hyperparameters"})


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain data (what a YAML recipe can hold)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


def compression_listeners(trainer: pl.Trainer) -> list[CompressionCallback]:
    return [c for c in trainer.callbacks if isinstance(c, CompressionCallback)]


def announce(trainer: pl.Trainer, pl_module: pl.LightningModule, event: CompressionEvent, moment: str) -> None:
    """Call every listener's ``on_<moment>_compression(trainer, pl_module, event)``; ``moment`` is ``"before"``
    or ``"after"``."""
    event._before = moment == "before"
    for callback in compression_listeners(trainer):
        getattr(callback, f"on_{moment}_compression")(trainer, pl_module, event)


def run_compression_step(trainer: pl.Trainer, pl_module: pl.LightningModule, event: CompressionEvent,
                         apply: Callable[[], nn.Module], undo: Callable[[], None], retrain: bool = True,
                         bn_batches: int = 0, bn_before: bool = False) -> None:
    """One producer step, the same for every technique: announce ``"before"``; ``apply()`` changes the network and
    returns the network now in place; every rank agrees that it worked before any of them goes on (a rank that
    failed would otherwise leave the others waiting in a collective); the BatchNorm statistics are re-estimated on
    ``bn_batches`` training batches (with ``bn_before``, those of the network before ``apply``, e.g. the float
    network a quantizer prepares); announce ``"after"``; with ``retrain``, rebuild the optimizers and re-wrap DDP.
    If anything fails, ``undo()`` puts the network back (with its old statistics) and the error propagates. The
    event's snapshot is dropped in every case."""
    label = f"{event.kind} step {event.step}"
    statistics = batchnorm_buffers(event.network) if bn_batches else None  # undo() may not cover the statistics
    try:
        if bn_before and bn_batches:
            event.batchnorm = reestimate_statistics(trainer, pl_module, event.network, bn_batches, label=label)
        announce(trainer, pl_module, event, "before")
        error = None
        try:
            event.network = apply()
        except Exception as err:  # noqa: BLE001 - raised below, once every rank knows
            error = err
        if not trainer.strategy.reduce_boolean_decision(error is None, all=True):
            raise error or RuntimeError(f"the {event.kind} step failed on another rank")
        if not bn_before and bn_batches:
            event.batchnorm = reestimate_statistics(trainer, pl_module, event.network, bn_batches, label=label)
        announce(trainer, pl_module, event, "after")
        if retrain:
            rebuild_optimizers(trainer)
            rewrap_ddp(trainer)
    except BaseException:
        undo()
        if statistics is not None:
            restore_batchnorm_buffers(statistics)
        raise
    finally:
        event._snapshot = None


def run_plan_filters(trainer: pl.Trainer, pl_module: pl.LightningModule, event: CompressionEvent) -> list:
    """Run every listener's plan filter in turn (each sees what the previous one kept); rank 0 only."""
    for callback in compression_listeners(trainer):
        kept = callback.filter_plan(trainer, pl_module, event)
        if kept is None or any(group not in event.plan for group in kept):
            raise ValueError(f"{type(callback).__name__}.filter_plan must return a subset of event.plan.")
        event.plan = list(kept)
    return event.plan


class CompressionProducer(CompressionCallback):
    """Base class of the callbacks that change the network's architecture (and of your own), the way Lightning's
    ``BaseFinetuning`` owns its hook wiring: a subclass declares

    - ``kind``: the stage kind it records (a unique string, e.g. ``"structured_pruning"``);
    - ``stage_applier``: ``apply(network, stage, applied)`` that brings a freshly built network to a recorded
      ``stage`` (in place, returning ``None``, or returning the module that replaces the network), as a static method
      or a ``"module:function"`` path. Defining the subclass registers it
      (:func:`lightning_segcompress.state.register_stage_applier`), so a checkpoint of this kind restores in any
      process that imported the subclass's module.

    The base class installs the checkpoint restore in ``setup`` (``trainer.fit/validate/test/predict(ckpt_path=...)``
    replay the stages before the weights load), removes it in ``teardown``, and writes the stages into every
    checkpoint. A subclass that overrides those hooks calls ``super()``. Its steps go through :meth:`compress`, which
    announces them to every listener, applies them atomically and re-estimates BatchNorm statistics.

    Example (a producer that halves every ``nn.Conv2d`` bias; see ``examples/third_party_producer.py``)::

        class HalveBiases(CompressionProducer):
            kind = "halve_biases"

            @staticmethod
            def stage_applier(network, stage, applied):
                ...  # rebuild the architecture the stage describes (weights load afterwards)

            def on_train_epoch_start(self, trainer, pl_module):
                if trainer.current_epoch == 1:
                    network = self.network(pl_module)
                    self.compress(trainer, pl_module, network, apply=..., undo=...)
    """

    kind: ClassVar[str | None] = None
    stage_applier: ClassVar[Callable | str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        applier = cls.__dict__.get("stage_applier")
        if applier is None:
            return
        if not cls.__dict__.get("kind"):
            raise TypeError(f"{cls.__name__} declares a stage_applier but no kind: set kind = '<unique name>'.")
        register_stage_applier(cls.kind, applier.__func__ if isinstance(applier, staticmethod) else applier)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        install_checkpoint_restore(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        remove_checkpoint_restore(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        write_to_checkpoint(checkpoint, pl_module, self.network_attribute)

    def record_stage(self, network: nn.Module, stage: dict[str, Any]) -> None:
        """Record ``stage`` (plain data) as this producer's latest stage on ``network``."""
        set_stage(network, {**stage, "kind": self.kind})

    def event(self, trainer: pl.Trainer, network: nn.Module, step: int = 1, plan: Any = None) -> CompressionEvent:
        """The :class:`CompressionEvent` of this producer's step ``step``."""
        return CompressionEvent(self.kind, step, network, trainer.current_epoch, trainer.global_step, plan=plan)

    def compress(self, trainer: pl.Trainer, pl_module: pl.LightningModule, network: nn.Module,
                 apply: Callable[[], nn.Module], undo: Callable[[], None], step: int = 1, plan: Any = None,
                 **options: Any) -> CompressionEvent:
        """Run one step through the protocol (:func:`run_compression_step`; ``options``: ``retrain``,
        ``bn_batches``, ``bn_before``) and return its event."""
        event = self.event(trainer, network, step, plan)
        run_compression_step(trainer, pl_module, event, apply, undo, **options)
        return event


def filter_plan(trainer: pl.Trainer, pl_module: pl.LightningModule, event: CompressionEvent) -> list:
    """Deprecated name of :func:`run_plan_filters`."""
    warnings.warn("protocol.filter_plan is deprecated; use run_plan_filters.", FutureWarning, stacklevel=2)
    return run_plan_filters(trainer, pl_module, event)

