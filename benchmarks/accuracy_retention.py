"""How much accuracy does compressing a *converged* segmentation network cost, and which recovery keeps it?

Reproduce (resumable: run the same command again, in as many sessions as it takes, until no run is missing;
every finished baseline and run is cached, and the table is rendered from whatever exists)::

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/accuracy_retention.py --max_minutes 170

(the defaults: PhotoTextures, 1024 train / 256 val images at 64x64, 6 classes, batch 16; DeepLabV3+
(MobileNetV3-large) and Unet (resnet18) from scratch; baseline seeds 100 101, fine-tuning seeds 0 1; cache in
``~/.cache/lightning-segcompress/accuracy_retention``; result ``benchmarks/results/accuracy_retention_converged``).
``--from_json benchmarks/results/accuracy_retention_converged.json`` re-renders the tables without training.

The regime matches real use: users compress converged models.

1. **Converged baselines.** Per architecture and baseline seed, one fit of ``--max_baseline_epochs`` with the
   SegmentationModule's own schedule (AdamW, lr ``--lr``, poly decay ``(1 - step / total) ** 0.9`` over the
   *maximum* epochs) is stopped at the first epoch E >= ``--min_baseline_epochs`` at which the best val mIoU
   of the last ceil(E / 4) epochs is less than ``--plateau_points`` (0.5) mIoU points above the best val mIoU of
   the epochs before them (a plateau; the weights of epoch E are kept, and E is recorded). The baseline seed
   sets the initialisation and the training order; the mosaics are the same for every run (data seed 0).
2. **Recovery.** Every fine-tuning row trains R = ceil(``--recovery_fraction`` * E) epochs (default half the
   baseline's epochs) from the baseline weights, lr ``--finetune_lr`` with its own poly decay over the R epochs;
   compression happens at the start of epoch 0 of that fit. Pruning always removes 50 % of the MACs
   (StructuredPruning target macs, L2 importance, global, round_to 8, classifier protected).
3. **Samples.** Every (baseline seed, fine-tuning seed) pair is one paired sample (the fine-tuning seed sets
   the training order, flips and new layers); intervals are Student-t 95 % over pairs, differences paired.
   Work is ordered so that a stopped run is still useful: per network, sample 1 of every row, then sample 2 of
   every row, and so on (pairs in the order (b1, s1), (b2, s1), (b1, s2), ...).

Rows (``--rows`` takes the ids in brackets):

  [control]   control                           no compression, the same R epochs
  [control_peak] control at the peak lr         no compression, the same R epochs at the baseline's peak lr ``--lr``
                                                (the reference for the peak-lr rows: what the lr alone gives)
  [prune]     prune, no BN re-estimation, no fine-tuning
                                                the immediate damage: the baseline pruned once (core API,
                                                plan_step + prune_with_history, in eval mode), evaluated as left;
                                                deterministic given the baseline: one run per baseline, shared
                                                by all its pairs
  [prune_bn]  prune + BN re-estimation, no fine-tuning
                                                the same, then BatchNorm statistics re-estimated on 32 training
                                                batches (utils.batchnorm.reestimate_batchnorm)
  [as_left]   prune as left (no BN re-estimation) + fine-tune
                                                StructuredPruning(bn_batches=0), R epochs
  [bn_ft]     prune + BN + fine-tune            StructuredPruning (default bn_batches), R epochs
  [rewind]    prune + BN + fine-tune + LR rewind
                                                the same, fine-tuned with the baseline's peak lr ``--lr`` instead
                                                of ``--finetune_lr``: what LR rewinding (Renda et al. 2020) means
                                                when pruning after training (lr_rewind_epoch would be a no-op:
                                                the step is at epoch 0)
  [kd_kl]     prune + BN + KD pixel KL          + KnowledgeDistillation from the unpruned converged network
  [kd_cwd]    prune + BN + KD CWD               (teacher "snapshot" before compression), pixel KL / CWD
  [rewind_kd] prune + BN + KD CWD + LR rewind   both: KD CWD, fine-tuned with the baseline's peak lr
  [rewind_taylor] prune (Taylor) + BN + fine-tune + LR rewind
                                                ``rewind`` with importance="taylor" (first-order Taylor,
                                                Molchanov et al. 2019: gradients of 8 training batches) for L2
  [rewind_iter] prune iteratively (3 steps) + BN + fine-tune + LR rewind
                                                ``rewind`` with the 50 % removed in 3 linear steps at the starts
                                                of epochs 0, 1, 2 (BN re-estimated after each), fine-tuning in
                                                between, one peak-lr decay over the R epochs
  [post]      PostPruning, no BN re-estimation  StructuredPruning(bn_batches=0) + PostPruning(max_miou_drop=0.5,
  [post_bn]   PostPruning + BN re-estimation    eval_batches=8, bn_batches=0 / 8) (StructuredPruning default
                                                bn_batches), R epochs
  [budget]    budget 1 point                    StructuredPruning up to 50 % in min(4, ceil(R/2)) linear steps over
                                                the first ceil(R/2) epochs with max_miou_drop=1.0 (all validation
                                                images; an undone step is bisected by the steps after it,
                                                budget_backoff), R epochs; the achieved fraction per sample
  [int8]      best + PT2E int8                  the best fine-tuning row that removes 50 % of the MACs (by mean
                                                mIoU; ``--int8_base`` pins it) + QuantizationAwareTraining(pt2e)
                                                for the last ``--qat_epochs`` epochs; the converted int8 network
                                                is evaluated

Every row's mIoU is measured on all validation images from per-image confusion matrices; the table gives the
mean [95 % CI] over samples, the paired difference to the control and (pruning rows) to ``as_left``, and, for
the first sample alone, the paired bootstrap over validation images. A CI that covers 0 is "no measurable
difference". The goal line: is ``int8`` within 1.0 mIoU point of the control, by the mean and by the CI?

The cache (``--cache_dir``): ``baselines/<arch>-b<seed>-<hash>.pt`` (weights) + ``.json`` (the key, E, the val
curve, mIoU, MACs, seconds) per (architecture, data, size, classes, lr, baseline seed, criterion);
``runs/<arch>-<row>-b<seed>-s<seed>-<hash>.json`` per finished run (key, per-image confusion matrices, MACs,
budget summary, seconds). A key that changes (any argument the run depends on) gives a new file; nothing is
ever overwritten (delete the folder, or bump CACHE_VERSION when a row's definition changes, to redo runs).
``--max_minutes`` stops starting new work after that many minutes (a baseline or run already started finishes:
budget about 25 minutes for a baseline and 10 for a run at the defaults on 2 cores), renders what exists and lists
what is missing; the result files are rewritten after every finished run, so even a killed session leaves them
current. A failed run is reported in the table and retried by the next invocation (failures are not cached).
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from _results import RESULTS, write_results  # noqa: E402
from _stats import difference_row, mean_with_ci  # noqa: E402
from _training import fit  # noqa: E402

from lightning_segcompress import PhotoTexturesDataModule, SegmentationModule  # noqa: E402
from lightning_segcompress.callbacks import (  # noqa: E402
    KnowledgeDistillation,
    PostPruning,
    QuantizationAwareTraining,
    StructuredPruning,
)
from lightning_segcompress.pruning import (  # noqa: E402
    PruningConfig,
    build_importance,
    layer_widths,
    measure,
    plan_step,
    prune_with_history,
)
from lightning_segcompress.utils import count_macs, example_input, find_classifier_layers  # noqa: E402
from lightning_segcompress.utils.statistics import (  # noqa: E402
    miou_from_confusion,
    paired_bootstrap,
    per_class_iou,
    per_image_confusion,
)

ARCHITECTURES = {
    "DeepLabV3+ (mnv3-large)": {"class_path": "segmentation_models_pytorch.DeepLabV3Plus",
                                "init_args": {"encoder_name": "tu-mobilenetv3_large_100", "encoder_weights": None}},
    "Unet (resnet18)": {"class_path": "segmentation_models_pytorch.Unet",
                        "init_args": {"encoder_name": "resnet18", "encoder_weights": None}},
}
AMOUNT = 0.5  # fraction of the MACs every pruning row removes: 2x fewer MACs
GOAL_POINTS = 1.0  # the goal: int8 at most this many mIoU points below the control
NO_FT_BN_BATCHES = 32  # training batches the prune_bn row re-estimates BatchNorm statistics on
CACHE_VERSION = 1  # bump when what a row does changes: every cached run is then redone
ROWS = {  # id: table name
    "control": "control",
    "control_peak": "control at the peak lr",
    "prune": "prune, no BN re-estimation, no fine-tuning",
    "prune_bn": "prune + BN re-estimation, no fine-tuning",
    "as_left": "prune as left (no BN re-estimation) + fine-tune",
    "bn_ft": "prune + BN + fine-tune",
    "rewind": "prune + BN + fine-tune + LR rewind",
    "kd_kl": "prune + BN + KD pixel KL",
    "kd_cwd": "prune + BN + KD CWD",
    "rewind_kd": "prune + BN + KD CWD + LR rewind",
    "rewind_taylor": "prune (Taylor) + BN + fine-tune + LR rewind",
    "rewind_iter": "prune iteratively (3 steps) + BN + fine-tune + LR rewind",
    "post": "PostPruning, no BN re-estimation",
    "post_bn": "PostPruning + BN re-estimation",
    "budget": "budget 1 point",
    "int8": "best + PT2E int8",
}
NO_TRAINING = ("prune", "prune_bn")  # rows evaluated without any fine-tuning
PRUNING = [r for r in ROWS if r not in ("control", "control_peak")]  # rows compared with as_left too
INT8_BASES = ("as_left", "bn_ft", "rewind", "kd_kl", "kd_cwd", "rewind_kd", "rewind_taylor", "rewind_iter", "post",
              "post_bn")  # fine-tuning rows
KD_LOSSES = {"kd_kl": {"pixel_kl": {}}, "kd_cwd": {"cwd": {}}, "rewind_kd": {"cwd": {}}}
PEAK_LR_ROWS = ("control_peak", "rewind", "rewind_kd", "rewind_taylor", "rewind_iter")
PRUNING_OVERRIDES = {  # rows that prune differently from the default (L2, one step at epoch 0)
    "rewind_taylor": {"importance": "taylor"},
    "rewind_iter": {"schedule": "linear", "steps": 3, "start_epoch": 0, "end_epoch": 3},
}  # fine-tuned at the baseline's peak lr (LR rewinding, after training)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="rows: " + "; ".join(f"{k} = {v}" for k, v in ROWS.items()))
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=list(ARCHITECTURES))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS),
                        help="row ids to run (control always runs)")
    parser.add_argument("--baseline_seeds", type=int, nargs="+", default=[100, 101])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tuning seeds")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--num_train", type=int, default=1024)
    parser.add_argument("--num_val", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=0.003, help="baseline peak lr (and the rewind row's)")
    parser.add_argument("--finetune_lr", type=float, default=0.001)
    parser.add_argument("--min_baseline_epochs", type=int, default=20)
    parser.add_argument("--max_baseline_epochs", type=int, default=80)
    parser.add_argument("--plateau_points", type=float, default=0.5,
                        help="stop the baseline when its last quarter gains less than this (mIoU points)")
    parser.add_argument("--recovery_fraction", type=float, default=0.5,
                        help="recovery epochs = ceil(fraction x baseline epochs)")
    parser.add_argument("--qat_epochs", type=int, default=2)
    parser.add_argument("--int8_base", choices=INT8_BASES, help="the row int8 builds on (default: the best)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache_dir", type=Path,
                        default=Path("~/.cache/lightning-segcompress/accuracy_retention").expanduser())
    parser.add_argument("--max_minutes", type=float, default=None,
                        help="start no new baseline or run after this many minutes; render what exists")
    parser.add_argument("--name", default="accuracy_retention_converged",
                        help="result file name in benchmarks/results")
    parser.add_argument("--from_json", help="re-render the tables of this result file instead of training")
    args = parser.parse_args(argv)
    if not 1 <= args.min_baseline_epochs <= args.max_baseline_epochs:
        parser.error("need 1 <= --min_baseline_epochs <= --max_baseline_epochs.")
    if not 0 < args.recovery_fraction:
        parser.error("--recovery_fraction must be > 0.")
    if args.qat_epochs < 1:
        parser.error("--qat_epochs must be >= 1.")
    args.cache_dir = Path(args.cache_dir).expanduser()
    return args


# ---- data ---------------------------------------------------------------------------------------------------------


class PhotoTextures(PhotoTexturesDataModule):
    """The same mosaics for every run (data seed 0); only the training order follows :attr:`shuffle_seed`."""

    shuffle_seed = 0

    def train_dataloader(self):
        loader = super().train_dataloader()
        loader.generator.manual_seed(self.shuffle_seed)  # the RandomSampler draws from this very generator
        return loader


def data_module(args) -> PhotoTextures:
    return PhotoTextures(num_classes=args.classes, image_size=(args.size, args.size), num_train=args.num_train,
                         num_val=args.num_val, num_test=args.num_val, batch_size=args.batch_size, seed=0)


def data_key(args) -> dict:
    return {"dataset": "photo_textures", "num_train": args.num_train, "num_val": args.num_val, "size": args.size,
            "classes": args.classes, "batch_size": args.batch_size, "data_seed": 0}


# ---- the cache ----------------------------------------------------------------------------------------------------


def digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data)))


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ---- the baseline -------------------------------------------------------------------------------------------------


def plateaued(curve: list[float], min_epochs: int, points: float) -> bool:
    """After ``len(curve)`` epochs: is the best val mIoU of the last ceil(E/4) epochs less than ``points`` mIoU
    points above the best one before them? Never before ``min_epochs`` (nor at E = 1: nothing to compare)."""
    epochs = len(curve)
    if epochs < max(min_epochs, 2):
        return False
    quarter = math.ceil(epochs / 4)
    return (max(curve[-quarter:]) - max(curve[:-quarter])) * 100 < points


class PlateauStop(pl.Callback):
    """Records val mIoU after every epoch and stops the fit at the plateau (see :func:`plateaued`)."""

    def __init__(self, min_epochs: int, points: float) -> None:
        self.min_epochs, self.points = min_epochs, points
        self.curve: list[float] = []
        self.plateau = False

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.curve.append(float(trainer.callback_metrics["val_miou"]))
        print(f"  baseline epoch {len(self.curve) - 1}: val mIoU {self.curve[-1]:.4f}", flush=True)
        if plateaued(self.curve, self.min_epochs, self.points):
            self.plateau = True
            trainer.should_stop = True


def baseline_key(args, arch: str, seed: int) -> dict:
    return {"kind": "baseline", "version": CACHE_VERSION, "architecture": arch, "spec": ARCHITECTURES[arch],
            "data": data_key(args), "lr": args.lr, "optimizer": "adamw", "poly_power": 0.9, "seed": seed,
            "criterion": {"min_epochs": args.min_baseline_epochs, "max_epochs": args.max_baseline_epochs,
                          "plateau_points": args.plateau_points}}


def baseline_paths(args, arch: str, seed: int) -> tuple[Path, Path, dict]:
    key = baseline_key(args, arch, seed)
    stem = args.cache_dir / "baselines" / f"{slug(arch)}-b{seed}-{digest(key)}"
    return stem.with_suffix(".pt"), stem.with_suffix(".json"), key


def cached_baseline(args, arch: str, seed: int) -> dict | None:
    """The baseline's sidecar (with ``hash`` and ``weights_file``) if weights and sidecar are in the cache."""
    weights, sidecar, key = baseline_paths(args, arch, seed)
    meta = read_json(sidecar)
    if meta is None or meta.get("key") != key or not weights.is_file():
        return None
    return {**meta, "hash": digest(key), "weights_file": str(weights)}


