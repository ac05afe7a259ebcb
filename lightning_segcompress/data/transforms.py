"""Joint image/mask transforms built on ``torchvision.transforms.v2``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image as PILImage
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_image(image) -> tv_tensors.Image:
    if isinstance(image, PILImage.Image):
        tensor = F.pil_to_tensor(image.convert("RGB"))
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"numpy images must be HxWx3, got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    elif isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"tensor images must be 3xHxW, got shape {tuple(image.shape)}")
        tensor = image
    else:
        raise TypeError(f"unsupported image type {type(image).__name__}; pass a PIL image, array or tensor")
    return tv_tensors.Image(tensor)


def _as_mask(mask) -> tv_tensors.Mask:
    if isinstance(mask, PILImage.Image):
        mask = np.asarray(mask)
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask.astype(np.int64))
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"unsupported mask type {type(mask).__name__}; pass a PIL image, array or tensor")
    if mask.ndim != 2:
        raise ValueError(f"masks must be HxW label maps, got shape {tuple(mask.shape)}")
    return tv_tensors.Mask(mask.long())


class SegmentationTransform:
    """Applies the same geometric augmentation to an image and its mask, then normalises the image.

    Train mode: optional resize to ``size``, random rescale by a factor drawn from ``scale_range``,
    random crop to ``crop_size`` (padding the image with 0 and the mask with ``ignore_index``) and
    random horizontal flip. Eval mode: only the optional resize to ``size``. Masks are always resized
    with nearest-neighbour interpolation.

    Args:
        train: Whether to apply the random augmentations.
        crop_size: ``(height, width)`` of the random train crop; ``None`` disables cropping.
        scale_range: ``(min, max)`` factor of the random train rescale; ``(1.0, 1.0)`` disables it.
        hflip: Whether to randomly flip horizontally in train mode.
        hflip_prob: Flip probability when ``hflip`` is enabled.
        size: ``(height, width)`` every sample is resized to first (train and eval); ``None`` keeps it.
        ignore_index: Mask value used for padded pixels.
        mean: Per-channel normalisation mean (ImageNet by default).
        std: Per-channel normalisation std (ImageNet by default).

    Call it as ``image, mask = transform(image, mask)``: ``image`` is a uint8 HxWx3 array, PIL image
    or 3xHxW tensor (uint8, or float in [0, 1]); ``mask`` an HxW integer array, PIL image or tensor.
    Returns a float32 3xHxW tensor and an int64 HxW tensor.
    """

    def __init__(
        self,
        train: bool,
        crop_size: Sequence[int] | None = None,
        scale_range: Sequence[float] = (1.0, 1.0),
        hflip: bool = True,
        hflip_prob: float = 0.5,
        size: Sequence[int] | None = None,
        ignore_index: int = 255,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.train = train
        self.size = list(size) if size is not None else None
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        geometric: list[v2.Transform] = []
        if train and crop_size is not None:
            fill = {tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}
            geometric.append(v2.RandomCrop(tuple(crop_size), pad_if_needed=True, fill=fill))
        if train and hflip:
            geometric.append(v2.RandomHorizontalFlip(p=hflip_prob))
        self.geometric = v2.Compose(geometric) if geometric else None
        # With a single dtype, ToDtype/Normalize only touch the image and leave the mask as int64.
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = _as_image(image), _as_mask(mask)
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(
                f"image size {tuple(image.shape[-2:])} and mask size {tuple(mask.shape)} differ (HxW)"
            )
        if self.size is not None:
            image, mask = F.resize(image, self.size, antialias=True), F.resize(mask, self.size)
        low, high = self.scale_range
        if self.train and (low, high) != (1.0, 1.0):
            factor = low + (high - low) * torch.rand(()).item()
            new_size = [max(1, round(s * factor)) for s in image.shape[-2:]]
            image, mask = F.resize(image, new_size, antialias=True), F.resize(mask, new_size)
        if self.geometric is not None:
            image, mask = self.geometric(image, mask)
        image, mask = self.normalize(image, mask)
        return image.as_subclass(torch.Tensor), mask.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(train={self.train}, size={self.size}, scale_range={self.scale_range}, "
            f"geometric={self.geometric})"
        )
