"""Sparsity learning on BatchNorm scales (network slimming, ACSL, CAP, resource-weighted budgets). Pure torch."""

from lightning_segcompress.sparsity.regularizers import (
    METHODS,
    SparsityError,
    add_l1_subgradient,
    batchnorm_layers,
    budget_strengths,
    channel_costs,
    context,
    gamma_statistics,
    pooled_features,
    redundancy,
    strengths_from_features,
)

__all__ = [
    "METHODS", "SparsityError", "add_l1_subgradient", "batchnorm_layers", "budget_strengths", "channel_costs",
    "context", "gamma_statistics", "pooled_features", "redundancy", "strengths_from_features",
]
