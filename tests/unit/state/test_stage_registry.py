"""The open registry of stage appliers: third-party kinds, conflicts, and the error for an unknown kind."""

import pytest
import torch
from torch import nn

from lightning_segcompress.callbacks import CompressionProducer
from lightning_segcompress.state import apply_stages, get_stages, register_stage_applier, stage_applier, stage_kinds


def test_a_producer_subclass_registers_its_kind_and_the_stages_replay():
    class Widen(CompressionProducer):
        kind = "test.widen_head"

        @staticmethod
        def stage_applier(network, stage, applied):
            network.head = nn.Linear(4, stage["width"])

    assert "test.widen_head" in stage_kinds()
    assert stage_applier("test.widen_head") is Widen.__dict__["stage_applier"].__func__
    network = nn.Sequential()
    network.head = nn.Linear(4, 2)
    apply_stages(network, [{"kind": "test.widen_head", "width": 7}])
    assert network.head(torch.zeros(1, 4)).shape == (1, 7)
    assert get_stages(network) == [], "the applier alone does not record the stage"


def test_built_in_kinds_are_registered_without_importing_their_callbacks():
    assert {"structured_pruning", "quantization", "shunt"} <= set(stage_kinds())
    assert callable(stage_applier("structured_pruning"))


def test_a_second_applier_for_a_known_kind_needs_replace():
    def first(network, stage, applied):
        return None

    def second(network, stage, applied):
        return None

    register_stage_applier("test.conflict", first)
    register_stage_applier("test.conflict", first)  # the same again: a no-op
    with pytest.raises(ValueError, match="already has an applier"):
        register_stage_applier("test.conflict", second)
    register_stage_applier("test.conflict", second, replace=True)
    assert stage_applier("test.conflict") is second


def test_an_unknown_kind_names_the_fix():
    with pytest.raises(ValueError, match=r"kind 'nobody\.knows'.*register_stage_applier"):
        apply_stages(nn.Linear(2, 2), [{"kind": "nobody.knows"}])


def test_bad_declarations_fail_when_the_class_is_defined():
    with pytest.raises(TypeError, match="no kind"):
        class NoKind(CompressionProducer):
            @staticmethod
            def stage_applier(network, stage, applied):
                return None
    with pytest.raises(TypeError, match="callable or 'module:function'"):
        register_stage_applier("test.bad", 42)


def test_plan_filters_run_in_turn_and_the_old_hook_name_still_works_with_a_warning():
    from types import SimpleNamespace

    from lightning_segcompress.callbacks import CompressionCallback, CompressionEvent
    from lightning_segcompress.callbacks.protocol import run_plan_filters

    class DropFirst(CompressionCallback):
        def filter_plan(self, trainer, pl_module, event):
            return event.plan[1:] if event.kind == "structured_pruning" else event.plan

    class OldSpelling(CompressionCallback):
        def filter_pruning_plan(self, trainer, pl_module, event):
            return event.plan[:-1]

    plan = [["a", True, [0]], ["b", True, [1]], ["c", True, [2]], ["d", True, [3]]]
    trainer = SimpleNamespace(callbacks=[DropFirst(), OldSpelling()])
    with pytest.warns(FutureWarning, match="filter_pruning_plan is deprecated"):
        kept = run_plan_filters(trainer, None, CompressionEvent("structured_pruning", 1, nn.Linear(1, 1), plan=plan))
    assert kept == plan[1:3]
    other = CompressionEvent("example.other", 1, nn.Linear(1, 1), plan=["x"])
    assert run_plan_filters(SimpleNamespace(callbacks=[OldSpelling()]), None, other) == ["x"]
