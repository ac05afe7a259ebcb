"""KnowledgeDistillation: add a segmentation distillation loss to any LightningModule's training loss."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from lightning_segcompress.callbacks._ddp import average_gradients, broadcast_from_rank_zero
from lightning_segcompress.callbacks._input_size import training_input_size
from lightning_segcompress.callbacks._training import (
    install_extra_parameters,
    install_loss_term,
    remove_extra_parameters,
    remove_loss_term,
)
from lightning_segcompress.callbacks.protocol import CompressionCallback, CompressionEvent
from lightning_segcompress.distillation import (
    DistillationError,
    Distiller,
    make_connector,
    normalise_hint,
    normalise_losses,
    restore_snapshot,
    snapshot,
    snapshot_state,
)
from lightning_segcompress.distillation.distiller import FEATURE_LOSSES, connector_channels
from lightning_segcompress.models.factory import build_network
from lightning_segcompress.models.segmentation_module import SegmentationModule
from lightning_segcompress.state import load_network_weights
from lightning_segcompress.utils.batch import batch_labels
from lightning_segcompress.utils.checkpoint_io import read_checkpoint
from lightning_segcompress.utils.inspection import (
    example_input,
    extract_logits,
    find_classifier_layers,
    find_network,
)
from lightning_segcompress.utils.precision import follow
from lightning_segcompress.utils.shapes import checked_input_size

TEACHER_FILE = "teacher_snapshot.pt"

SNAPSHOT_MOMENTS = ("fit_start", "before_compression")


class KnowledgeDistillation(CompressionCallback):
    """Distil a frozen teacher into the network of any LightningModule during ``fit``.

    The module's ``training_step`` is left as it is: its returned loss (a tensor or a dict with ``"loss"``) becomes
    ``alpha * loss + sum(weight * distillation loss)``. The student's logits and hinted features are read with
    forward hooks, the teacher runs on the same images without gradients, in eval mode, on the student's device.
    With manual optimization, add :meth:`distillation_loss` to your loss yourself.

    Args:
        teacher: ``"snapshot"`` (a frozen copy of the student taken at ``snapshot_at``), a network spec
            ``{"class_path": ..., "init_args": {...}}`` (weights from ``teacher_checkpoint``), the path of a
            ``SegmentationModule`` checkpoint (compressed ones too), or (from Python) an ``nn.Module`` /
            ``LightningModule``.
        teacher_checkpoint: weights for a spec teacher: a Lightning checkpoint or a bare state dict (compressed
            checkpoints are restored first).
        snapshot_at: ``"fit_start"`` or ``"before_compression"`` (right before the first compression step of any
            technique, pruning, shunt or quantization, so "KD after pruning" needs no second model file; no
            distillation before that). The snapshot is the compression protocol's shared pre-step copy, and it is
            saved once to ``<output_dir>/teacher_snapshot.pt`` instead of into every checkpoint; a resumed fit
            reads it from there (or from the resumed checkpoint's folder).
        losses: ``{name: weight}`` or ``{name: {weight, options}}`` for ``pixel_kl`` (temperature), ``cwd``
            (temperature), ``pairwise`` (pool_scale), ``ace`` (kappa), ``ifvd`` (intra-class feature variation,
            Wang et al. 2020), ``cirkd_pixel`` (temperature, max_pixels; cross-image pixel relations, Yang et al.
            2022, in-batch) and ``cirkd_region`` (temperature, max_pixels; pixel-to-region relations within the
            batch). The feature losses (pairwise, ifvd, cirkd_*) also take student_layer / teacher_layer (default:
            the classifier's input; channel counts may differ); ace, ifvd and cirkd_region use the batch's labels.
            Defaults follow the publications and official code (see ``distillation.losses.DEFAULTS``).
        hints: ``[{student: layer, teacher: layer, weight: 1.0}]`` feature hints (MSE); a learnable 1x1 conv + BN
            connector maps channels where they differ. Connectors train with the first optimizer, are saved in
            this callback's checkpoint state, and are never part of the student network (nor its export).
            A layer is a module name (or a regex naming one module); ``"name:input"`` takes its input.
        alpha: factor on the module's own loss.
        ignore_index: label ignored by ``ace``, ``ifvd`` and ``cirkd_region`` and masked out of ``pixel_kl``.
        teacher_autocast: run the teacher under autocast (bfloat16 on CPU, float16 on CUDA).
        input_size: ``[H, W]`` of the example used to check student and teacher at fit start (and after each
            compression step, with hints); ``None`` (default): the size of the fit's training batches.
        network_attribute: the student network's attribute path in the LightningModule (default: found).
        output_dir: where a snapshot teacher is saved (default ``<log dir>/distillation``).

    Example::

        trainer = Trainer(callbacks=[KnowledgeDistillation(
            teacher={"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                     "init_args": {"encoder_name": "tu-mobilenetv3_large_100"}},
            teacher_checkpoint="runs/teacher/best.ckpt", losses={"pixel_kl": 1.0, "cwd": 3.0})])
    """

    def __init__(
        self,
        teacher: str | dict[str, Any] | nn.Module = "snapshot",
        teacher_checkpoint: str | None = None,
        snapshot_at: str = "fit_start",
        losses: dict[str, Any] | None = None,
        hints: list[dict[str, Any]] | None = None,
        alpha: float = 1.0,
        ignore_index: int = 255,
        teacher_autocast: bool = False,
        input_size: list[int] | None = None,
        network_attribute: str | None = None,
        output_dir: str | None = None,
    ) -> None:
        if snapshot_at not in SNAPSHOT_MOMENTS:
            raise ValueError(f"snapshot_at must be one of {list(SNAPSHOT_MOMENTS)}, got {snapshot_at!r}.")
        if isinstance(teacher, str) and teacher != "snapshot" and not Path(teacher).is_file():
            raise ValueError(f"teacher {teacher!r} is neither 'snapshot' nor an existing checkpoint file.")
        if isinstance(teacher, Mapping) and "class_path" not in teacher:
            raise ValueError(f"a teacher spec needs a class_path, got {dict(teacher)!r}.")
        if not isinstance(teacher, (str, Mapping, nn.Module)):
            raise ValueError(f"teacher must be 'snapshot', a checkpoint path, a network spec or a module, got "
                             f"{type(teacher).__name__}.")
        if teacher_checkpoint is not None and not Path(teacher_checkpoint).is_file():
            raise ValueError(f"teacher_checkpoint {teacher_checkpoint!r} does not exist.")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}.")
        if losses is None and not hints:
            losses = {"pixel_kl": {}}
        self.losses = normalise_losses(losses) if losses else {}
        if not self.losses and not hints:
            raise ValueError("nothing to distil: give losses (e.g. {pixel_kl: 1.0}) and/or hints.")
        self.teacher = teacher
        self.teacher_checkpoint = teacher_checkpoint
        self.snapshot_at = snapshot_at
        self.hints = [normalise_hint(h) for h in hints or []]
        self.alpha = alpha
        self.ignore_index = ignore_index
        self.teacher_autocast = teacher_autocast
        self.input_size = checked_input_size(input_size)  # None: the training batches' size, read at setup
        self.network_attribute = network_attribute
        self.output_dir = output_dir
        self.distiller: Distiller | None = None
        self.active = False  # False until a snapshot teacher exists
        self.teacher_file: str | None = None  # where the snapshot teacher was saved
        self._template: nn.Module | None = None  # a resumed fit: the student as built, to rebuild the teacher on
        self._resumed = False
        self._legacy_snapshot: dict | None = None

    # ---- set-up and tear-down ------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        student = self.network(pl_module)
        if self.input_size is None:
            self.input_size = training_input_size(trainer, pl_module, "KnowledgeDistillation")
        example = example_input(student, size=tuple(self.input_size))
        if self.teacher == "snapshot":
            # a resumed fit rebuilds its teacher on the network as built, before the checkpoint's stages are replayed
            # on the student; whether this fit resumes is only known later, so the copy lives until on_fit_start
            self._template = snapshot(student)
            teacher, self.active = None, False
        else:
            teacher, self.active = self._build_teacher(student, example), True
            follow(teacher, student)  # built or loaded on the CPU in float32: to the student's device and dtype
        feature_default = _classifier_inputs(student, teacher or student, example) \
            if set(self.losses) & set(FEATURE_LOSSES) else None
        self.distiller = Distiller(student, teacher, self.losses, self.hints, self.ignore_index,
                                   self.teacher_autocast, feature_default)
        self.distiller.attach()
        self.distiller.check(example)  # class counts, layers and connectors: errors now, not mid-epoch
        install_extra_parameters(pl_module, self.state_key, self._connector_parameters)
        if pl_module.automatic_optimization:
            install_loss_term(pl_module, self.state_key, self._add_distillation)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.distiller is None:
            return
        # follow the network the fit ended with (e.g. the int8 conversion), so the one it replaced can be freed
        self.distiller.set_student(self.network(pl_module))
        self.distiller.detach()
        remove_extra_parameters(pl_module, self.state_key)
        remove_loss_term(pl_module, self.state_key)
        self._template = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        student = self.network(pl_module)
        template, self._template = self._template, None
        if self._resumed and self.teacher == "snapshot" and self.active:  # the snapshot teacher of the resumed fit
            self._set_teacher(restore_snapshot(template, self._load_teacher_file(trainer)))
        elif self.teacher == "snapshot" and self.snapshot_at == "fit_start" and not self.active:
            del template
            self._take_snapshot(trainer, snapshot(student))
        if self.distiller.teacher is not None:  # Lightning moved the student (e.g. to the GPU) since setup
            follow(self.distiller.teacher, student)
        follow(self.distiller.connectors, student)
        self._sync_connectors()

    def on_before_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                              event: CompressionEvent) -> None:
        if self.teacher == "snapshot" and self.snapshot_at == "before_compression" and not self.active:
            self._take_snapshot(trainer, event.snapshot())

    def on_after_compression(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             event: CompressionEvent) -> None:
        """The student changed: follow a replaced network (quantization); rebuild connectors of pruned layers."""
        student = self.network(pl_module)
        if student is not self.distiller.student:
            self.distiller.set_student(student)
        if self.hints:
            self.distiller.check(example_input(student, size=tuple(self.input_size)))
            self._sync_connectors()

    def _sync_connectors(self) -> None:
        """Every DDP rank starts its connectors from rank 0's initial weights."""
        connectors = self.distiller.connectors
        broadcast_from_rank_zero([*connectors.parameters(), *connectors.buffers()])

    def _set_teacher(self, teacher: nn.Module) -> None:
        self.distiller.set_teacher(follow(teacher, self.distiller.student))
        self.active = True

    def _take_snapshot(self, trainer: pl.Trainer, teacher: nn.Module) -> None:
        """Distil from ``teacher`` (a frozen copy of the student) from now on; rank 0 saves it once, so that
        checkpoints need not carry it."""
        self._set_teacher(teacher)
        path = self.run_dir(trainer, "distillation") / TEACHER_FILE
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(snapshot_state(teacher), path)
        self.teacher_file = str(path.resolve())

    def _load_teacher_file(self, trainer: pl.Trainer) -> dict:
        if self._legacy_snapshot is not None:  # a checkpoint from before the teacher file: the teacher is inline
            state, self._legacy_snapshot = self._legacy_snapshot, None
            return state
        candidates = [Path(self.teacher_file)] if self.teacher_file else []
        if trainer.ckpt_path:
            candidates.append(Path(trainer.ckpt_path).resolve().parent / TEACHER_FILE)
        for path in candidates:
            if path.is_file():
                rank_zero_info(f"KnowledgeDistillation: snapshot teacher restored from {path}.")
                return read_checkpoint(path, what="snapshot teacher file")
        raise DistillationError(
            f"The resumed fit distils from a snapshot teacher saved to {self.teacher_file}, which does not exist "
            f"(nor {TEACHER_FILE} beside the checkpoint). Copy {TEACHER_FILE} from the original run there or "
            "next to the checkpoint, or give the teacher as a spec with teacher_checkpoint.")

    def _build_teacher(self, student: nn.Module, example: torch.Tensor) -> nn.Module:
        teacher = self.teacher
        if isinstance(teacher, nn.Module):
            return find_network(teacher) if isinstance(teacher, pl.LightningModule) else teacher
        if isinstance(teacher, str):
            checkpoint = read_checkpoint(teacher, what="teacher checkpoint")
            if "network" not in checkpoint.get("hyper_parameters", {}):
                raise DistillationError(
                    f"{teacher} is not a SegmentationModule checkpoint (no network spec in its hyper_parameters). "
                    "Give the teacher as a spec instead: teacher: {class_path: ..., init_args: {...}} with "
                    f"teacher_checkpoint: {teacher}.")
            return SegmentationModule.load_from_checkpoint(teacher, map_location="cpu", weights_only=True).net
        with torch.no_grad():
            was_training = student.training
            classes = extract_logits(student.eval()(example)).shape[1]
            student.train(was_training)
        sets_classes = {"classes", "num_classes"} & set(teacher.get("init_args") or {})
        network = build_network(teacher, num_classes=None if sets_classes else classes)
        if self.teacher_checkpoint:
            network = load_network_weights(network, self.teacher_checkpoint, DistillationError,
                                           "Check the teacher's class_path and init_args.")
        return network

    # ---- the loss --------------------------------------------------------------------------------------------

    def _add_distillation(self, loss: torch.Tensor, batch: Any, pl_module: pl.LightningModule) -> torch.Tensor:
        if not self.active:
            self.distiller.student_capture.clear()  # drop the graph the hooks kept
            return loss
        return self.alpha * loss + self.distillation_loss(pl_module, batch)

    def distillation_loss(self, pl_module: pl.LightningModule, batch: Any = None) -> torch.Tensor:
        """The weighted distillation loss for the student's latest forward (logged per term as ``kd/<name>``).
        Call it after the forward in a manual-optimization ``training_step`` and add it to your loss."""
        if not self.active:
            return torch.zeros((), device=pl_module.device)
        target = batch_labels(batch)
        total, terms = self.distiller.compute(target)
        for name, value in terms.items():
            pl_module.log(f"kd/{name}", value.detach(), on_step=True, on_epoch=True)
        pl_module.log("kd/total", total.detach(), on_step=True, on_epoch=True)
        return total

    def _connector_parameters(self) -> list[nn.Parameter]:
        return list(self.distiller.connectors.parameters()) if self.distiller is not None else []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # connectors live outside the DDP-wrapped module: average their gradients across ranks by hand
        average_gradients(trainer, self._connector_parameters())

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def progress_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {"active": self.active, "teacher_file": self.teacher_file}
        if self.distiller is not None:
            state["connectors"] = {key: {"channels": connector_channels(m), "state_dict": m.state_dict()}
                                   for key, m in self.distiller.connectors.items()}
        return state

    def load_progress_state(self, state: dict[str, Any]) -> None:
        if self.distiller is not None:
            for key, entry in state.get("connectors", {}).items():
                channels = entry["channels"]
                connector = make_connector(*channels) if channels else nn.Identity()
                connector.load_state_dict(entry["state_dict"])
                self.distiller.connectors[key] = connector
        self.teacher_file = state.get("teacher_file")
        self._legacy_snapshot = state.get("snapshot")
        self._resumed = True
        if self.teacher == "snapshot":
            self.active = bool(state.get("active"))


def _classifier_inputs(student: nn.Module, teacher: nn.Module, example: torch.Tensor) -> tuple[str, str] | None:
    """Default layers of the feature losses: the input of each network's (first) classifier layer."""
    try:
        s = find_classifier_layers(student, example)[0]
        t = find_classifier_layers(teacher, example)[0]
    except (IndexError, RuntimeError, ValueError):
        return None  # the Distiller then asks for student_layer / teacher_layer
    return f"{s}:input", f"{t}:input"
