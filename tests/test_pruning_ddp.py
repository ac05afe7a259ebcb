"""Two-process DDP (CPU, gloo): both ranks prune exactly the same channels and nothing hangs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_pruning.py"


@pytest.mark.slow
def test_ddp_ranks_prune_identically(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True,
                            timeout=240, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["history"]) > 0  # two linear steps pruned something
    assert rank0["history"] == rank1["history"]
    assert rank0["widths"] == rank1["widths"]
    assert rank0["params"] == rank1["params"] < rank0["params_before"]
    assert rank0["param_checksum"] == pytest.approx(rank1["param_checksum"], rel=1e-9)  # DDP kept them in sync
