"""Reading checkpoint files safely, with one clear error per failure (pure torch).

Everything is read with ``torch.load(weights_only=True)``. torch's own message for a file that holds pickled
objects advises re-running with ``weights_only=False``, which would execute code from the file: that advice is
never passed on. The errors name the file, the cause and the fix.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A checkpoint, weights or teacher file cannot be used; the message names the file, the cause and the fix."""


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint", map_location: Any = "cpu") -> dict:
    """The dict stored at ``path`` (a Lightning checkpoint or a state dict), read with ``weights_only=True``.

    Raises :class:`CheckpointError` when the file is missing, a folder, empty or truncated, not a PyTorch file,
    holds pickled Python objects (e.g. a whole ``nn.Module``), or holds something other than a dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"The {what} {path} does not exist. Check the path (relative paths are resolved from "
                              f"{Path.cwd()}).")
    if path.is_dir():
        raise CheckpointError(f"The {what} {path} is a folder; give the checkpoint file inside it (e.g. last.ckpt).")
    if path.stat().st_size == 0:
        raise CheckpointError(f"The {what} {path} is empty (0 bytes): it was not written completely. Use another "
                              "checkpoint or write it again.")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise CheckpointError(
                f"The {what} {path} holds pickled Python objects (for example a whole nn.Module or an optimizer "
                "object), which are not loaded: unpickling them would run code from the file. Save the network's "
                "state_dict (or a Lightning checkpoint) and load that instead.") from None
        raise CheckpointError(f"The {what} {path} is not a PyTorch checkpoint ({_cause(err)}).") from None
    except (zipfile.BadZipFile, EOFError, RuntimeError, OSError) as err:
        raise CheckpointError(f"The {what} {path} cannot be read as a PyTorch checkpoint: it is truncated or in "
                              f"another format ({_cause(err)}). Use a complete .ckpt/.pt file written by "
                              "torch.save or Lightning.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"The {what} {path} holds a {type(data).__name__}, not a checkpoint or a state dict.")
    return data


def _cause(err: BaseException) -> str:
    """The first line of ``err``'s message, without torch's advice to disable ``weights_only``."""
    lines = [line for line in str(err).strip().splitlines() if "weights_only" not in line]
    first = lines[0].strip() if lines else ""
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__


def state_dict_mismatch(path: str | os.PathLike, error: BaseException, hint: str) -> CheckpointError:
    """A load_state_dict failure turned into an error that names the file and the likely cause."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    detail = "; ".join(lines[1:4]) if len(lines) > 1 else (lines[0] if lines else type(error).__name__)
    return CheckpointError(f"The weights in {path} do not fit this network: it was saved from another architecture "
                           f"or number of classes ({detail[:400]}). {hint}")
