"""DeviceBenchmark: measure the network on on-device runtimes before and after compression, in one run."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from lightning_segcompress.benchmark import (
    BenchmarkSettings,
    benchmark_network,
    benchmark_tiled,
    markdown_table,
    memory_table,
    write_report,
)
from lightning_segcompress.benchmark.accuracy import EvalSet
from lightning_segcompress.benchmark.compression_report import (
    add_accuracy_statistics,
    check_bootstrap_resamples,
    compression_table,
    conv_widths,
    predicted_classes,
    samples_figure,
    write_report_with_figures,
)
from lightning_segcompress.benchmark.report import add_stage, flat_metrics
from lightning_segcompress.benchmark.runner import TilingSettings
from lightning_segcompress.callbacks._input_size import training_input_size
from lightning_segcompress.callbacks._validation import labelled_validation_batches
from lightning_segcompress.callbacks.protocol import CompressionCallback, CompressionEvent
from lightning_segcompress.export.bundle import (
    RUNTIME_SUFFIXES,
    bundle_from_report,
    data_normalization,
    metadata_path,
    write_bundle,
)
from lightning_segcompress.quantization.quantize import quantization_stage
from lightning_segcompress.state import get_stages
from lightning_segcompress.utils.inspection import has_int8_modules
from lightning_segcompress.utils.shapes import input_shape
from lightning_segcompress.utils.statistics import miou_from_confusion, per_image_confusion

ARTIFACT_RUNTIMES = tuple(RUNTIME_SUFFIXES)  # the runtimes with a file to ship (not eager)


class DeviceBenchmark(CompressionCallback):
    """Export the network to TorchScript mobile (lite interpreter) and ExecuTorch, check the outputs, and
    measure latency (median, p90), file size, params, MACs and peak memory — at fit start (the baseline)
    and at fit end (the compressed model), reporting speedup, size ratio, MACs ratio and efficiency
    (speedup / MACs ratio) against the baseline measured in the same run.

    The memory section plans the activations of each stage (naive sum, planned arena, lower bound, int8 arena)
    and measures eager PyTorch's peak; with ``tile_grids`` every stage is measured again under
    :class:`~lightning_segcompress.memory.TiledInference` (stage ``<stage>_tiled_<rows>x<cols>``), after
    checking that tiled and untiled outputs agree within ``atol``.

    With ``per_technique`` a stage is also measured each time one compression technique hands over to the next
    (``after_<kind>``, e.g. ``after_structured_pruning`` right before quantization-aware training starts), and
    the baseline's accuracy is taken right before the first compression step, when it is trained. These are
    observers of the compression protocol: they measure the live network in ``on_before_compression`` (rank 0,
    outside the technique's atomic step, without keeping a copy of the network). Each stage is scored on the
    validation data (``val mIoU``, the same ``eval_batches`` every time); its per-image confusion matrices are
    kept (``confusions``, ``num_images x C x C`` ints per stage) for the mIoU change's paired-bootstrap interval
    against the baseline and the IoU per class.

    Results go to ``benchmark.json`` and ``benchmark.md`` in ``output_dir``, to the trainer's loggers
    (``benchmark/<stage>/<runtime>/<metric>``) and to stdout. At fit end, ``report`` writes the compression
    report there: ``compression_report.md`` / ``.html`` / ``.json`` (one row per stage: val mIoU, its change
    against the baseline with a 95 % paired-bootstrap interval over the validation images and a verdict, params,
    MACs, latency, file size and ratios per runtime, planned activation memory; a table of IoU per class and
    stage) and PNGs (mIoU vs latency, mIoU vs size, channels
    per layer, sample predictions: image, ground truth, before compression, final); with a TensorBoard logger the same
    figures go to TensorBoard (``compression/<name>``). An export or timing failure is recorded in the
    report, never raised: it cannot crash or lose a training run. Only global rank 0 measures.

    With ``profile`` each stage and runtime also gets its time per operator (eager and TorchScript lite:
    ``torch.profiler``; ExecuTorch: ETDump with XNNPACK's per-operator times inside the delegate), measured in
    separate runs after the timed ones: ``benchmark.md`` and the compression report show the 10 most expensive ops,
    the ops ExecuTorch left out of the XNNPACK delegate and, for int8 stages, the float islands (ops still computing
    in float); the full lists are in ``benchmark.json`` (``runtimes.<runtime>.profile``). With ``exported_miou``
    the exported files of every untiled stage are scored too: the same ``eval_batches`` validation images, fitted
    to ``input_size`` (bilinear resize where they differ), run through the ``.ptl`` / ``.pte`` itself (in the
    isolated worker with ``isolate``) and through eager; both val mIoUs and their gap go to the reports
    (``Exported-file accuracy``) and the loggers (``benchmark/<stage>/<runtime>/file_miou``,
    ``.../miou_gap_points``), and a gap beyond ``max_miou_gap`` points is flagged and warned about. The int8
    class-agreement check on one input stays as the quick gate.

    Args:
        input_size: ``[H, W]`` of the benchmark input (as everywhere in this package; ``[N, C, H, W]`` is a
            deprecated spelling). The default ``[512, 512]`` is a deployment size, not the training batches': a
            benchmark measures what the deployed model will be fed, and its results stay comparable between runs and
            recipes whatever the training crops. ``None``: the size of the fit's training batches, as in the other
            callbacks (read at fit start).
        batch_size: batch size of the benchmark input.
        runtimes: any of ``"eager"``, ``"torchscript_lite"``, ``"executorch"``, ``"onnxruntime"`` (alias
            ``"onnx"``) or a runtime registered with
            :func:`~lightning_segcompress.benchmark.runtimes.register_runtime` (skipped, with the reason recorded,
            where its package is not installed).
        threads: CPU threads for timing; ``None`` keeps torch's default.
        warmup: untimed calls before timing.
        runs: timed calls; the median and 90th percentile are reported.
        output_dir: where exported models and reports go; default ``<trainer.log_dir or
            default_root_dir>/benchmark``.
        on_fit_start: measure the baseline when fit starts.
        on_fit_end: measure the final model when fit ends and compare it with the baseline.
        every_n_epochs: also measure after every N training epochs (0 = never).
        network_attribute: attribute path of the network in the LightningModule (default: found
            automatically, see ``find_network``).
        atol: largest accepted absolute difference between a runtime's output and eager (int8 networks,
            whose kernels round differently: at least 85 % of the pixels must get eager's class instead).
        isolate: time exported models in a fresh subprocess per runtime (clean peak memory).
        memory: plan and measure activation memory for every stage.
        tile_grids: also measure tiled inference with these ``[rows, columns]`` grids, e.g. ``[[2, 2], [4, 4]]``.
        split_after: end the tiled prefix after this module (default: before the first non-local op).
        tile_tail: also tile the local ops after the last non-local op (decoder, final upsampling).
        tile_max_stride: tile only maps downsampled at most this many times (``None``: no limit).
        per_technique: also measure the network as each compression technique leaves it.
        eval_batches: validation batches each stage is scored on (``None``: all; ``0``: no accuracy).
        bootstrap_resamples: resamples of the paired bootstrap over validation images behind the mIoU change's
            95 % interval (``0``: no interval; else at least 100; seed 0, so the report is reproducible).
        report: write the compression report (Markdown, HTML, PNGs) at fit end.
        samples: images in the report's sample-prediction grid.
        ignore_index: label ignored by the mIoU and shown black in the samples.
        profile: record the time per operator of every stage and runtime (separate runs after the timed ones).
        exported_miou: also score the val mIoU of each exported file, run by its own runtime, on the
            ``eval_batches`` validation images (fitted to ``input_size``) against eager's on the same inputs.
        max_miou_gap: largest gap (points) between an exported file's val mIoU and eager's that is not flagged.
        save_artifact: after the final benchmark (fit end), write the final network's deployable bundle, the same
            files as ``segcompress export``, for each exported runtime: ``<output_dir>/artifact/executorch/model.pte``
            and ``<output_dir>/artifact/torchscript_lite/model.ptl``, each with its ``model.json`` (classes, input
            size, normalization, stages, int8 or not, latency and val mIoU of the file; see
            :func:`~lightning_segcompress.export.write_bundle`). The final stage's files and measurements are reused;
            a quantization-prepared (fake-quant) network is converted to int8 on a copy and exported again. A
            failure is warned about, never raised.
        tolerance: deprecated spelling of ``atol``.

    Example::

        trainer = Trainer(callbacks=[DeviceBenchmark(input_size=[512, 512], threads=2)])

    or in YAML::

        trainer:
          callbacks:
            - class_path: lightning_segcompress.callbacks.DeviceBenchmark
              init_args: {input_size: [512, 512], runtimes: [eager, torchscript_lite], threads: 2}
    """

    def __init__(
        self,
        input_size: list[int] | tuple[int, ...] | None = (512, 512),
        batch_size: int = 1,
        runtimes: list[str] | tuple[str, ...] = ("eager", "torchscript_lite", "executorch"),
        threads: int | None = None,
        warmup: int = 3,
        runs: int = 10,
        output_dir: str | None = None,
        on_fit_start: bool = True,
        on_fit_end: bool = True,
        every_n_epochs: int = 0,
        network_attribute: str | None = None,
        atol: float = 1e-3,
        isolate: bool = True,
        memory: bool = True,
        tile_grids: list[list[int]] | None = None,
        split_after: str | None = None,
        tile_tail: bool = True,
        tile_max_stride: int | None = 8,
        per_technique: bool = True,
        eval_batches: int | None = None,
        bootstrap_resamples: int = 1000,
        report: bool = True,
        samples: int = 4,
        ignore_index: int = 255,
        profile: bool = True,
        exported_miou: bool = True,
        max_miou_gap: float = 0.2,
        save_artifact: bool = False,
        tolerance: float | None = None,
    ) -> None:
        atol = self.take_renamed("tolerance", "atol", tolerance, atol, 1e-3)
        if isinstance(runtimes, str):
            runtimes = [runtimes]
        self._size_from_batches = input_size is None  # resolved at fit start; the default's shape until then
        self.settings = BenchmarkSettings(
            input_shape=input_shape((512, 512) if input_size is None else input_size, batch_size,
                                    owner="DeviceBenchmark"), runtimes=tuple(runtimes),
            threads=threads, warmup=warmup, runs=runs, tolerance=atol, isolate=isolate, memory=memory,
            profile=profile, max_miou_gap=max_miou_gap,
        )
        self.tiling = TilingSettings(tile_grids or (), split_after, tile_tail, tile_max_stride)
        if every_n_epochs < 0:
            raise ValueError(f"every_n_epochs must be >= 0 (0 = never), got {every_n_epochs}.")
        self.output_dir = output_dir
        self.measure_at_fit_start = on_fit_start
        self.measure_at_fit_end = on_fit_end
        self.every_n_epochs = every_n_epochs
        if eval_batches is not None and eval_batches < 0:
            raise ValueError(f"eval_batches must be >= 0 (0 = no accuracy, None = all), got {eval_batches}.")
        check_bootstrap_resamples(bootstrap_resamples)
        if samples < 0:
            raise ValueError(f"samples must be >= 0, got {samples}.")
        self.network_attribute = network_attribute
        self.per_technique = per_technique
        self.eval_batches = eval_batches
        self.bootstrap_resamples = bootstrap_resamples
        self.write_compression_report = report
        self.samples = samples
        self.ignore_index = ignore_index
        self.exported_miou = exported_miou
        if not isinstance(save_artifact, bool):
            raise ValueError(f"save_artifact must be true or false, got {save_artifact!r}.")
        if save_artifact and not any(r in ARTIFACT_RUNTIMES for r in self.settings.runtimes):
            raise ValueError(f"save_artifact needs an exported runtime in runtimes ({list(ARTIFACT_RUNTIMES)}), got "
                             f"{list(self.settings.runtimes)}.")
        self.save_artifact = save_artifact
        self.stages: dict[str, dict] = {}
        self.confusions: dict[str, torch.Tensor] = {}  # per stage: per-image confusion matrices [N, C, C]
        self.technique: str | None = None  # the compression technique at work now
        self._reference_predictions: torch.Tensor | None = None  # samples' classes before compression

    @property
    def baseline(self) -> dict | None:
        content = self.stages.get("baseline")
        return content["report"] if content else None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._size_from_batches:  # every rank, before anything is measured (on rank 0 alone)
            self._take_input_size(trainer, pl_module)
        if self.measure_at_fit_start and "baseline" not in self.stages:  # a resumed run keeps its baseline
            self.measure(trainer, pl_module, "baseline")

    def _take_input_size(self, trainer: pl.Trainer, pl_module: pl.LightningModule, synchronize: bool = True) -> None:
        """``input_size=None``: measure at the fit's training batches' ``[H, W]`` ([512, 512] where it has none)."""
        size = training_input_size(trainer, pl_module, "DeviceBenchmark", default=(512, 512), synchronize=synchronize)
        n, c = self.settings.input_shape[:2]
        self.settings = dataclasses.replace(self.settings, input_shape=(n, c, *size))
        self._size_from_batches = False

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure(trainer, pl_module, f"epoch_{trainer.current_epoch}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.measure_at_fit_end:
            self.measure(trainer, pl_module, "final")
        if self.save_artifact and trainer.is_global_zero:
            self.write_artifacts(trainer, pl_module)
        if self.write_compression_report and trainer.is_global_zero and self.stages:
            self.write_compression_report_files(trainer, pl_module)

    def on_before_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                              event: CompressionEvent) -> None:
        """A new technique is about to take its first step: measure the network as the previous one left it."""
        if not self.per_technique or event.kind == self.technique:
            return
        finished, self.technique = self.technique, event.kind
        if not trainer.is_global_zero:
            return
        with torch.random.fork_rng(devices=[]):  # measuring must not change the training's random stream
            if finished is None:
                self._reference_predictions = self._sample_predictions(trainer, event.network)
                if "baseline" in self.stages:  # measured at fit start: same architecture, now trained
                    self.stages["baseline"]["miou"] = self._score(trainer, "baseline", event.network)
                    add_accuracy_statistics(self.stages, self.confusions, self.bootstrap_resamples, self.ignore_index)
                    return
            self.measure(trainer, pl_module, "baseline" if finished is None else f"after_{finished}",
                         network=event.network)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str,
                network: torch.nn.Module | None = None) -> dict | None:
        """Benchmark ``network`` (default: the module's network now) as ``stage`` (and tiled, per
        ``tile_grids``) and score it on the validation data; returns the report (None on other ranks)."""
        if not trainer.is_global_zero:
            return None
        if self._size_from_batches:  # measured outside a fit's start (rank 0 alone here)
            self._take_input_size(trainer, pl_module, synchronize=False)
        output_dir = self.run_dir(trainer, "benchmark")
        network = network if network is not None else self.network(pl_module)
        batches = self._validation_batches(trainer)
        evaluation = self._evaluation_set(stage, batches) if self.exported_miou and batches else None
        report = self._record(trainer, stage, benchmark_network, network, self.settings, output_dir / stage,
                              evaluation=evaluation)
        miou = self._score(trainer, stage, network, batches)
        self.stages[stage].update(miou=miou, channels=conv_widths(network),
                                  techniques=[s["kind"] for s in get_stages(network)])
        if miou is not None:
            for logger in trainer.loggers:
                logger.log_metrics({f"benchmark/{stage}/val_miou": miou}, step=trainer.global_step)
        add_accuracy_statistics(self.stages, self.confusions, self.bootstrap_resamples, self.ignore_index)
        tile_grids = () if has_int8_modules(network) else self.tiling.grids  # int8 FX modules cannot be traced
        for rows, cols in tile_grids:
            name = f"{stage}_tiled_{rows}x{cols}"
            self._record(trainer, name, benchmark_tiled, network, (rows, cols), self.settings, output_dir / name,
                         **self.tiling.options())
        write_report(output_dir, self.stages, self.settings.as_dict())
        rank_zero_info(f"\nDeviceBenchmark ({output_dir}):\n{markdown_table(self.stages)}\n\n"
                       f"{memory_table(self.stages)}\n")
        return report

    def write_artifacts(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, dict]:
        """The final network's bundle (file + ``model.json``) per exported runtime under ``<output_dir>/artifact``;
        returns the metadata per runtime written (failures are warned about and left out)."""
        if self._size_from_batches:  # rank 0 alone here
            self._take_input_size(trainer, pl_module, synchronize=False)
        output_dir = self.run_dir(trainer, "benchmark")
        network = self.network(pl_module)
        datamodule = getattr(trainer, "datamodule", None)
        names = getattr(datamodule, "class_names", None)
        options = {"class_names": list(names) if names is not None else None,
                   "normalization": data_normalization(datamodule) if datamodule is not None else None,
                   "threads": self.settings.threads}
        final = (self.stages.get("final") or {}).get("report") or {}
        stage = quantization_stage(network)
        reuse = self.measure_at_fit_end and bool(final) and (stage is None or stage["converted"])
        evaluation = None
        if not reuse and self.exported_miou:
            batches = self._validation_batches(trainer)
            evaluation = self._evaluation_set("artifact", batches) if batches else None
        written = {}
        for runtime in (r for r in self.settings.runtimes if r in ARTIFACT_RUNTIMES):
            output = output_dir / "artifact" / runtime / f"model{RUNTIME_SUFFIXES[runtime]}"
            try:
                if reuse:
                    written[runtime] = bundle_from_report(network, final, runtime,
                                                          output_dir / "final" / f"model{RUNTIME_SUFFIXES[runtime]}",
                                                          output, **options)
                else:
                    written[runtime] = write_bundle(
                        network, runtime, self.settings.input_shape[2:], output,
                        batch_size=self.settings.input_shape[0], evaluation=evaluation, warmup=self.settings.warmup,
                        runs=self.settings.runs, atol=self.settings.tolerance, isolate=self.settings.isolate,
                        **options)
            except Exception as err:  # noqa: BLE001 - never lose a training run to an export
                rank_zero_warn(f"DeviceBenchmark could not save the {runtime} artifact: {type(err).__name__}: {err}")
                continue
            rank_zero_info(f"DeviceBenchmark: {runtime} artifact written to {output} and {metadata_path(output)} "
                           f"({'int8' if written[runtime]['int8'] else 'float32'}).")
        return written

    def _record(self, trainer: pl.Trainer, stage: str, run, *args, **kwargs) -> dict:
        try:
            report = run(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - never lose a training run to a benchmark
            report = {"error": {"type": type(err).__name__, "message": str(err)[:500]}, "runtimes": {}}
            rank_zero_warn(f"DeviceBenchmark could not measure stage {stage!r}: {type(err).__name__}: {err}")
        ratios = add_stage(self.stages, stage, report)
        if report.get("accuracy_error"):
            rank_zero_warn(f"DeviceBenchmark {stage}: the exported files were not scored: eager failed on the "
                           f"validation images: {report['accuracy_error']['type']}: "
                           f"{report['accuracy_error']['message']}")
        failed = {**report.get("runtimes", {}), "memory": report.get("memory") or {}}
        for part, entry in failed.items():
            if entry.get("status") == "error":
                rank_zero_warn(f"DeviceBenchmark {stage}/{part} failed: {entry['error']['type']}: "
                               f"{entry['error']['message']}")
            accuracy = entry.get("accuracy") or {}
            if accuracy.get("flagged"):
                rank_zero_warn(f"DeviceBenchmark {stage}/{part}: the exported file scores val mIoU "
                               f"{accuracy['miou']:.4f} but eager {accuracy['eager_miou']:.4f} on the same "
                               f"{accuracy['images']} images: a gap of {accuracy['gap_points']:+.2f} points (more "
                               f"than max_miou_gap {accuracy['max_gap_points']:g}).")
            elif accuracy.get("status") == "error":
                rank_zero_warn(f"DeviceBenchmark {stage}/{part}: the exported file could not be scored: "
                               f"{accuracy['error'].get('type')}: {accuracy['error'].get('message')}")
        for logger in trainer.loggers:
            logger.log_metrics(flat_metrics(stage, report, ratios), step=trainer.global_step)
        return report

    def _evaluation_set(self, stage: str, batches: list) -> EvalSet | None:
        """The validation images fitted to the benchmark input, for scoring the exported files (None on failure,
        warned about: it must not stop the benchmark)."""
        try:
            return EvalSet.from_batches(batches, self.settings.input_shape, self.ignore_index)
        except Exception as err:  # noqa: BLE001
            rank_zero_warn(f"DeviceBenchmark {stage}: the exported files cannot be scored: {type(err).__name__}: "
                           f"{err}")
            return None

    def _validation_batches(self, trainer: pl.Trainer) -> list:
        """The first ``eval_batches`` labelled validation batches ([] with ``eval_batches=0`` or without labels)."""
        return [] if self.eval_batches == 0 else labelled_validation_batches(trainer, self.eval_batches)

    def _score(self, trainer: pl.Trainer, stage: str, network: torch.nn.Module,
               batches: list | None = None) -> float | None:
        """Validation mIoU of ``network`` on the first ``eval_batches`` batches (None without labelled data), from
        its per-image confusion matrices, which are kept as ``confusions[stage]``."""
        self.confusions.pop(stage, None)
        if self.eval_batches == 0:
            return None
        batches = self._validation_batches(trainer) if batches is None else batches
        if not batches:
            return None
        confusion = per_image_confusion(network, batches, ignore_index=self.ignore_index)
        self.confusions[stage] = confusion
        return miou_from_confusion(confusion, self.ignore_index)

    def write_compression_report_files(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Write the compression report and its figures to ``output_dir`` (and TensorBoard); returns the paths."""
        def to_tensorboard(name: str, figure) -> None:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_figure(f"compression/{name}", figure, global_step=trainer.global_step,
                                                 close=False)

        samples = self._samples_figure(trainer, pl_module) if self.samples else None
        class_names = getattr(getattr(trainer, "datamodule", None), "class_names", None)
        paths = write_report_with_figures(self.run_dir(trainer, "benchmark"), self.stages, self.settings.as_dict(),
                                          class_names, samples, on_figure=to_tensorboard)
        rank_zero_info(f"\nCompression report ({paths['markdown']}):\n{compression_table(self.stages)}\n")
        return paths

    def _sample_images(self, trainer: pl.Trainer) -> tuple[torch.Tensor, torch.Tensor] | None:
        batches = labelled_validation_batches(trainer, self.samples)  # every batch holds at least one image
        if not batches:
            return None
        return torch.cat([b[0] for b in batches])[:self.samples], torch.cat([b[1] for b in batches])[:self.samples]

    def _sample_predictions(self, trainer: pl.Trainer, network: torch.nn.Module) -> torch.Tensor | None:
        samples = self._sample_images(trainer) if self.samples and self.write_compression_report else None
        return None if samples is None else predicted_classes(network, samples[0])

    def _samples_figure(self, trainer: pl.Trainer, pl_module: pl.LightningModule):
        samples = self._sample_images(trainer)
        if samples is None:
            return None
        images, masks = samples
        predictions = {}
        if self._reference_predictions is not None:
            predictions["before compression"] = self._reference_predictions
        predictions["final"] = predicted_classes(self.network(pl_module), images)
        return samples_figure(images, masks, predictions, ignore_index=self.ignore_index)

    def progress_state(self) -> dict[str, Any]:
        return {"stages": self.stages, "technique": self.technique, "confusions": self.confusions}

    def load_progress_state(self, state: dict[str, Any]) -> None:
        self.stages = dict(state.get("stages", {}))
        self.technique = state.get("technique")
        self.confusions = dict(state.get("confusions", {}))
