"""Two-process DDP (CPU, gloo), every compression callback: both ranks take the same decisions, end with the same
weights and nothing hangs (one script, tests/scripts/ddp_stack.py, two fits in the same processes)."""

import pytest

from support.common import run_ddp_script


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ddp_script("ddp_stack.py", tmp_path_factory.mktemp("ddp"), timeout=420)


@pytest.mark.slow
def test_ranks_compress_the_user_module_identically(ranks):
    rank0, rank1 = (r["stack"] for r in ranks)
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    for key in ("widths", "stages", "output", "history", "post_steps"):
        assert rank0[key] == rank1[key], key
    assert [s["kind"] for s in rank0["stages"]] == ["structured_pruning", "quantization"]
    assert rank0["network"] == pytest.approx(rank1["network"], rel=1e-9), "DDP kept the weights in sync"


@pytest.mark.slow
def test_pruning_decides_once_and_reestimates_statistics_on_every_rank_alike(ranks):
    rank0, rank1 = (r["stack"] for r in ranks)
    assert rank0["history"], "the two linear steps, scored differently on each rank, pruned alike"
    assert rank0["params"] == rank1["params"] < rank0["params_before"]
    pruning = [b for b in rank0["batchnorm"] if b["kind"] == "structured_pruning"]
    assert [b["batches"] for b in pruning] == [2, 2], "bn_batches 32, clamped to limit_train_batches"
    for mine, theirs in zip(rank0["batchnorm"], rank1["batchnorm"]):  # each rank's own batches, all-reduced
        assert mine["stats"] == pytest.approx(theirs["stats"], rel=1e-6)


@pytest.mark.slow
def test_sparsity_and_post_pruning_apply_the_same_penalties_and_keep_the_same_groups(ranks):
    rank0, rank1 = (r["stack"] for r in ranks)
    assert rank0["strengths"] and rank0["strengths"] == rank1["strengths"], "ACSL strengths averaged"
    assert len(rank0["post_steps"]) == 2 and rank0["post_steps"] == rank1["post_steps"]


@pytest.mark.slow
def test_distillation_connectors_and_teacher_stay_identical(ranks):
    rank0, rank1 = (r["stack"] for r in ranks)
    assert rank0["kd_logged"] and rank1["kd_logged"]
    assert rank0["connector_shape"] == rank1["connector_shape"]
    for key in ("teacher", "connectors"):
        assert rank0[key] == pytest.approx(rank1[key], rel=1e-9), key


@pytest.mark.slow
def test_only_rank_zero_benchmarks_every_stage(ranks):
    assert ranks[0]["stack"]["benchmark_stages"] == ["after_structured_pruning", "baseline", "final"]
    assert ranks[1]["stack"]["benchmark_stages"] == []


@pytest.mark.slow
def test_shunt_replaces_the_same_blocks_and_stays_identical(ranks):
    rank0, rank1 = (r["shunt"] for r in ranks)
    assert rank0["phase"] == rank1["phase"] == "B"
    assert rank0["blocks"] == rank1["blocks"] and rank0["kd_logged"] and rank1["kd_logged"]
    for key in ("stage_a_shunt", "network", "teacher"):
        assert rank0[key] == pytest.approx(rank1[key], rel=1e-9), key
