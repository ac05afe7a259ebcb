"""The ``segcompress`` command: ``fit|validate|test|predict`` (LightningCLI) and the tools ``benchmark``, ``memory``,
``shunt``, ``export``, which load a model the same way (``--ckpt``, ``--network`` or ``--recipe``) and share the
argument vocabulary (``--input_size H W``, ``--num_classes``, ``--threads``, ...).

Nothing heavy is imported before the command is known, so ``segcompress --help`` and ``segcompress <tool> --help``
answer at once; ``fit --help`` needs Lightning itself.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence

# tool -> (module, function, one line)
TOOLS = {
    "benchmark": ("lightning_segcompress.cli.benchmark", "benchmark",
                  "latency, size, memory and accuracy of a model on eager / TorchScript lite / ExecuTorch"),
    "memory": ("lightning_segcompress.cli.memory", "memory",
               "where activation memory goes, what planning and tiled inference save"),
    "shunt": ("lightning_segcompress.cli.shunt", "shunt_report",
              "MobileNetV3 block map, knowledge quotients and the range a shunt would replace"),
    "export": ("lightning_segcompress.cli.export", "export",
               "write the file to ship (.pte / .ptl) and model.json; int8 for a quantized checkpoint"),
}
LIGHTNING = {
    "fit": "train (and compress, with the recipe's callbacks)",
    "validate": "validation metrics of a checkpoint",
    "test": "test metrics of a checkpoint",
    "predict": "class maps of a checkpoint",
}


def usage() -> str:
    lines = ["usage: segcompress <command> [--help] [options]", "",
             "Compress semantic-segmentation networks with Lightning callbacks, and ship the result.", "",
             "training commands (LightningCLI; --config recipes/<recipe>.yaml):"]
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING.items()]
    lines += ["", "tools (--ckpt file.ckpt | --network '{class_path: ..., init_args: ...}' | --recipe file.yaml):"]
    lines += [f"  {name:<10} {text}" for name, (_, _, text) in TOOLS.items()]
    lines += ["", "Every command has its own --help. The model and data of the training commands default to "
                  "lightning_segcompress.SegmentationModule and SyntheticScenesDataModule."]
    return "\n".join(lines)


def tool_main(name: str, args: Sequence[str] | None = None):
    """Run the tool ``name`` on ``args`` (the old ``segcompress-<tool>`` scripts call this too)."""
    from lightning_segcompress.cli.tools import run_tool

    module, function, _ = TOOLS[name]
    return run_tool(getattr(importlib.import_module(module), function), args, prog=f"segcompress {name}")


def main(args: Sequence[str] | None = None) -> None:
    """The console script: returns nothing (``sys.exit(main())`` must exit 0)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return
    if argv[0] == "--version":
        from lightning_segcompress import __version__

        print(f"segcompress {__version__}")
        return
    if argv[0] in TOOLS:
        tool_main(argv[0], argv[1:])
        return
    from lightning_segcompress.cli.lightning_cli import SegCompressCLI

    SegCompressCLI(args=argv if args is not None else None)


def __getattr__(name: str):
    # SegCompressCLI / format_fit_summary live in lightning_cli (imports Lightning); kept importable from here
    if name in ("SegCompressCLI", "format_fit_summary"):
        return getattr(importlib.import_module("lightning_segcompress.cli.lightning_cli"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if __name__ == "__main__":
    main()
