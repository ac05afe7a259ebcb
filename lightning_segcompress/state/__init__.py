"""Compression state as plain data: the stages a network went through, stored in checkpoints and replayed on load
(:mod:`~lightning_segcompress.state.checkpoint`), and the open registry of the functions that replay each stage kind
(:mod:`~lightning_segcompress.state.registry`)."""

from lightning_segcompress.state.checkpoint import (
    AFTER_LOAD_ATTRIBUTE,
    CHECKPOINT_KEY,
    CHECKPOINT_STATE_ATTRIBUTE,
    FORMAT_VERSION,
    STAGES_ATTRIBUTE,
    apply_stages,
    carry_stages,
    finish_loading,
    get_stages,
    load_compressed,
    load_network_weights,
    load_weights,
    network_path,
    replace_network,
    restore_from_checkpoint,
    set_stage,
    write_to_checkpoint,
)
from lightning_segcompress.state.registry import register_stage_applier, stage_applier, stage_kinds

__all__ = ["AFTER_LOAD_ATTRIBUTE", "CHECKPOINT_KEY", "CHECKPOINT_STATE_ATTRIBUTE", "FORMAT_VERSION",
           "STAGES_ATTRIBUTE", "apply_stages", "carry_stages", "finish_loading", "get_stages", "load_compressed",
           "load_network_weights", "load_weights", "network_path", "replace_network", "restore_from_checkpoint",
           "register_stage_applier", "set_stage", "stage_applier", "stage_kinds", "write_to_checkpoint"]
