"""Distillation of a student network from a frozen teacher, independent of how the student is trained.

The student's forward is observed with hooks (its input image, logits and hinted layers); the teacher is run
on the same image without gradients; the configured losses compare the two. Pure torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_segcompress.distillation.capture import DistillationError, ForwardCapture
from lightning_segcompress.distillation.losses import DEFAULTS, LOSSES, feature_hint, make_connector
from lightning_segcompress.state import apply_stages, get_stages
from lightning_segcompress.utils.inspection import extract_logits, frozen_copy
from lightning_segcompress.utils.precision import autocast_disabled, floating_dtype

LOGIT_LOSSES = ("pixel_kl", "cwd", "ace")
# Losses on feature maps: each compares its own student_layer / teacher_layer (default: the classifier's input).
FEATURE_LOSSES = ("pairwise", "ifvd", "cirkd_pixel", "cirkd_region")
# Losses that need the labels.
LABEL_LOSSES = ("ace", "ifvd", "cirkd_region")
LOSS_NAMES = tuple(LOSSES) + ("hints",)


def freeze(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def normalise_losses(losses: Mapping[str, Any]) -> dict[str, dict]:
    """``{"pixel_kl": 10}`` or ``{"cwd": {"weight": 3, "temperature": 4}}`` -> full option dicts with the
    publications' defaults filled in."""
    if not losses:
        raise DistillationError(f"losses is empty: name at least one of {list(LOSSES)}, e.g. {{'pixel_kl': {{}}}}.")
    result = {}
    for name, options in losses.items():
        if name not in LOSSES:
            raise DistillationError(f"unknown distillation loss {name!r}: use {list(LOSSES)} (feature hints go "
                                    "in `hints`).")
        options = {"weight": float(options)} if isinstance(options, (int, float)) else dict(options or {})
        merged = {**DEFAULTS[name], **options}
        allowed = set(DEFAULTS[name]) | ({"student_layer", "teacher_layer"} if name in FEATURE_LOSSES else set())
        unknown = set(merged) - allowed
        if unknown:
            raise DistillationError(f"{name} has no option(s) {sorted(unknown)}; it takes {sorted(allowed)}.")
        if merged["weight"] < 0:
            raise DistillationError(f"{name} weight must be >= 0, got {merged['weight']}.")
        result[name] = merged
    return result


def normalise_hint(hint: Mapping[str, Any]) -> dict:
    if not isinstance(hint, Mapping) or not {"student", "teacher"} <= set(hint):
        raise DistillationError(f"a hint is {{student: layer, teacher: layer, weight: 1.0}}, got {hint!r}.")
    unknown = set(hint) - {"student", "teacher", "weight"}
    if unknown:
        raise DistillationError(f"hint {hint!r} has unknown key(s) {sorted(unknown)}.")
    return {"student": str(hint["student"]), "teacher": str(hint["teacher"]), "weight": float(hint.get("weight", 1.0))}