def train_baseline(args, arch: str, seed: int, data: PhotoTextures, val_batches: list, root: Path) -> dict:
    weights_file, sidecar, key = baseline_paths(args, arch, seed)
    started = time.time()
    stop = PlateauStop(args.min_baseline_epochs, args.plateau_points)
    data.shuffle_seed = seed
    _, model = fit(args, ARCHITECTURES[arch], args.max_baseline_epochs, seed, args.lr, root, [stop], data=data)
    confusion = per_image_confusion(model.net, val_batches, args.classes)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    meta = {"key": key, "epochs": len(stop.curve), "plateau": stop.plateau, "val_curve": stop.curve,
            "miou": miou_from_confusion(confusion),
            "macs": count_macs(model.net.eval(), torch.zeros(1, 3, args.size, args.size)),
            "seconds": time.time() - started, "confusion": confusion.tolist(), "torch": torch.__version__}
    atomic_write(weights_file, lambda p: torch.save(state, p))
    write_json(sidecar, meta)
    return {**meta, "hash": digest(key), "weights_file": str(weights_file)}


def recovery_epochs(args, baseline: dict) -> int:
    return max(1, math.ceil(args.recovery_fraction * baseline["epochs"]))


# ---- the rows -----------------------------------------------------------------------------------------------------


