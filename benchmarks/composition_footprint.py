"""How many copies of the network do the compression callbacks keep alive, and what does the process peak at?

    HF_HUB_OFFLINE=1 CUDA_VISIBLE_DEVICES= .venv/bin/python benchmarks/composition_footprint.py --label after

Runs recipes/full_pipeline.yaml in this process through the ``segcompress`` LightningCLI, with the recipe's own
``# CI smoke override:`` header line and, after it, a scale at which every technique runs: 8 epochs of a few
batches at 96x96, AGP pruning in 4 steps (epochs 2-5) with pixel-KD from the snapshot teacher, QAT from epoch 6,
DeviceBenchmark on TorchScript lite only, in-process (``isolate: false``, ``memory: false``). A probe callback
counts the networks alive (``lightning_segcompress.utils.liveness.live_networks``) and the resident memory at
fit start, at every train epoch start (after that epoch's pruning / QAT step), train batch end and train epoch
end, and at fit end; it names what holds each network (e.g. ``KnowledgeDistillation._template``).

Two counts, both roots deduplicated by shared storage (see ``live_networks``):
  networks          roots with >= half the student's parameters at fit start (a full-size copy);
  networks_current  the LightningModule (the student) and the roots with >= half the student's parameters at
                    that moment (follows pruning: copies of the pruned student count too; after the int8
                    conversion, whose weights are packed params, the last float student's threshold is kept).
Peak RSS is the process's ``ru_maxrss`` at the end (imports, data, exports and all). ``last.ckpt`` is the
recipe's ModelCheckpoint(save_last=True) file.

``--label`` names the row (e.g. ``before`` / ``after`` a change); benchmarks/results/<--name>.{md,json} keep
one row per label, a new run replacing the row with its label.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _results import RESULTS, write_results  # noqa: E402

import lightning_segcompress  # noqa: E402
from lightning_segcompress.cli import SegCompressCLI  # noqa: E402
from lightning_segcompress.utils.inspection import find_network, has_int8_modules  # noqa: E402
from lightning_segcompress.utils.liveness import current_rss_mib, live_networks, peak_rss_mib  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "full_pipeline.yaml"
SMOKE_PREFIX = "# CI smoke override:"  # as in tests/support/common.py


def _end_epoch_is_exclusive() -> bool:
    """StructuredPruning's end_epoch became exclusive with the compression protocol; the "before" row ran on code
    where it was the last step's epoch. Two steps in epochs 0..1 fit only the old, inclusive reading."""
    from lightning_segcompress.pruning import PruningSchedule

    try:
        PruningSchedule("linear", 0.5, start_epoch=0, end_epoch=1, steps=2)
    except ValueError:
        return True
    return False


_END_EXCLUSIVE = int(_end_epoch_is_exclusive())


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--label", required=True, help="the row's name, e.g. before / after")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--prune_epochs", type=int, nargs=2, default=[2, 5], help="first and last pruning epoch")
    parser.add_argument("--prune_steps", type=int, default=4)
    parser.add_argument("--qat_start", type=int, default=6)
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--train_batches", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default=None, help="run folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--name", default="composition_footprint")
    return parser.parse_args()


def smoke_override() -> list[str]:
    lines = [line for line in RECIPE.read_text().splitlines() if line.startswith(SMOKE_PREFIX)]
    if len(lines) != 1:
        raise SystemExit(f"{RECIPE} needs exactly one '{SMOKE_PREFIX}' line, found {len(lines)}")
    return shlex.split(lines[0][len(SMOKE_PREFIX):])


def recipe_config(args) -> dict:
    """The recipe with its epochs scaled down (the callbacks' epochs cannot be set on the command line)."""
    config = yaml.safe_load(RECIPE.read_text())
    config["trainer"]["max_epochs"] = args.epochs
    for callback in config["trainer"]["callbacks"]:
        name, init = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
        if name == "StructuredPruning":
            init.update(start_epoch=args.prune_epochs[0], end_epoch=args.prune_epochs[1] + _END_EXCLUSIVE,
                        steps=args.prune_steps)
        elif name == "QuantizationAwareTraining":
            last = args.epochs - 1
            init.update(start_epoch=args.qat_start, freeze_bn_epoch=min(args.qat_start + 1, last),
                        freeze_observer_epoch=min(args.qat_start + 1, last))
    return config