class Distiller:
    """Computes ``sum(weight * loss)`` between the latest student forward and the teacher on the same input.

    Args:
        student, teacher: the networks (logits as a tensor, a dict with ``"out"`` or a tuple). ``teacher`` may be
            None until :meth:`set_teacher` (a snapshot of the student to come): checks then use the student's own
            layers in its place.
        losses: ``{name: weight or options}`` with names from ``LOSSES`` (``pixel_kl``, ``cwd``, ``pairwise``,
            ``ace``, ``ifvd``, ``cirkd_pixel``, ``cirkd_region``); the feature losses (``FEATURE_LOSSES``) each
            compare their ``student_layer`` / ``teacher_layer`` (default: the input of the classifier, given as
            ``default_feature_layers``); ``ace``, ``ifvd`` and ``cirkd_region`` need the labels.
        hints: ``[{"student": layer, "teacher": layer, "weight": w}]``; a learnable 1x1 connector maps the
            student's channels to the teacher's where they differ.
        ignore_index: label ignored by ``ace``, ``ifvd`` and ``cirkd_region`` and masked out of ``pixel_kl``.
        teacher_autocast: run the teacher under autocast (bfloat16 on CPU, float16 on CUDA).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, losses: Mapping[str, Any],
                 hints: Sequence[Mapping[str, Any]] = (), ignore_index: int = 255, teacher_autocast: bool = False,
                 default_feature_layers: tuple[str, str] | None = None):
        self.losses = normalise_losses(losses) if losses or not hints else {}
        self.hints = [normalise_hint(h) for h in hints]
        self.ignore_index = ignore_index
        self.teacher_autocast = teacher_autocast
        self.student, self.teacher = student, None if teacher is None else freeze(teacher)
        student_layers = {f"hint{i}": h["student"] for i, h in enumerate(self.hints)}
        teacher_layers = {f"hint{i}": h["teacher"] for i, h in enumerate(self.hints)}
        for name in (n for n in FEATURE_LOSSES if n in self.losses):
            options = self.losses[name]
            default = default_feature_layers or (None, None)
            student_layers[name] = options.get("student_layer") or default[0]
            teacher_layers[name] = options.get("teacher_layer") or default[1]
            if not student_layers[name] or not teacher_layers[name]:
                raise DistillationError(f"{name} needs student_layer and teacher_layer (feature maps to compare).")
        self._student_layers, self._teacher_layers = student_layers, teacher_layers
        self.student_capture = ForwardCapture(student, student_layers, "student")
        self.teacher_capture = None if teacher is None else ForwardCapture(self.teacher, teacher_layers, "teacher")
        self.connectors = nn.ModuleDict()
        self._attached = False

    # ---- set-up ---------------------------------------------------------------------------------------------

    def attach(self) -> None:
        self.student_capture.attach()
        if self.teacher_capture is not None:
            self.teacher_capture.attach()
        self._attached = True

    def detach(self) -> None:
        self.student_capture.detach()
        self.student_capture.clear()
        if self.teacher_capture is not None:
            self.teacher_capture.detach()
            self.teacher_capture.clear()
        self._attached = False

    def set_teacher(self, teacher: nn.Module) -> None:
        """Distil from ``teacher`` from now on (e.g. a snapshot taken right before pruning)."""
        if self.teacher_capture is not None:
            self.teacher_capture.detach()
        self.teacher = freeze(teacher)
        self.teacher_capture = ForwardCapture(self.teacher, self._teacher_layers, "teacher")
        if self._attached:
            self.teacher_capture.attach()

    def set_student(self, student: nn.Module) -> None:
        """Capture from ``student`` from now on (the network was replaced, e.g. traced for quantization)."""
        self.student_capture.detach()
        self.student_capture.clear()
        self.student = student
        self.student_capture = ForwardCapture(student, self._student_layers, "student")
        if self._attached:
            self.student_capture.attach()

    def check(self, example: torch.Tensor) -> None:
        """Run both networks on ``example``: class counts must agree for the logit losses, every hinted layer
        must produce a ``B x C x H x W`` map; builds (or rebuilds, after the student was pruned) connectors. Without
        a teacher yet, the student's own layers stand in for the snapshot to come."""
        stand_in = None
        if self.teacher is None:
            stand_in = ForwardCapture(self.student, self._teacher_layers, "teacher").attach()
        teacher_capture = stand_in or self.teacher_capture
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad():
                self.student(example)
                if stand_in is None:
                    self._run_teacher(example)
        finally:
            self.student.train(was_training)
            if stand_in is not None:
                stand_in.detach()
        student_out = extract_logits(self.student_capture.output)
        teacher_out = extract_logits(teacher_capture.output)
        if set(self.losses) & set(LOGIT_LOSSES) and student_out.shape[1] != teacher_out.shape[1]:
            raise DistillationError(
                f"the student predicts {student_out.shape[1]} classes and the teacher {teacher_out.shape[1]}: "
                f"{sorted(set(self.losses) & set(LOGIT_LOSSES))} compare class scores, so both must have the same "
                "classes (check the teacher's num_classes), or use only hints / feature losses "
                f"({', '.join(FEATURE_LOSSES)}).")
        for key in self.student_capture.layers:
            s, t = self.student_capture.features.get(key), teacher_capture.features.get(key)
            names = (self.student_capture.layers[key][0], teacher_capture.layers[key][0])
            if s is None or t is None:
                raise DistillationError(f"layer {names[0] if s is None else names[1]!r} did not run in the forward "
                                        "pass, so it has no features to distil; pick a layer that runs.")
            if s.dim() != 4 or t.dim() != 4:
                raise DistillationError(f"features of student layer {names[0]!r} {tuple(s.shape)} and teacher layer "
                                        f"{names[1]!r} {tuple(t.shape)} must both be B x C x H x W maps.")
            if key.startswith("hint"):
                self._fit_connector(key, s.shape[1], t.shape[1], example.device)
        self.student_capture.clear()
        teacher_capture.clear()

    def _fit_connector(self, key: str, student_channels: int, teacher_channels: int, device) -> None:
        wanted = None if student_channels == teacher_channels else (student_channels, teacher_channels)
        if key in self.connectors and connector_channels(self.connectors[key]) == wanted:
            return  # unchanged; a student pruned at this layer gets a new connector (old one cannot be sliced)
        # on the student's device and in its dtype (a connector maps the student's features)
        self.connectors[key] = make_connector(student_channels, teacher_channels).to(
            device=device, dtype=floating_dtype(self.student))

    # ---- per step -------------------------------------------------------------------------------------------

    def _run_teacher(self, images: torch.Tensor):
        autocast = contextlib.nullcontext()
        if self.teacher_autocast:
            dtype = torch.float16 if images.device.type == "cuda" else torch.bfloat16
            autocast = torch.autocast(images.device.type, dtype=dtype)
        with torch.no_grad(), autocast:
            return self.teacher(images.to(floating_dtype(self.teacher, images.dtype)) if images.is_floating_point()
                                else images)

    def compute(self, target: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, {loss name: unweighted value})`` for the student's latest forward."""
        capture = self.student_capture
        if self.teacher is None:
            raise RuntimeError("no teacher yet: set_teacher() before computing the distillation loss.")
        if capture.output is None or capture.inputs is None:
            raise RuntimeError("the student network did not run since the last distillation step: call the "
                               "network (inside training_step) before asking for the distillation loss.")
        self._run_teacher(capture.inputs)
        # connectors are part of the student's computation (under the caller's autocast, in the student's dtype) ...
        hinted = {f"hint{i}": self.connectors[f"hint{i}"](capture.features[f"hint{i}"]) for i in range(len(self.hints))}
        # ... the losses are computed in float32 with autocast off (a bf16 KL divergence or softmax loses the tails)
        with autocast_disabled([extract_logits(capture.output).device]):
            total, terms = self._losses(capture, target, hinted)
        capture.clear()
        self.teacher_capture.clear()
        return total, terms

    def _losses(self, capture, target: torch.Tensor | None,
                hinted: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        student = extract_logits(capture.output).float()
        teacher = extract_logits(self.teacher_capture.output).detach().float()
        terms: dict[str, torch.Tensor] = {}
        for name, options in self.losses.items():
            kwargs = {k: v for k, v in options.items() if k not in ("weight", "student_layer", "teacher_layer")}
            if name in LABEL_LOSSES:
                if target is None:
                    raise DistillationError(f"{name} needs the labels: the batch must be (images, masks) or a dict "
                                            "with 'mask'.")
                kwargs["ignore_index"] = self.ignore_index
            if name == "pixel_kl":
                valid = None
                if target is not None and target.shape[-2:] == student.shape[-2:]:
                    valid = target != self.ignore_index
                terms[name] = LOSSES[name](student, teacher, valid=valid, **kwargs)
            elif name == "ace":
                terms[name] = LOSSES[name](student, teacher, target, **kwargs)
            elif name in FEATURE_LOSSES:
                features = (capture.features[name].float(), self.teacher_capture.features[name].detach().float())
                labels = (target,) if name in LABEL_LOSSES else ()
                terms[name] = LOSSES[name](*features, *labels, **kwargs)
            else:
                terms[name] = LOSSES[name](student, teacher, **kwargs)
        hint_total = None
        for i, hint in enumerate(self.hints):
            key = f"hint{i}"
            value = feature_hint(hinted[key].float(), self.teacher_capture.features[key].detach().float())
            terms[key] = value
            hint_total = value * hint["weight"] if hint_total is None else hint_total + value * hint["weight"]
        total = sum(self.losses[name]["weight"] * terms[name] for name in self.losses)
        if hint_total is not None:
            total = total + hint_total
        return total, terms


def connector_channels(connector: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` channels of a connector; ``None`` for the identity used where channels already agree."""
    conv = next((m for m in connector.modules() if isinstance(m, nn.Conv2d)), None)
    return (conv.in_channels, conv.out_channels) if conv is not None else None


def snapshot(network: nn.Module) -> nn.Module:
    """A frozen copy of ``network`` (its compression state included), without the hooks attached to it."""
    return frozen_copy(network)


def snapshot_state(teacher: nn.Module) -> dict:
    """A snapshot teacher as plain data for a checkpoint: its compression stages and weights."""
    return {"stages": get_stages(teacher), "state_dict": teacher.state_dict()}


def restore_snapshot(template: nn.Module, state: dict) -> nn.Module:
    """The frozen teacher saved by :func:`snapshot_state`, rebuilt on ``template`` (a copy of the network as it was
    built, before any compression; it becomes the teacher, so pass a copy you no longer need)."""
    teacher = apply_stages(template, state["stages"])
    teacher.load_state_dict(state["state_dict"])
    return freeze(teacher)