def default_bn_batches() -> int | None:
    """StructuredPruning's default ``bn_batches`` (None where the installed package has no such argument)."""
    parameter = inspect.signature(StructuredPruning).parameters.get("bn_batches")
    return None if parameter is None else parameter.default


def pruning(args, **overrides) -> StructuredPruning:
    kwargs = dict(amount=AMOUNT, target="macs", importance="l2", start_epoch=0, input_size=[args.size, args.size])
    return StructuredPruning(**{**kwargs, **overrides})


def budget_schedule(recovery: int) -> dict:
    """Linear steps over the first half of the recovery epochs; the budget judges the last step at the start of
    the fit's last epoch, so that epoch must come after it."""
    end = max(1, math.ceil(recovery / 2))
    if end >= recovery:
        raise ValueError(f"the budget row needs >= 2 recovery epochs (its last step must be fine-tuned and judged "
                         f"before the last epoch), got {recovery}.")
    return {"schedule": "linear", "steps": min(4, end), "start_epoch": 0, "end_epoch": end}


def qat_start(args, recovery: int) -> int:
    start = recovery - args.qat_epochs
    if start < 1:
        raise ValueError(f"the int8 row needs more recovery epochs ({recovery}) than --qat_epochs ({args.qat_epochs}):"
                         " pruning happens at epoch 0, QAT starts after it.")
    return start