def cli_args(args, config_path: Path, root: Path) -> list[str]:
    """``fit`` with the recipe, its smoke override, then this benchmark's scale (later arguments win). The
    benchmark input keeps the form the smoke override gives it (``[N,C,H,W]`` or ``[H,W]``)."""
    size, override = args.image_size, smoke_override()
    input_key = "--trainer.callbacks.init_args.input_size="
    given = [token[len(input_key):] for token in override if token.startswith(input_key)]
    dims = len(yaml.safe_load(given[-1])) if given else 4
    input_size = [1, 3, size, size][-dims:]
    return ["fit", "--config", str(config_path), *override,
            f"--trainer.default_root_dir={root}", "--trainer.enable_progress_bar=false",
            f"--trainer.limit_train_batches={args.train_batches}", "--trainer.limit_val_batches=1",
            f"--data.init_args.image_size=[{size},{size}]",
            f"--data.init_args.num_train={args.train_batches * args.batch_size}",
            f"--data.init_args.num_val={args.batch_size}", f"--data.init_args.batch_size={args.batch_size}",
            f"{input_key}[{','.join(map(str, input_size))}]"]


def numel(module: torch.nn.Module) -> int:
    return sum(t.numel() for t in (*module.parameters(), *module.buffers()))


def holders(obj: object, skip: set[int], depth: int = 2) -> list[str]:
    """What references ``obj``: ``Owner.attribute`` for an object's attribute (instance attributes of Python 3.11+
    objects are referenced by the object itself, older ones through its ``__dict__``), ``closure of <function>``
    for a closure cell, ``lru_cache of <function>`` for a functools cache, ``<container> in [<its holders>]`` for a
    list / tuple / dict nobody owns (``depth`` levels up), else the referrer's type. Plain loops, no
    comprehensions: a comprehension over ``obj`` would hold it in a closure cell of its own."""
    found: set[str] = set()
    referrers = gc.get_referrers(obj)
    skip = skip | {id(referrers)}
    for ref in referrers:
        if id(ref) in skip or isinstance(ref, types.FrameType):
            continue
        if isinstance(ref, types.CellType):
            found.add(_closure_of(ref))
            continue
        named = False
        if isinstance(ref, dict):
            for owner in gc.get_referrers(ref):
                if _attributes(owner) is ref:
                    for key, value in ref.items():
                        if value is obj:
                            found.add(f"{type(owner).__name__}.{key}")
                            named = True
                elif hasattr(owner, "cache_info") and hasattr(owner, "__wrapped__"):
                    found.add(f"lru_cache of {_qualified(owner.__wrapped__)}")
                    named = True
        else:
            for key, value in (_attributes(ref) or {}).items():
                if value is obj:
                    found.add(f"{type(ref).__name__}.{key}")
                    named = True
        if named:
            continue
        if isinstance(ref, (dict, list, tuple, set)) and depth > 0:
            up = holders(ref, skip | {id(ref)}, depth - 1)
            found.add(f"{type(ref).__name__} in [{', '.join(up)}]" if up else type(ref).__name__)
        else:
            found.add(type(ref).__name__)
    del referrers
    return sorted(found)


def _closure_of(cell: types.CellType) -> str:
    names = []
    for closure in gc.get_referrers(cell):
        if isinstance(closure, tuple):
            for function in gc.get_referrers(closure):
                if isinstance(function, types.FunctionType) and function.__closure__ is closure:
                    names.append(_qualified(function))
    return f"closure of {', '.join(sorted(names))}" if names else "cell"


def _qualified(function: object) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def _attributes(obj: object) -> dict | None:
    """``obj.__dict__`` without running any of its own attribute code; None when it has none."""
    if isinstance(obj, (type, dict, list, tuple, set, types.CellType)):
        return None
    try:
        attributes = object.__getattribute__(obj, "__dict__")
    except (AttributeError, TypeError):
        return None
    return attributes if isinstance(attributes, dict) else None


