"""Validation mIoU of an exported file, scored by running the file itself. Pure torch.

The validation images are brought to the exported static input size once (:class:`EvalSet`, bilinear resize where
they differ; the masks keep their size) and both eager and the exported program are scored on exactly these
inputs, in chunks of the exported batch size, with the logits resized to each mask as the project's scoring does
(:func:`~lightning_segcompress.utils.metrics.logits_at_masks`). The exported program runs in the isolated timing
worker (``--eval``), which reads the set from a ``.pt`` file of tensors (``torch.load(weights_only=True)``) and
returns per-image confusion matrices; :func:`compare_accuracy` turns both into mIoUs and flags a gap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lightning_segcompress.utils.statistics import confusion_matrices, miou_from_confusion

__all__ = ["EvalSet", "MAX_MIOU_GAP", "compare_accuracy", "fit_to_input", "predict_confusion"]

MAX_MIOU_GAP = 0.2  # points: a larger gap between the exported file and eager is flagged


def fit_to_input(images: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``images`` ``[N, C, H, W]`` at ``size`` ``(H, W)``: unchanged where they have it, else resized (bilinear,
    ``align_corners=False``)."""
    size = tuple(int(s) for s in size)
    if tuple(images.shape[-2:]) == size:
        return images
    return nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False)


@dataclass
class EvalSet:
    """Validation images at the exported input size (one ``[C, H, W]`` float tensor each) and their masks (one
    ``[h, w]`` int tensor each, at the data's size); pixels labelled ``ignore_index`` are not scored."""

    images: list[torch.Tensor]
    masks: list[torch.Tensor]
    ignore_index: int | None = 255

    def __post_init__(self) -> None:
        if len(self.images) != len(self.masks):
            raise ValueError(f"{len(self.images)} images but {len(self.masks)} masks.")
        if not self.images:
            raise ValueError("an EvalSet needs at least one image.")

    @classmethod
    def from_batches(cls, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], input_shape: Sequence[int],
                     ignore_index: int | None = 255) -> EvalSet:
        """From ``(images, masks)`` batches (any device): images on the CPU, float, fitted to ``input_shape``'s
        ``H, W`` with :func:`fit_to_input`."""
        images, masks = [], []
        for batch_images, batch_masks in batches:
            fitted = fit_to_input(batch_images.detach().cpu().float(), input_shape[-2:])
            images.extend(fitted.unbind(0))
            masks.extend(batch_masks.detach().cpu().unbind(0))
        return cls(images, masks, ignore_index)

    def __len__(self) -> int:
        return len(self.images)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": [i.contiguous() for i in self.images], "masks": [m.contiguous() for m in self.masks],
                    "ignore_index": self.ignore_index}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvalSet:
        data = torch.load(path, weights_only=True)
        return cls(list(data["images"]), list(data["masks"]), data["ignore_index"])


def predict_confusion(program: Callable[[torch.Tensor], torch.Tensor], evaluation: EvalSet, batch_size: int = 1,
                      num_classes: int | None = None) -> torch.Tensor:
    """Per-image confusion matrices ``[N, C, C]`` (int64, CPU) of ``program`` (eager module or exported program
    returning logits ``[B, C, h, w]``) on ``evaluation``: images in chunks of ``batch_size`` (the exported static
    batch; the last chunk padded with zeros, the padding's outputs discarded), logits resized (bilinear) to each
    mask, argmax. ``num_classes`` defaults to the logits' channels."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    matrices = []
    with torch.no_grad():
        for start in range(0, len(evaluation), batch_size):
            chunk = torch.stack(evaluation.images[start:start + batch_size])
            count = chunk.shape[0]
            if count < batch_size:
                chunk = torch.cat([chunk, chunk.new_zeros(batch_size - count, *chunk.shape[1:])])
            logits = program(chunk)[:count].float()
            classes = logits.shape[1] if num_classes is None else num_classes
            for i in range(count):
                mask = evaluation.masks[start + i]
                image_logits = logits[i:i + 1]
                if image_logits.shape[-2:] != mask.shape[-2:]:
                    image_logits = nn.functional.interpolate(image_logits, size=mask.shape[-2:], mode="bilinear",
                                                             align_corners=False)
                matrices.append(confusion_matrices(image_logits.argmax(1), mask.unsqueeze(0), classes,
                                                   evaluation.ignore_index))
    return torch.cat(matrices)


def compare_accuracy(eager: torch.Tensor, exported: torch.Tensor, ignore_index: int | None = 255,
                     max_gap: float = MAX_MIOU_GAP) -> dict:
    """The exported file's val mIoU against eager's on the same images, from their per-image confusion matrices:
    ``{"images", "eager_miou", "miou", "gap_points" (file - eager, x100), "max_gap_points", "flagged" (|gap| >
    max_gap), "identical" (the same confusion matrices)}``."""
    eager, exported = torch.as_tensor(eager), torch.as_tensor(exported)
    if eager.shape != exported.shape:
        raise ValueError(f"eager and exported confusion matrices differ in shape: {tuple(eager.shape)} vs "
                         f"{tuple(exported.shape)} (the same images and classes are needed).")
    eager_miou = miou_from_confusion(eager, ignore_index)
    miou = miou_from_confusion(exported, ignore_index)
    gap = 100.0 * (miou - eager_miou)
    return {"images": int(eager.shape[0]) if eager.dim() == 3 else None, "eager_miou": eager_miou, "miou": miou,
            "gap_points": gap, "max_gap_points": max_gap, "flagged": not abs(gap) <= max_gap,
            "identical": bool(torch.equal(eager, exported))}
