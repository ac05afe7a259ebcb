from lightning_segcompress.utils.inspection import (
    ModelStats,
    copy_without_hooks,
    count_macs,
    count_params,
    evaluation_mode,
    example_input,
    extract_logits,
    find_classifier_layers,
    find_network,
    match_module_names,
    model_stats,
)

__all__ = [
    "ModelStats",
    "copy_without_hooks",
    "count_macs",
    "count_params",
    "evaluation_mode",
    "example_input",
    "extract_logits",
    "find_classifier_layers",
    "find_network",
    "match_module_names",
    "model_stats",
]