class FootprintProbe(pl.Callback):
    """Counts live networks and reads the RSS at fit start, every train epoch start / batch end / epoch end and
    fit end (registered after the recipe's callbacks, so it sees what they just did)."""

    def __init__(self) -> None:
        self.samples: list[dict] = []
        self.start_params: int | None = None
        self.current: int | None = None  # half the float student's parameters, the threshold of networks_current
        self.seconds = 0.0
        self._last_counts: tuple[int, int] | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start_params = sum(p.numel() for p in find_network(pl_module).parameters())
        self.sample(trainer, pl_module, "fit_start")

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.sample(trainer, pl_module, "train_epoch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sample(trainer, pl_module, "train_batch_end")

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.sample(trainer, pl_module, "train_epoch_end")

    def on_fit_end(self, trainer, pl_module) -> None:
        self.sample(trainer, pl_module, "fit_end")

    def sample(self, trainer, pl_module, hook: str) -> None:
        started = time.perf_counter()
        student = find_network(pl_module)
        current_params = sum(p.numel() for p in student.parameters())
        if not has_int8_modules(student):  # an int8 network keeps its weights in packed params, not parameters
            self.current = current_params // 2
        full, current = self.start_params // 2, self.current
        roots = live_networks(min_params=min(full, current))
        counts = (sum(numel(r) >= full for r in roots), len(roots))
        # who holds each network: at every epoch boundary and whenever the networks alive change (it is slow)
        describe = hook != "train_batch_end" or counts != self._last_counts
        self._last_counts = counts
        skip = {id(roots)}
        described = []
        for root in roots:
            held_by = ["(the LightningModule)"] if root is pl_module else holders(root, skip) if describe else []
            described.append({"type": type(root).__name__, "elements": numel(root),
                              "is_lightning_module": root is pl_module, "held_by": held_by})
        del roots
        if not any(r["is_lightning_module"] for r in described):  # its int8 student holds (almost) no parameters
            described.append({"type": type(pl_module).__name__, "elements": numel(pl_module),
                              "is_lightning_module": True, "held_by": ["(the LightningModule)"]})
        described.sort(key=lambda r: (not r["is_lightning_module"], -r["elements"], r["held_by"]))
        self.samples.append({
            "hook": hook, "epoch": trainer.current_epoch, "step": trainer.global_step,
            "student_params": current_params, "threshold_current": current,
            "networks": sum(r["elements"] >= full for r in described),
            "networks_current": sum(r["elements"] >= current or r["is_lightning_module"] for r in described),
            "rss_mib": round(current_rss_mib(), 1), "peak_rss_mib": round(peak_rss_mib(), 1),
            "holders_described": describe, "roots": described,
        })
        self.seconds += time.perf_counter() - started


def at_max(samples: list[dict], key: str) -> dict:
    """The maximum of ``key`` and where it happens: the first sample, the epochs and the number of samples."""
    top = max(s[key] for s in samples)
    hits = [s for s in samples if s[key] == top]
    first = hits[0]
    return {"max": top, "first": {k: first[k] for k in ("hook", "epoch", "step")},
            "epochs": sorted({s["epoch"] for s in hits}), "samples": len(hits), "of": len(samples),
            "threshold_current": first["threshold_current"], "roots": first["roots"]}


def epoch_ranges(epochs: list[int]) -> str:
    parts, start = [], None
    for i, epoch in enumerate(epochs):
        start = epoch if start is None else start
        if i + 1 == len(epochs) or epochs[i + 1] != epoch + 1:
            parts.append(f"{start}" if start == epoch else f"{start}-{epoch}")
            start = None
    return ", ".join(parts)


def describe_roots(roots: list[dict], threshold: int) -> str:
    return "; ".join(f"{r['type']} {r['elements'] / 1e6:.2f}M ({', '.join(r['held_by']) or 'no referrer found'})"
                     for r in roots if r["elements"] >= threshold)


def git(*command: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *command], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def exact_command() -> str:
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES")
           if k in os.environ]
    return " ".join([*env, shlex.quote(sys.executable), *map(shlex.quote, sys.argv)])


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    root = Path(args.root) if args.root else Path(tempfile.mkdtemp(prefix=f"segcompress_footprint_{args.label}_"))
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    config_path = root / "config.yaml"
    config_path.write_text(yaml.safe_dump(recipe_config(args), sort_keys=False))
    argv = cli_args(args, config_path, root)
    probe = FootprintProbe()
    started = time.perf_counter()
    SegCompressCLI(args=argv, trainer_defaults={"callbacks": [probe]})
    seconds = time.perf_counter() - started
    gc.collect()
    checkpoints = sorted(root.glob("**/last.ckpt"))
    samples = probe.samples
    full = probe.start_params // 2
    row = {
        "label": args.label,
        "networks": at_max(samples, "networks"),
        "networks_current": at_max(samples, "networks_current"),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_first_reached": next({k: s[k] for k in ("hook", "epoch", "step")} for s in samples
                                       if s["peak_rss_mib"] >= samples[-1]["peak_rss_mib"]),
        "last_ckpt_mb": round(checkpoints[0].stat().st_size / 1e6, 2) if checkpoints else None,
        "student_params": {"fit_start": probe.start_params, "fit_end": samples[-1]["student_params"]},
        "threshold_networks": full,
        "seconds": {"fit": round(seconds, 1), "probe": round(probe.seconds, 1)},
        "code": {"package": str(Path(lightning_segcompress.__file__).resolve().parent),
                 "commit": git("rev-parse", "HEAD"),
                 "uncommitted_changes": len(git("status", "--porcelain", "--untracked-files=no").splitlines())},
        "machine": {"platform": platform.platform(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "threads": args.threads,
                    "cuda": torch.cuda.is_available(), "loadavg_at_end": os.getloadavg()},
        "command": exact_command(),
        "cli_args": argv[3:],  # after "fit --config <tmp>"
        "recipe_edits": {"max_epochs": args.epochs, "pruning_epochs": args.prune_epochs,
                         "pruning_steps": args.prune_steps, "qat_start": args.qat_start},
        "by_epoch": {str(e): {"networks": max(s["networks"] for s in samples if s["epoch"] == e),
                              "networks_current": max(s["networks_current"] for s in samples if s["epoch"] == e),
                              "rss_mib": max(s["rss_mib"] for s in samples if s["epoch"] == e)}
                     for e in sorted({s["epoch"] for s in samples})},
        "samples": samples,
    }
    if not args.root:
        shutil.rmtree(root, ignore_errors=True)
    return row


