"""Shared plumbing of the ``segcompress`` tools (``benchmark``, ``memory``, ``shunt``, ``export``): one argument
spelling for all of them, and no heavy import before the arguments are parsed (``--help`` stays fast)."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence

# old spelling -> the shared vocabulary's
RENAMED = {"--checkpoint": "--ckpt", "--baseline_checkpoint": "--baseline_ckpt"}
# arguments that take a list of ints and may be written as separate words: --input_size 512 512
INT_LISTS = ("--input_size",)


def normalize_args(args: Sequence[str], prog: str = "segcompress") -> list[str]:
    """``--input_size 512 512`` -> ``--input_size=[512,512]``; renamed arguments -> their new name (a
    FutureWarning)."""
    out: list[str] = []
    i = 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in RENAMED:
            warnings.warn(f"{prog}: {name} is renamed {RENAMED[name]}; the old name will be removed in the next "
                          "release.", FutureWarning, stacklevel=2)
            name = RENAMED[name]
            arg = name + eq + value
        if name in INT_LISTS and not eq:
            numbers = []
            while i + 1 + len(numbers) < len(args) and _is_int(args[i + 1 + len(numbers)]):
                numbers.append(args[i + 1 + len(numbers)])
            if numbers:
                out.append(f"{name}=[{','.join(numbers)}]")
                i += 1 + len(numbers)
                continue
        out.append(arg)
        i += 1
    return out


def _is_int(text: str) -> bool:
    return text.lstrip("-").isdigit()


def run_tool(function: Callable, args: Sequence[str] | None = None, prog: str | None = None):
    """Parse ``args`` (default: the command line) into ``function``'s arguments with jsonargparse and call it."""
    from jsonargparse import CLI

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = sys.argv[1:] if args is None else list(args)
    prog = prog or f"segcompress {function.__name__.replace('_report', '')}"
    return CLI(function, args=normalize_args(args, prog), prog=prog)
