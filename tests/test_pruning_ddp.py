"""Two-process DDP (CPU, gloo): both ranks prune exactly the same channels and nothing hangs."""

import pytest

from conftest import run_ddp_script


@pytest.mark.slow
def test_ddp_ranks_prune_identically(tmp_path):
    rank0, rank1 = run_ddp_script("ddp_pruning.py", tmp_path)
    assert rank0["world_size"] == rank1["world_size"] == 2
    assert len(rank0["history"]) > 0  # two linear steps pruned something
    assert rank0["history"] == rank1["history"]
    assert rank0["widths"] == rank1["widths"]
    assert rank0["params"] == rank1["params"] < rank0["params_before"]
    assert rank0["param_checksum"] == pytest.approx(rank1["param_checksum"], rel=1e-9)  # DDP kept them in sync
    # BatchNorm statistics re-estimated after each step on each rank's own batches, all-reduced: identical
    assert [b["batches"] for b in rank0["batchnorm"]] == [2, 2]  # bn_batches 32, clamped to limit_train_batches
    for mine, theirs in zip(rank0["batchnorm"], rank1["batchnorm"]):
        assert mine["stats"] == pytest.approx(theirs["stats"], rel=1e-6)
