from lightning_segcompress.utils.inspection import (
    ModelStats,
    count_macs,
    count_params,
    example_input,
    extract_logits,
    find_classifier_layers,
    find_network,
    match_module_names,
    model_stats,
)

__all__ = [
    "ModelStats",
    "count_macs",
    "count_params",
    "example_input",
    "extract_logits",
    "find_classifier_layers",
    "find_network",
    "match_module_names",
    "model_stats",
]
