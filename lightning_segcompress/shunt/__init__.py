"""Shunt connections (after Haas et al. 2021): replace a run of MobileNetV3 blocks with one small block.
Pure torch: block maps, knowledge quotients, range selection, the shunt and its splicing."""

from lightning_segcompress.shunt.architecture import VARIANTS, Shunt, downsamples_between, shunt_config
from lightning_segcompress.shunt.blocks import Backbone, Block, ShuntError, block_map, find_backbone, format_block_map
from lightning_segcompress.shunt.knowledge_quotient import candidate_plans, knowledge_quotients, select_range
from lightning_segcompress.shunt.surgery import ShuntPlan, plan_shunt, resolve_range, shunt_stage, splice
from lightning_segcompress.utils.metrics import miou_evaluator

__all__ = [
    "VARIANTS", "Backbone", "Block", "Shunt", "ShuntError", "ShuntPlan", "block_map", "candidate_plans",
    "downsamples_between", "find_backbone", "format_block_map", "knowledge_quotients", "miou_evaluator",
    "plan_shunt", "resolve_range", "select_range", "shunt_config", "shunt_stage", "splice",
]
