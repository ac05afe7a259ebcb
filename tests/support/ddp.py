"""What the 2-process DDP scripts share: a parameter checksum, per-rank seeding, and the per-rank result file
that ``conftest.run_ddp_script`` reads back."""

import json
import os
import sys

import pytorch_lightning as pl
import torch


def checksum(module: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in module.parameters()))


class RankSeed(pl.Callback):
    """Listed before a callback that creates parameters at setup: every rank would start them differently
    (Lightning re-seeds every rank alike before setup), so only a broadcast keeps them equal."""

    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(1000 + trainer.global_rank)


def write_rank_result(trainer: pl.Trainer, result: dict) -> None:
    """``<out dir>/rank{r}.json`` with ``result`` plus the rank and world size; the out dir is ``sys.argv[1]``."""
    result = {"rank": trainer.global_rank, "world_size": trainer.world_size, **result}
    with open(os.path.join(sys.argv[1], f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(result, f)
