"""QuantizationAwareTraining and PostTrainingQuantization: real int8 models from any LightningModule."""

from __future__ import annotations

import warnings
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from lightning_segcompress.callbacks._batchnorm import checked_bn_batches
from lightning_segcompress.callbacks._ddp import broadcast_from_rank_zero
from lightning_segcompress.callbacks._input_size import training_input_size
from lightning_segcompress.callbacks.protocol import CompressionProducer
from lightning_segcompress.quantization import (
    QuantizationConfig,
    QuantizationError,
    calibrate,
    convert_network,
    freeze_batchnorm,
    freeze_observers,
    prepare_network,
    quantization_stage,
    resolve_keep_float,
)
from lightning_segcompress.quantization.quantize import KIND
from lightning_segcompress.state import network_path, replace_network
from lightning_segcompress.utils.batch import split_batch
from lightning_segcompress.utils.inspection import select_modules
from lightning_segcompress.utils.shapes import FALLBACK_INPUT_SIZE, checked_input_size


class QuantizationCallback(CompressionProducer):
    """What :class:`QuantizationAwareTraining` and :class:`PostTrainingQuantization` share: preparing the network
    (a compression step of the protocol), converting it to int8, checkpoints, and logging the metric of the model
    that was converted. Subclasses set ``qat`` and decide when to prepare."""

    qat: bool
    pre_int8_label: str  # what the model measured during fit was

    kind = KIND
    stage_applier = "lightning_segcompress.quantization.state:apply_stage"

    def __init__(self, backend: str, engine: str, ignored_layers: list[str] | None, per_channel: bool,
                 input_size: list[int] | None, monitor: str, network_attribute: str | None,
                 bn_batches: int = 32, ignored_argument: str = "ignored_layers") -> None:
        self.bn_batches = checked_bn_batches(bn_batches, type(self).__name__)
        # None: the training batches' size, read when the network is prepared (the config's example until then)
        self.input_size = checked_input_size(input_size)
        self.config = QuantizationConfig(backend=backend, engine=engine, qat=self.qat, per_channel=per_channel,
                                         example_shape=(2, 3, *(self.input_size or FALLBACK_INPUT_SIZE)))
        if isinstance(ignored_layers, str):
            ignored_layers = [ignored_layers]
        self.ignored_patterns = list(ignored_layers or [])
        self._ignored_argument = ignored_argument  # the spelling errors name: the one the user gave
        self.monitor = monitor
        self.network_attribute = network_attribute
        self.pre_int8_metric: float | None = None  # last validation ``monitor`` before conversion
        self._announced = False  # the int8-on-CPU policy was logged

    # ---- Lightning hooks -------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        network = self.network(pl_module)
        if quantization_stage(network) is None:  # names refer to the float network
            select_modules(network, self.ignored_patterns, self._ignored_argument, QuantizationError)
            keep_float = resolve_keep_float(network, self.ignored_patterns)
            self.config = QuantizationConfig.from_dict({**self.config.as_dict(), "keep_float": keep_float})
        super().setup(trainer, pl_module, stage)

    @property
    def keep_float_patterns(self) -> list[str]:
        """Deprecated name of :attr:`ignored_patterns`."""
        warnings.warn(f"{type(self).__name__}.keep_float_patterns is deprecated and will be removed in the next "
                      "release; read ignored_patterns.", FutureWarning, stacklevel=2)
        return self.ignored_patterns

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage(pl_module)
        if trainer.state.fn == TrainerFn.FITTING and self._measures_model_to_convert(stage):
            value = trainer.callback_metrics.get(self.monitor)
            self.pre_int8_metric = None if value is None else float(value)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.convert(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.convert(trainer, pl_module)  # when no training ran (e.g. max_epochs reached already)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != TrainerFn.FITTING:
            self.convert(trainer, pl_module)
            self._announce_if_int8(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.convert(trainer, pl_module)
        self._announce_if_int8(trainer, pl_module)

    def _announce_if_int8(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage(pl_module)
        if stage is not None and stage["converted"]:  # converted here, at fit end, or restored from a checkpoint
            self._announce_int8_device(trainer)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_pre_int8_metric(trainer, pl_module)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_pre_int8_metric(trainer, pl_module)

    def progress_state(self) -> dict[str, Any]:
        return {"pre_int8_metric": self.pre_int8_metric}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self.pre_int8_metric = state.get("pre_int8_metric")

    # ---- the steps -------------------------------------------------------------------------------------

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Trace the network and insert fake quantization (observers for PTQ), announced as a compression step;
        on failure the module keeps its float network (the error names the module and the fix)."""
        network = self.network(pl_module)
        path = network_path(pl_module, network)
        if self.input_size is None:  # every rank prepares together
            self.input_size = training_input_size(trainer, pl_module, type(self).__name__)
            self.config = QuantizationConfig.from_dict({**self.config.as_dict(),
                                                        "example_shape": [2, 3, *self.input_size]})
        def apply() -> nn.Module:
            prepared = prepare_network(network, self.config)  # raises before anything was replaced
            replace_network(pl_module, path, prepared)
            return prepared

        self.compress(trainer, pl_module, network, apply, lambda: replace_network(pl_module, path, network),
                      retrain=self.qat, bn_batches=self.bn_batches, bn_before=True)
        rank_zero_info(f"{type(self).__name__}: {type(network).__name__} prepared for "
                       f"{'QAT' if self.qat else 'calibration'} ({self.config.backend}) at epoch "
                       f"{trainer.current_epoch}.")

    def convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Replace a prepared network by its int8 conversion (no-op when there is none or it is int8)."""
        stage = self._stage(pl_module)
        if stage is None or stage["converted"]:
            return
        prepared = self.network(pl_module)
        # every DDP rank converts rank 0's ranges, scales and BN statistics
        broadcast_from_rank_zero(prepared.buffers())
        converted = convert_network(prepared)  # a CPU int8 network, pinned there (see pin_to_cpu)
        replace_network(pl_module, network_path(pl_module, prepared), converted)
        self._announce_int8_device(trainer)

    def _announce_int8_device(self, trainer: pl.Trainer) -> None:
        """Say once where the int8 network runs when the trainer is not on the CPU: validate/test run it there."""
        device = trainer.strategy.root_device
        if device.type == "cpu" or self._announced:
            return
        self._announced = True
        rank_zero_info(f"{type(self).__name__}: the int8 network stays on the CPU (int8 kernels are CPU kernels); "
                       f"validate/test on {device} run it there in float32 without autocast (inputs moved to the "
                       f"CPU, outputs back to {device}); the rest of the LightningModule stays on {device}. "
                       "Checkpoints and exports hold the int8 network itself.")

    def _measures_model_to_convert(self, stage: dict | None) -> bool:
        """Whether a validation during fit, with the network at ``stage``, measured what will become int8."""
        raise NotImplementedError

    def _stage(self, pl_module: pl.LightningModule) -> dict | None:
        return quantization_stage(self.network(pl_module))

    def _log_pre_int8_metric(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        stage = self._stage(pl_module)
        if trainer.state.fn != TrainerFn.FITTING and stage and stage["converted"] and \
                self.pre_int8_metric is not None:
            pl_module.log(f"quant/{self.pre_int8_label}_{self.monitor}", self.pre_int8_metric)


class QuantizationAwareTraining(QuantizationCallback):
    """Train with fake quantization from ``start_epoch`` and end the fit with a real int8 network.

    At ``start_epoch`` the network is traced and prepared (FX: torch.ao ``prepare_qat_fx``; PT2E: torch.export
    with a dynamic batch + torchao ``prepare_qat_pt2e`` with the XNNPACK quantizer), put back where it was in
    the LightningModule, and the optimizers are rebuilt. BN statistics and observers freeze at the given
    epochs. When training ends the network is replaced by its int8 conversion, so ``validate``/``test`` after
    ``fit`` and a :class:`DeviceBenchmark` listed after this callback measure the int8 model; the fake-quant
    model's last ``monitor`` value is logged next to it as ``quant/fake_quant_<monitor>``.

    Checkpoints store the quantization configuration as plain data; a resumed fit, ``test(ckpt_path=...)``,
    ``SegmentationModule.load_from_checkpoint`` and :func:`lightning_segcompress.load_compressed` prepare the
    network again before its weights load. ``validate``/``test`` with this callback convert a restored
    fake-quant network to int8 first.

    GPU and mixed precision: the fake-quant network trains on the trainer's device; under ``16-mixed`` /
    ``bf16-mixed`` it runs in float32 with autocast off (fake quantization and observers take float32), the rest of
    the step keeps autocast. Conversion runs on a CPU copy, and the int8 network stays on the CPU for good: on a
    GPU trainer ``validate``/``test`` run it on the CPU (inputs moved there, outputs back; logged once), while the
    rest of the LightningModule stays on the GPU.

    Args:
        backend: ``"pt2e"`` (default: torch.export + torchao PT2E with the XNNPACK quantizer; int8 on ExecuTorch,
            needs executorch) or ``"fx"`` (legacy: torch.ao FX int8 modules for eager and the TorchScript lite
            interpreter, CPU; torch.ao FX quantization and TorchScript are deprecated upstream).
        engine: FX quantized engine, ``"x86"`` (fast on x86 CPUs) or ``"qnnpack"`` (ARM); ignored by pt2e.
        start_epoch: the epoch at which fake quantization starts (e.g. after pruning finished).
        freeze_bn_epoch: from this epoch on, BN running statistics stop updating (None: never).
        freeze_observer_epoch: from this epoch on, quantization ranges stay fixed (None: never); after
            ``start_epoch``, so that the observers see data first.
        ignored_layers: module names (or regexes, full match) left alone: kept in float; with FX they are not
            traced either, which is the fix for modules torch.fx cannot trace.
        per_channel: per-channel weight scales (PT2E/XNNPACK).
        input_size: ``[H, W]`` of the example used for tracing; ``None`` (default): the size of the fit's training
            batches (read when the network is prepared).
        monitor: validation metric reported for the fake-quant model next to the int8 one.
        network_attribute: attribute path of the network in the LightningModule (default: found).
        bn_batches: training batches on which the float network's BatchNorm statistics are re-estimated right
            before it is prepared (e.g. after pruning or a shunt changed it), so fake quantization starts from
            statistics of this network; 0 disables.
        keep_float: deprecated spelling of ``ignored_layers``.

    Example::

        trainer = Trainer(max_epochs=12, callbacks=[
            StructuredPruning(amount=0.5, schedule="agp", start_epoch=1, end_epoch=4, steps=3),
            QuantizationAwareTraining(start_epoch=6, freeze_bn_epoch=10, freeze_observer_epoch=11),
            DeviceBenchmark(runtimes=["executorch"])])
    """

    qat = True
    pre_int8_label = "fake_quant"  # what the model measured during fit was

    def __init__(
        self,
        backend: str = "pt2e",
        engine: str = "x86",
        start_epoch: int = 0,
        freeze_bn_epoch: int | None = None,
        freeze_observer_epoch: int | None = None,
        ignored_layers: list[str] | None = None,
        per_channel: bool = True,
        input_size: list[int] | None = None,
        monitor: str = "val_miou",
        network_attribute: str | None = None,
        bn_batches: int = 32,
        keep_float: list[str] | None = None,
    ) -> None:
        argument = "keep_float" if keep_float is not None else "ignored_layers"
        ignored_layers = self.take_renamed("keep_float", "ignored_layers", keep_float, ignored_layers, None)
        if start_epoch < 0:
            raise ValueError(f"start_epoch must be >= 0, got {start_epoch}.")
        for name, epoch in (("freeze_bn_epoch", freeze_bn_epoch), ("freeze_observer_epoch", freeze_observer_epoch)):
            if epoch is not None and epoch < start_epoch:
                raise ValueError(f"{name} ({epoch}) must not come before start_epoch ({start_epoch}).")
        if freeze_observer_epoch is not None and freeze_observer_epoch == start_epoch:
            raise ValueError(f"freeze_observer_epoch ({freeze_observer_epoch}) equals start_epoch: the observers would "
                             "be frozen before they saw any data. Set it to a later epoch, or null.")
        super().__init__(backend, engine, ignored_layers, per_channel, input_size, monitor, network_attribute,
                         bn_batches, argument)
        self.start_epoch = start_epoch
        self.freeze_bn_epoch = freeze_bn_epoch
        self.freeze_observer_epoch = freeze_observer_epoch

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch >= self.start_epoch and self._stage(pl_module) is None:
            self.prepare(trainer, pl_module)
        network = self.network(pl_module)
        if quantization_stage(network) is None:
            return
        if self.freeze_bn_epoch is not None and epoch >= self.freeze_bn_epoch:
            freeze_batchnorm(network)
        if self.freeze_observer_epoch is not None and epoch >= self.freeze_observer_epoch:
            freeze_observers(network)

    def _measures_model_to_convert(self, stage: dict | None) -> bool:
        return stage is not None and not stage["converted"]  # the fake-quant network


class PostTrainingQuantization(QuantizationCallback):
    """Post-training int8: when ``fit`` ends, observe ``calibration_batches`` training batches (eval mode, no
    gradients) and convert, without any quantization-aware training.

    With ``max_epochs`` already reached (or ``max_epochs=0``) no training runs and only calibration does, e.g.
    ``segcompress fit --config trained.yaml --ckpt_path last.ckpt`` with this callback appended. Arguments as
    :class:`QuantizationAwareTraining`, without the training schedule (``ignored_layers`` left in float, ``keep_float``
    its deprecated spelling; ``input_size=None``: the training batches' size); ``bn_batches`` re-estimates the
    BatchNorm statistics before calibration.

    Example::

        trainer = Trainer(max_epochs=0, callbacks=[PostTrainingQuantization(calibration_batches=16)])
        trainer.fit(model, datamodule)      # model now holds the int8 network
    """

    qat = False
    pre_int8_label = "float"

    def __init__(self, backend: str = "pt2e", engine: str = "x86", calibration_batches: int = 16,
                 ignored_layers: list[str] | None = None, per_channel: bool = True,
                 input_size: list[int] | None = None, monitor: str = "val_miou", network_attribute: str | None = None,
                 bn_batches: int = 32, keep_float: list[str] | None = None) -> None:
        argument = "keep_float" if keep_float is not None else "ignored_layers"
        ignored_layers = self.take_renamed("keep_float", "ignored_layers", keep_float, ignored_layers, None)
        if calibration_batches <= 0:
            raise ValueError(f"calibration_batches must be positive, got {calibration_batches}.")
        super().__init__(backend, engine, ignored_layers, per_channel, input_size, monitor, network_attribute,
                         bn_batches, argument)
        self.calibration_batches = calibration_batches

    def _measures_model_to_convert(self, stage: dict | None) -> bool:
        return stage is None  # the float network, calibrated and converted at fit end

    def convert(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._stage(pl_module) is None:
            self.prepare(trainer, pl_module)
            loader = trainer.train_dataloader
            if loader is None:
                trainer.fit_loop.setup_data()
                loader = trainer.train_dataloader
            images = (split_batch(batch)[0] for batch in loader)
            used = calibrate(self.network(pl_module), images, self.calibration_batches)
            rank_zero_info(f"PostTrainingQuantization: calibrated on {used} batches.")
        super().convert(trainer, pl_module)