def row_callbacks(args, row: str, recovery: int, base: str | None = None) -> tuple[list, float]:
    """The callbacks and the learning rate of a fine-tuning row."""
    lr = args.lr if row in PEAK_LR_ROWS else args.finetune_lr
    if row in ("control", "control_peak"):
        return [], lr
    if row == "as_left":
        return [pruning(args, bn_batches=0)], lr
    if row in ("bn_ft", "rewind", *PRUNING_OVERRIDES):
        return [pruning(args, **PRUNING_OVERRIDES.get(row, {}))], lr
    if row in KD_LOSSES:
        return [pruning(args), KnowledgeDistillation(teacher="snapshot", snapshot_at="before_compression",
                                                     losses=KD_LOSSES[row])], lr
    if row in ("post", "post_bn"):
        bn = row == "post_bn"
        return [pruning(args, **({} if bn else {"bn_batches": 0})),
                PostPruning(max_group_miou_drop=0.5, eval_batches=8, bn_batches=8 if bn else 0)], lr
    if row == "budget":
        return [pruning(args, **budget_schedule(recovery), max_miou_drop=1.0, eval_batches=None)], lr
    if row == "int8":
        callbacks, lr = row_callbacks(args, base, recovery)
        return [*callbacks, QuantizationAwareTraining(backend="pt2e", start_epoch=qat_start(args, recovery),
                                                      input_size=[args.size, args.size])], lr
    raise ValueError(row)


def run_key(args, baseline: dict, row: str, seed: int, base: str | None) -> dict:
    key = {"kind": "run", "version": CACHE_VERSION, "baseline": baseline["hash"], "row": row, "amount": AMOUNT,
           "importance": "l2"}
    if row in PRUNING_OVERRIDES:
        key.update(PRUNING_OVERRIDES[row])
    if row == "prune":
        return key  # deterministic given the baseline
    key["seed"] = seed
    if row == "prune_bn":
        return {**key, "bn_batches": NO_FT_BN_BATCHES}
    key.update(recovery_epochs=recovery_epochs(args, baseline), finetune_lr=args.finetune_lr, lr=args.lr,
               bn_batches_default=default_bn_batches())
    if row == "int8":
        key.update(base=base, qat_epochs=args.qat_epochs)
    if row == "budget":
        key["budget_backoff"] = True  # undone steps are bisected (runs without this key stopped at the first)
    return key


def run_path(args, arch: str, baseline: dict, row: str, seed: int, base: str | None) -> Path:
    key = run_key(args, baseline, row, seed, base)
    name = f"{slug(arch)}-{row}{'-' + base if base else ''}-b{baseline['key']['seed']}"
    name += f"-s{seed}" if "seed" in key else ""
    return args.cache_dir / "runs" / f"{name}-{digest(key)}.json"


def cached_run(args, arch, baseline, row, seed, base) -> dict | None:
    record = read_json(run_path(args, arch, baseline, row, seed, base))
    if record is None or record.get("key") != run_key(args, baseline, row, seed, base):
        return None
    return record


def load_baseline(args, arch: str, baseline: dict) -> SegmentationModule:
    model = SegmentationModule(ARCHITECTURES[arch], num_classes=args.classes, lr=args.lr)
    model.load_state_dict(torch.load(baseline["weights_file"], map_location="cpu", weights_only=True))
    return model


def prune_without_training(args, network: torch.nn.Module) -> None:
    """One step of what StructuredPruning(amount=0.5, macs, l2) at epoch 0 does, through the core API, in eval mode
    (so that nothing, not even a tracing forward, touches the BatchNorm statistics)."""
    settings = pruning(args)  # the callback's defaults: round_to, global ranking, layer floor, tolerance, seed
    network.eval()
    example = example_input(network, size=(args.size, args.size), batch_size=1)
    config = PruningConfig(ignored_layers=sorted(find_classifier_layers(network, example)),
                           round_to=settings.round_to, global_pruning=settings.global_pruning,
                           max_layer_fraction=settings.max_layer_fraction, reference_widths=layer_widths(network),
                           tolerance=settings.rel_tolerance)
    reference = measure(network, example)["macs"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed + 1)  # as the callback seeds step 1
        plan = plan_step(network, example, build_importance("l2"), "macs", AMOUNT, reference, config)
    if not plan.within_tolerance:
        raise RuntimeError(f"the closest plan removes {plan.achieved_fraction:.3f} of the MACs, not {AMOUNT}.")
    prune_with_history(network, plan.history, example)