def markdown(rows: dict[str, dict]) -> str:
    lines = [
        "recipes/full_pipeline.yaml in-process through the segcompress CLI (its CI smoke override, then: "
        "see each row's command / cli_args in the JSON). Networks: live root nn.Modules with >= half the student's "
        "fit-start parameters (a full-size copy); current: the student and the roots with >= half the "
        "student's float parameters at that moment (counts the pruned student and its copies; sizes are parameter "
        "and buffer elements, int8 packed weights not included). Roots sharing all their tensors with another count "
        "once. Sampled at fit start, every train epoch start / batch end / epoch end, fit end. Peak RSS: ru_maxrss "
        "of the process at the end.",
        "",
        "| label | code | max networks alive | first at | epochs at max | max networks alive (current) | "
        "first at | peak RSS MiB | last.ckpt MB | fit s | machine |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in rows.items():
        code = f"{row['code']['commit'][:8]}" + (f" +{row['code']['uncommitted_changes']} changed"
                                                  if row["code"]["uncommitted_changes"] else "")
        n, c, m = row["networks"], row["networks_current"], row["machine"]
        lines.append(
            f"| {label} | {code} | {n['max']} | epoch {n['first']['epoch']} step {n['first']['step']} "
            f"({n['first']['hook']}) | {epoch_ranges(n['epochs'])} ({n['samples']}/{n['of']} samples) | "
            f"{c['max']} | epoch {c['first']['epoch']} step {c['first']['step']} ({c['first']['hook']}) | "
            f"{row['peak_rss_mib']:.0f} | "
            f"{row['last_ckpt_mb']} | {row['seconds']['fit']:.0f} | {m['machine']}, {m['cpus']} CPUs, torch "
            f"{m['torch']}, {m['threads']} threads |")
    for label, row in rows.items():
        n, c = row["networks"], row["networks_current"]
        by_epoch = ", ".join(f"{e}: {v['networks']}/{v['networks_current']}" for e, v in row["by_epoch"].items())
        lines += ["", f"**{label}**: `{row['command']}`",
                  f"- networks alive per epoch (full-size / current): {by_epoch}",
                  f"- at the first max ({n['max']}): {describe_roots(n['roots'], row['threshold_networks'])}"]
        if c["first"] != n["first"] or c["max"] != n["max"]:
            lines.append(f"- at the first max of current ({c['max']}): "
                         f"{describe_roots(c['roots'], c['threshold_current'])}")
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    row = run(args)
    path = RESULTS / f"{args.name}.json"
    rows = json.loads(path.read_text()).get("rows", {}) if path.exists() else {}
    rows[args.label] = row
    write_results(args.name, markdown(rows), {"name": args.name, "rows": rows})


if __name__ == "__main__":
    main()
