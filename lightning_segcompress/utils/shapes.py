"""The shared meaning of ``input_size``: ``[H, W]`` everywhere (callbacks and CLIs); the batch size is a separate
``batch_size`` and the channels are read from the network (or 3). In a callback, ``input_size=None`` means the
``[H, W]`` of the fit's training batches (:func:`batch_input_size`; resolved by
``lightning_segcompress.callbacks._input_size``), and :data:`FALLBACK_INPUT_SIZE` only where the fit has none."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from lightning_segcompress.utils.batch import split_batch

FALLBACK_INPUT_SIZE = (64, 64)  # input_size=None in a callback whose fit has no training batch to read


def input_shape(input_size: Sequence[int], batch_size: int = 1, channels: int = 3,
                owner: str = "input_size") -> tuple[int, int, int, int]:
    """``(N, C, H, W)`` from ``input_size = [H, W]``. The old ``[N, C, H, W]`` spelling is accepted for one release
    with a FutureWarning (its N and C win)."""
    size = [int(s) for s in input_size]
    if batch_size < 1:
        raise ValueError(f"{owner}: batch_size must be >= 1, got {batch_size}.")
    if len(size) == 4 and min(size) > 0:
        warnings.warn(f"{owner}: input_size [N, C, H, W] is deprecated and will be removed in the next release; "
                      f"give input_size [H, W] = {size[2:]} and batch_size {size[0]}.", FutureWarning, stacklevel=3)
        return size[0], size[1], size[2], size[3]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"{owner}: input_size is [H, W] (two positive ints; the batch size is batch_size), got "
                         f"{list(input_size)}.")
    return batch_size, channels, size[0], size[1]


def checked_input_size(input_size: Sequence[int] | None, default: Sequence[int] | None = None) -> list[int] | None:
    """The ``[H, W]`` a callback builds its example input with (``default`` when not given: ``None``, the size of
    the batches, resolved later); refuses anything else at construction."""
    if input_size is None:
        return None if default is None else list(default)
    if len(input_size) != 2:
        raise ValueError(f"input_size is [H, W], got {list(input_size)}.")
    return [int(s) for s in input_size]


def batch_input_size(batch: Any) -> list[int]:
    """``[H, W]`` of the images of ``batch`` (a tensor, an ``(image, mask)`` tuple or a ``{"image": ...}`` dict);
    ``TypeError`` where it holds no image tensor."""
    image = split_batch(batch)[0]
    if image.dim() < 3:
        raise TypeError(f"the batch's images have shape {list(image.shape)}; expected [..., H, W].")
    return [int(s) for s in image.shape[-2:]]