def run(args, arch: str, baseline: dict, row: str, seed: int, base: str | None, data: PhotoTextures,
        val_batches: list, root: Path) -> dict:
    started = time.time()
    size = (1, 3, args.size, args.size)
    extra: dict = {}
    if row in NO_TRAINING:
        network = load_baseline(args, arch, baseline).net
        prune_without_training(args, network)
        if row == "prune_bn":
            from lightning_segcompress.utils.batchnorm import reestimate_batchnorm

            pl.seed_everything(seed, verbose=False)
            data.shuffle_seed = seed
            bn = reestimate_batchnorm(network, (images for images, _ in data.train_dataloader()),
                                      max_batches=NO_FT_BN_BATCHES)
            extra["bn"] = {"layers": bn.layers, "batches": bn.batches, "seconds": bn.seconds}
    else:
        recovery = recovery_epochs(args, baseline)
        callbacks, lr = row_callbacks(args, row, recovery, base)
        weights = torch.load(baseline["weights_file"], map_location="cpu", weights_only=True)
        data.shuffle_seed = seed
        fit_miou, model = fit(args, ARCHITECTURES[arch], recovery, seed, lr, root, callbacks, weights, data=data,
                              trainer_args={"num_sanity_val_steps": 0, "check_val_every_n_epoch": recovery})
        network = model.net
        extra["fit_val_miou"] = fit_miou
        for callback in callbacks:
            if isinstance(callback, StructuredPruning):
                extra["pruning_records"] = [{k: r.get(k) for k in ("step", "epoch", "achieved_fraction", "undone")}
                                            for r in callback.records]
                if callback.budget is not None:
                    summary = callback.budget.summary()
                    extra["budget"] = {"achieved_fraction": summary["achieved_fraction"],
                                       "stopped_at_step": summary["stopped_at_step"], "checks": summary["checks"]}
            if isinstance(callback, PostPruning):
                groups = [g for step in callback.steps for g in step["groups"]]
                extra["post_pruning"] = {"groups": len(groups), "undone": sum(g["undone"] for g in groups)}
    confusion = per_image_confusion(network, val_batches, args.classes)
    try:
        network.eval()
        macs = count_macs(network, torch.zeros(*size))
    except Exception as err:  # noqa: BLE001 - an int8 graph may not be countable; its architecture is its base's
        macs, extra["macs_error"] = None, f"{type(err).__name__}: {str(err)[:200]}"
    return {"key": run_key(args, baseline, row, seed, base), "architecture": arch, "row": row, "base": base,
            "baseline_seed": baseline["key"]["seed"], "seed": seed, "miou": miou_from_confusion(confusion),
            "confusion": confusion.tolist(), "macs": macs, "seconds": time.time() - started,
            "torch": torch.__version__, **extra}


# ---- the work loop ------------------------------------------------------------------------------------------------


def sample_pairs(args) -> list[tuple[int, int]]:
    """(baseline seed, fine-tuning seed) pairs, every baseline once before any gets a second fine-tuning seed."""
    return [(b, s) for s in args.seeds for b in args.baseline_seeds]


def label(row: str, base: str | None) -> str:
    return f"{ROWS[row]} (on {ROWS[base]})" if base else ROWS[row]




