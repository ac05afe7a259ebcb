"""The shared meaning of ``input_size``: ``[H, W]`` everywhere (callbacks and CLIs); the batch size is a separate
``batch_size`` and the channels are read from the network (or 3)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence


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


def checked_input_size(input_size: Sequence[int] | None, default: Sequence[int] | None = (64, 64)) -> list[int] | None:
    """The ``[H, W]`` a callback builds its example input with (``default`` when not given); refuses anything
    else at construction."""
    if input_size is None:
        return None if default is None else list(default)
    if len(input_size) != 2:
        raise ValueError(f"input_size is [H, W], got {list(input_size)}.")
    return [int(s) for s in input_size]
