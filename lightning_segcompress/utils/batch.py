"""One reading of a training/validation batch for every callback: images and (optional) label masks from an
``(image, mask)`` tuple, a ``{"image": ..., "mask": ...}`` dict (common alternative key names accepted) or a bare
image tensor."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

IMAGE_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")
MASK_KEYS = ("mask", "masks", "label", "labels", "target", "targets", "y", "segmentation")


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(images, masks)`` of ``batch``; ``masks`` is None where the batch has none. Raises ``TypeError`` naming
    the accepted forms when no image tensor is found."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        image = next((batch[k] for k in IMAGE_KEYS if k in batch), None)
        mask = next((batch[k] for k in MASK_KEYS if k in batch), None)
    elif isinstance(batch, Sequence) and not isinstance(batch, str) and batch:
        image, mask = batch[0], batch[1] if len(batch) > 1 else None
    else:
        image, mask = None, None
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"Cannot find an image tensor in a batch of type {type(batch).__name__}; expected a tensor, "
                        f"an (image, mask) tuple or a dict with one of the keys {list(IMAGE_KEYS)}.")
    return image, mask if isinstance(mask, torch.Tensor) else None


def batch_labels(batch: Any) -> torch.Tensor | None:
    """The ``N x H x W`` label masks of ``batch``, or None (no batch, no masks, or masks of another form)."""
    if batch is None:
        return None
    try:
        masks = split_batch(batch)[1]
    except TypeError:
        return None
    return masks if masks is not None and masks.dim() == 3 else None