def main(argv=None) -> None:
    args = parse_args(argv)
    if args.from_json:
        data = json.loads(Path(args.from_json).read_text())
        report(argparse.Namespace(**data["args"]), data["results"], data["session"])
        return
    torch.set_num_threads(args.threads)
    started = time.time()
    deadline = None if args.max_minutes is None else started + 60 * args.max_minutes
    rows = ["control"] + [r for r in ROWS if r in args.rows and r != "control"]
    data = data_module(args)
    data.setup("fit")
    val_batches = [(images, masks) for images, masks in data.val_dataloader()]
    results: dict[str, dict] = {}
    session = {"seconds": 0.0, "baselines": 0, "runs": 0, "failed": [], "missing": [],
               "bn_batches_default": default_bn_batches()}
    errors: dict[str, dict[str, tuple[str, str]]] = {}  # arch -> row label -> (row id, the last error)

    def out_of_time() -> bool:
        return deadline is not None and time.time() > deadline

    def render(final: bool = False) -> None:
        session["seconds"] = time.time() - started
        report(args, results, session, quiet=not final)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for arch in args.architectures:
            baselines: dict[int, dict | None] = {}
            done: dict[str, dict[tuple[int, int], dict]] = {}  # row label -> (baseline seed, seed) -> record
            errors[arch] = {}
            results[arch] = {"baselines": {}, "rows": {}}

            def update(arch=arch, baselines=baselines, done=done) -> None:
                results[arch] = {"baselines": {b: trim_baseline(m) for b, m in baselines.items()},
                                 "rows": summarise(args, done, baselines, errors[arch])}

            for b, s in sample_pairs(args):
                if b not in baselines:
                    baselines[b] = cached_baseline(args, arch, b)
                    if baselines[b] is None and not out_of_time():
                        print(f"{arch} | training baseline seed {b} ({time.time() - started:.0f} s)", flush=True)
                        baselines[b] = train_baseline(args, arch, b, data, val_batches, root / f"baseline-{b}")
                        session["baselines"] += 1
                        print(f"{arch} | baseline {b}: {baselines[b]['epochs']} epochs, val mIoU "
                              f"{baselines[b]['miou']:.4f} ({time.time() - started:.0f} s)", flush=True)
                        update()
                        render()
                baseline = baselines[b]
                for row in rows:
                    if baseline is None:
                        session["missing"].append(f"{arch} | {row} | sample {b}/{s} (baseline {b} not trained)")
                        continue
                    base = None
                    if row == "int8":
                        base = choose_int8_base(args, done, baselines)
                        if base is None:
                            session["missing"].append(f"{arch} | int8 | sample {b}/{s} (no fine-tuning row at 2x "
                                                      "fewer MACs to build on)")
                            continue
                    name = label(row, base)
                    record = cached_run(args, arch, baseline, row, s, base)
                    if record is None:
                        if out_of_time():
                            session["missing"].append(f"{arch} | {row}{' on ' + base if base else ''} | sample "
                                                      f"{b}/{s}")
                            continue
                        try:
                            record = run(args, arch, baseline, row, s, base, data, val_batches,
                                         root / f"{row}-{b}-{s}")
                        except Exception as err:  # noqa: BLE001 - a failed run is reported, the others still run
                            message = f"{type(err).__name__}: {str(err)[:300]}"
                            session["failed"].append(f"{arch} | {name} | sample {b}/{s}: {message}")
                            errors[arch][name] = (row, message)
                            print(f"{arch} | {name} | {b}/{s}: FAILED {message}", flush=True)
                            continue
                        write_json(run_path(args, arch, baseline, row, s, base), record)
                        session["runs"] += 1
                        print(f"{arch} | {name} | {b}/{s}: mIoU {record['miou']:.4f}, {record['seconds']:.0f} s "
                              f"({time.time() - started:.0f} s)", flush=True)
                        done.setdefault(name, {})[(b, s)] = record
                        update()
                        render()  # the result files always hold what is done so far
                    else:
                        done.setdefault(name, {})[(b, s)] = record
            update()
    render(final=True)
    if session["missing"]:
        print(f"\n{len(session['missing'])} runs missing (run the same command again to compute them):")
        print("\n".join(f"  {m}" for m in session["missing"]))
    else:
        print("\nNo run missing: the table is complete.")


# ---- summaries ----------------------------------------------------------------------------------------------------


def trim_baseline(meta: dict | None) -> dict | None:
    """A baseline's sidecar for the result file (without its confusion matrices)."""
    if meta is None:
        return None
    return {k: v for k, v in meta.items() if k not in ("confusion", "key")} | {"hash": meta["hash"]}


def macs_removed(runs: dict, baselines: dict) -> float | None:
    removed = [1 - r["macs"] / baselines[p[0]]["macs"] for p, r in runs.items() if r.get("macs")]
    return statistics.mean(removed) if removed else None


def choose_int8_base(args, done: dict, baselines: dict) -> str | None:
    """The fine-tuning pruning row that removes 50 % of the MACs (within 3 %) with the best mean mIoU, over the
    samples all such rows share (each row's own samples when they share none); ``--int8_base`` pins it."""
    if args.int8_base:
        return args.int8_base
    candidates = [r for r in INT8_BASES if done.get(ROWS[r]) and (macs_removed(done[ROWS[r]], baselines) or 0)
                  >= AMOUNT * 0.97]
    if not candidates:
        return None
    common = set.intersection(*(set(done[ROWS[r]]) for r in candidates))

    def score(r: str) -> float:
        runs = done[ROWS[r]]
        return statistics.mean(runs[p]["miou"] for p in (common or runs))

    return max(candidates, key=score)


def summarise(args, done: dict, baselines: dict, errors: dict[str, tuple[str, str]]) -> dict:
    """Per row label: samples, mean [CI], paired differences, bootstrap, MACs removed, seconds."""
    order = {p: i for i, p in enumerate(sample_pairs(args))}
    ranked = lambda ps: sorted(ps, key=lambda p: order.get(p, len(order)))  # noqa: E731
    control = done.get(ROWS["control"], {})
    as_left = done.get(ROWS["as_left"], {})

    def paired(reference: dict, runs: dict) -> tuple[list, list, list]:
        pairs = ranked([p for p in runs if p in reference])
        return pairs, [reference[p]["miou"] for p in pairs], [runs[p]["miou"] for p in pairs]

    out: dict[str, dict] = {}
    for name, runs in done.items():
        samples = ranked(runs)
        first = runs[samples[0]]
        row = first["row"]
        values = [runs[p]["miou"] for p in samples]
        # a run shared by several pairs (the deterministic prune row: one per baseline) counts once in the row's
        # own mean [CI] and seconds; the paired differences below still use every pair
        unique = {digest(runs[p]["key"]): runs[p] for p in samples}
        s = {"row": row, "base": first.get("base"), "n": len(unique), "pairs": len(samples),
             "samples": [f"{b}/{seed}" for b, seed in samples], "per_sample": values,
             "miou": mean_with_ci([r["miou"] for r in unique.values()], 2, 100),
             "seconds": statistics.mean(r["seconds"] for r in unique.values()),
             "compute_seconds": sum(r["seconds"] for r in unique.values())}
        if row != "control" and control:
            pairs, a, c = paired(control, runs)
            if pairs:
                s["vs_control"] = difference_row(a, c, 2, 100)
                boot = paired_bootstrap(control[pairs[0]]["confusion"], runs[pairs[0]]["confusion"])
                s["bootstrap_vs_control"] = {"sample": f"{pairs[0][0]}/{pairs[0][1]}", "estimate": boot.estimate,
                                             "low": boot.low, "high": boot.high, "verdict": boot.verdict}
        if row in PRUNING and row != "as_left" and as_left:
            pairs, a, c = paired(as_left, runs)
            if pairs:
                s["vs_as_left"] = difference_row(a, c, 2, 100)
        if row == "int8":
            pairs, a, c = paired(done.get(ROWS[s["base"]], {}), runs)
            if pairs:
                s["vs_float_base"] = difference_row(a, c, 2, 100)
        s["macs_removed"] = macs_removed(runs, baselines)
        if any("budget" in runs[p] for p in samples):
            s["budget_fraction"] = [runs[p].get("budget", {}).get("achieved_fraction") for p in samples]
        if any("post_pruning" in runs[p] for p in samples):
            s["post_pruning_undone"] = [runs[p].get("post_pruning") for p in samples]
        s["per_class_iou_first"] = [float(v) for v in per_class_iou(first["confusion"])]
        if name in errors:
            s["error"] = errors[name][1]
        out[name] = s
    for name, (row, message) in errors.items():  # rows none of whose runs has finished
        out.setdefault(name, {"row": row, "error": message})
    return dict(sorted(out.items(), key=lambda kv: (list(ROWS).index(kv[1]["row"]), kv[0])))


