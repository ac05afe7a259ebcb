"""Knowledge distillation for segmentation: losses (pixel KL, CWD, pair-wise, ACE, IFVD, CIRKD pixel/region
relations, feature hints), forward capture and the distiller that combines them. Pure torch."""

from lightning_segcompress.distillation.capture import DistillationError, ForwardCapture, resolve_layer
from lightning_segcompress.distillation.distiller import (
    FEATURE_LOSSES,
    LABEL_LOSSES,
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
    cirkd_pixel,
    cirkd_region,
    feature_hint,
    ifvd,
    make_connector,
    pairwise_affinity,
    pixel_kl,
)

__all__ = [
    "DEFAULTS", "FEATURE_LOSSES", "LABEL_LOSSES", "LOGIT_LOSSES", "LOSSES", "Connector", "DistillationError",
    "Distiller", "ForwardCapture", "ace", "channel_wise", "cirkd_pixel", "cirkd_region", "feature_hint", "freeze",
    "ifvd", "make_connector", "normalise_hint", "normalise_losses", "pairwise_affinity", "pixel_kl", "resolve_layer",
    "restore_snapshot", "snapshot", "snapshot_state",
]
