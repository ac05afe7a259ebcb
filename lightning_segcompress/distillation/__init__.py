"""Knowledge distillation for segmentation: losses (pixel KL, CWD, pair-wise, ACE, feature hints), forward
capture and the distiller that combines them. Pure torch."""

from lightning_segcompress.distillation.capture import DistillationError, ForwardCapture, resolve_layer
from lightning_segcompress.distillation.distiller import (
    LOGIT_LOSSES,
    Distiller,
    freeze,
    normalise_hint,
    normalise_losses,
    restore_snapshot,
    snapshot,
    snapshot_state,
)
from lightning_segcompress.distillation.losses import (
    DEFAULTS,
    LOSSES,
    Connector,
    ace,
    channel_wise,
    feature_hint,
    make_connector,
    pairwise_affinity,
    pixel_kl,
)

__all__ = [
    "DEFAULTS", "LOGIT_LOSSES", "LOSSES", "Connector", "DistillationError", "Distiller", "ForwardCapture", "ace",
    "channel_wise", "feature_hint", "freeze", "make_connector", "normalise_hint", "normalise_losses",
    "pairwise_affinity", "pixel_kl", "resolve_layer", "restore_snapshot", "snapshot", "snapshot_state",
]