# ---- the report ---------------------------------------------------------------------------------------------------


def cell(d: dict | None) -> str:
    """A paired difference and its verdict (just the number with one sample: there is no interval)."""
    if not d:
        return ""
    return d["text"] if d["n"] == 1 else f"{d['text']} {d['verdict']}"


def report(args, results: dict, session: dict, quiet: bool = False) -> None:
    """Render the tables; ``quiet`` writes the result files without printing them (after every new run)."""
    lines = [header(args, results, session), ""]
    for arch, r in results.items():
        lines += [f"### {arch}", ""]
        for seed, b in sorted(r["baselines"].items(), key=lambda kv: int(kv[0])):
            if b is None:
                lines.append(f"- baseline seed {seed}: not trained yet")
                continue
            lines.append(f"- baseline seed {seed}: E = {b['epochs']} epochs ("
                         f"{'plateau' if b['plateau'] else 'no plateau: --max_baseline_epochs reached'}), val mIoU "
                         f"{100 * b['miou']:.2f}, {b['macs'] / 1e6:.1f} M MACs, {b['seconds']:.0f} s; recovery "
                         f"R = {recovery_epochs(args, b)} epochs; val mIoU curve (points): "
                         + " ".join(f"{100 * v:.1f}" for v in b["val_curve"]))
        lines += ["", "| row | n | val mIoU (points) mean [95% CI] | vs control, paired | vs prune as left + "
                  "fine-tune, paired | bootstrap vs control (1 sample) | MACs removed | s / run |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, s in r["rows"].items():
            if "miou" not in s:
                lines.append(f"| {name} | 0 | failed: {s['error'][:200]} | | | | | |")
                continue
            boot = s.get("bootstrap_vs_control")
            boot_text = (f"{boot['estimate']:+.2f} [{boot['low']:+.2f}, {boot['high']:+.2f}] {boot['verdict']} "
                         f"(sample {boot['sample']})") if boot else ""
            macs = "" if s["macs_removed"] is None else f"{s['macs_removed']:.1%}"
            if s.get("budget_fraction"):
                macs = "achieved " + ", ".join("?" if f is None else f"{f:.1%}" for f in s["budget_fraction"])
            if s["row"] == "int8":
                base = r["rows"].get(ROWS[s["base"]], {})
                if s["macs_removed"] is None and base.get("macs_removed") is not None:
                    macs = f"{base['macs_removed']:.1%} (its float row's)"
                macs += " + int8"
            error = f" (a run failed: {s['error'][:120]})" if s.get("error") else ""
            n = str(s["n"]) if s["n"] == s.get("pairs", s["n"]) else f"{s['n']} (in {s['pairs']} pairs)"
            lines.append(f"| {name}{error} | {n} | {s['miou']} | {cell(s.get('vs_control'))} | "
                         f"{cell(s.get('vs_as_left'))} | {boot_text} | {macs} | {s['seconds']:.0f} |")
        lines += ["", *goal_lines(r["rows"]), ""]
        extra = [f"- {name} minus its float row, paired: {cell(s['vs_float_base'])}"
                 for name, s in r["rows"].items() if s.get("vs_float_base")]
        extra += comparison_lines(r["rows"])
        extra += [f"- {name}: PostPruning held back " + ", ".join(f"{p['undone']} of {p['groups']}" if p else "?"
                                                                  for p in s["post_pruning_undone"])
                  + " planned groups (per sample)" for name, s in r["rows"].items() if s.get("post_pruning_undone")]
        lines += ["Also:", *extra, ""] if extra else []
    if session.get("failed"):
        lines += ["Failed runs (not cached; retried by the next invocation):", "",
                  *[f"- {m}" for m in session["failed"]], ""]
    if session.get("missing"):
        lines += [f"Missing runs ({len(session['missing'])}; run the same command again to compute them):", "",
                  *[f"- {m}" for m in session["missing"]], ""]
    text = "\n".join(lines)
    data = json.loads(json.dumps({"args": vars(args), "results": results, "session": session}, default=str))
    if quiet:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"{args.name}.md").write_text(text + "\n")
        (RESULTS / f"{args.name}.json").write_text(json.dumps(data, indent=1))
    else:
        write_results(args.name, text, data)


COMPARISONS = [  # (row, reference): what one recovery option adds, paired by sample
    ("prune_bn", "prune"), ("bn_ft", "as_left"), ("rewind", "bn_ft"), ("kd_kl", "bn_ft"), ("kd_cwd", "bn_ft"),
    ("rewind_kd", "rewind"), ("rewind_taylor", "rewind"), ("rewind_iter", "rewind"), ("post_bn", "post"),
    ("control_peak", "control"), ("rewind", "control_peak"), ("rewind_taylor", "control_peak"),
    ("int8", "control_peak")]


def comparison_lines(rows: dict) -> list[str]:
    """Paired differences between rows that differ in one recovery option, from the rows' per-sample values."""
    by_row = {s["row"]: s for s in rows.values() if "per_sample" in s and not s.get("base")}
    for s in rows.values():  # the int8 row, on whichever base it was built
        if "per_sample" in s and s.get("base"):
            by_row.setdefault(s["row"], s)
    lines = []
    for row, reference in COMPARISONS:
        if row not in by_row or reference not in by_row:
            continue
        ours = dict(zip(by_row[row]["samples"], by_row[row]["per_sample"]))
        theirs = dict(zip(by_row[reference]["samples"], by_row[reference]["per_sample"]))
        common = [p for p in ours if p in theirs]
        if common:
            d = difference_row([theirs[p] for p in common], [ours[p] for p in common], 2, 100)
            lines.append(f"- {ROWS[row]} minus {ROWS[reference]}, paired: {cell(d)} (n={d['n']})")
    return lines


def goal_lines(rows: dict) -> list[str]:
    goal = f"**Goal: <= {GOAL_POINTS:.1f} mIoU point below control at 2x fewer MACs + int8.**"
    lines = []
    for name, s in rows.items():
        if s.get("row") != "int8" or "vs_control" not in s:
            continue
        d = s["vs_control"]
        by_mean = "meets it" if d["mean"] >= -GOAL_POINTS else "misses it"
        if d["low"] is None:
            by_ci = "no interval (n=1)"
        elif d["low"] >= -GOAL_POINTS:
            by_ci = f"meets it (the whole interval is above -{GOAL_POINTS:.1f})"
        elif d["high"] < -GOAL_POINTS:
            by_ci = f"misses it (the whole interval is below -{GOAL_POINTS:.1f})"
        else:
            by_ci = f"undecided (the interval contains -{GOAL_POINTS:.1f})"
        macs = s.get("macs_removed")
        macs_text = "" if macs is None else f"; MACs removed {macs:.1%}" + (
            "" if macs >= AMOUNT * 0.97 else f" (short of {AMOUNT:.0%})")
        lines.append(f"{goal} {name}: {d['text']} points vs control (n={d['n']}){macs_text}; by the mean: {by_mean}; "
                     f"by the 95 % CI: {by_ci}.")
    return lines or [f"{goal} No int8 result yet."]


def header(args, results: dict, session: dict) -> str:
    compute = sum(b["seconds"] for r in results.values() for b in r["baselines"].values() if b) + \
        sum(s.get("compute_seconds", 0) for r in results.values() for s in r["rows"].values())
    return (
        f"**Regime.** PhotoTextures, {args.num_train} train / {args.num_val} held-out val images, {args.size}x"
        f"{args.size}, {args.classes} classes, batch {args.batch_size}; networks from scratch. **Baselines** (seeds "
        f"{args.baseline_seeds}): AdamW lr {args.lr}, SegmentationModule's poly decay (power 0.9) over "
        f"--max_baseline_epochs {args.max_baseline_epochs}, stopped at the first epoch E >= {args.min_baseline_epochs}"
        f" at which the best val mIoU of the last ceil(E/4) epochs is less than {args.plateau_points} points above "
        f"the best before them (epoch-E weights kept; E and mIoU per baseline below). **Recovery**: every "
        f"fine-tuning row trains R = ceil({args.recovery_fraction} x E) epochs from the baseline weights, lr "
        f"{args.finetune_lr} with poly decay over R (the LR-rewind rows: the baseline's lr {args.lr} instead, i.e. "
        f"rewound to the start of training, as Renda et al.'s rewinding means when pruning after training; "
        f"lr_rewind_epoch would be a no-op with the step at epoch 0); compression at the start of epoch 0. "
        f"Pruning: {AMOUNT:.0%} of MACs, L2, global, round_to 8, classifier protected; KD: from the unpruned "
        f"baseline (snapshot before compression), default loss weights and temperatures; BN re-estimation: "
        f"StructuredPruning's default bn_batches ({session.get('bn_batches_default')}) training batches, "
        f"{NO_FT_BN_BATCHES} for the no-fine-tuning row; budget row: min(4, ceil(R/2)) linear steps over the first "
        f"ceil(R/2) epochs, max_miou_drop 1.0 on all val images; PostPruning max_miou_drop 0.5 per group on 8 val "
        f"batches; int8: QAT PT2E (XNNPACK) for the last {args.qat_epochs} epochs on top of the best fine-tuning "
        f"row at 2x fewer MACs (by mean mIoU), the converted int8 network evaluated. **Samples**: every (baseline "
        f"seed, fine-tuning seed in {args.seeds}) pair; mean [95 % Student-t CI] over samples, differences in mIoU "
        f"points paired by sample (a CI covering 0: no measurable difference); n: distinct runs; bootstrap: 1000 "
        f"paired resamples of the val images of the first sample; the no-fine-tuning, no-BN row is deterministic "
        f"given the baseline (one run per baseline, used in each of its pairs). Machine: {platform.machine()}, "
        f"{os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {args.threads} threads; compute behind these results {compute:.0f} s; this "
        f"invocation {session['seconds']:.0f} s ({session.get('baselines', 0)} baselines and "
        f"{session.get('runs', 0)} runs computed, the rest from the cache in {args.cache_dir}).")


if __name__ == "__main__":
    main()
