"""Real-photograph texture mosaics: a harder built-in segmentation benchmark that needs no download.

After the classic real-texture segmentation benchmarks (Brodatz texture mosaics and the Prague texture
segmentation benchmark): every class is one photographed material, and every image is a mosaic whose
regions are filled with random crops of their class photo at a random scale, rotation and flip.

* **Colour alone does not tell the class.** Each region gets its own colour jitter: a mean colour pulled
  towards a random one drawn from the same distribution for every class, a random hue rotation and saturation,
  a random channel tint, sometimes grayscale, and a random contrast change, all scaled by ``color_jitter``.
  At the default 0.25, labelling 64x64 validation pixels by the nearest class-mean colour scores mIoU 0.26
  (0.34 with the photos' own colours, 0.16 at 0.5, 0.09 at 1.0), while DeepLabV3+ (MobileNetV3-small, from
  scratch, 256 images, 10 epochs on CPU) reaches 0.35 (0.53 / 0.22 / 0.11): the texture is what is left to
  learn, and there is room above it.
* **Texture at a fixed field of view.** Photos are shrunk (box filter) so that an image spans about 256 photo
  pixels whatever its size: a 64x64 mosaic still shows several bricks, stones or letters.
* **Boundaries are not drawn shapes.** Region layouts come either from a real photograph (the smoothed
  luminance of a random rotated crop of a layout photo, quantised into as many levels as the image has
  regions) or from the arg-max of a few multi-octave smooth random fields, so boundaries are irregular.
* Mild smooth illumination change, blur and sensor noise are added on top.

Item ``i`` of a split depends only on ``(seed, split, i)`` and is rendered on the fly (a few milliseconds at
96x96), so the data set is deterministic and needs no cache.

Sources: every photo ships inside the scikit-image wheel (``skimage/data``; read from the package folder,
never through ``skimage.data``'s download machinery), licences as stated in scikit-image's
``skimage/data/_fetchers.py``:

============  ==================================  ===========================================================
class         photo (crop)                        origin and licence as shipped
============  ==================================  ===========================================================
brick         ``brick.png`` (whole)               CC0Textures "Bricks25", CC0
grass         ``grass.png`` (whole)               DeviantArt "Grass 01" by linolafett, CC0
gravel        ``gravel.png`` (whole)              CC0Textures "Gravel04", CC0
wood          ``coffee.png`` (table top)          Rachel Michetti, courtesy of Pikolo Espresso Bar, CC0
fur           ``chelsea.png`` (forehead, cheek)   Stefan van der Walt (Chelsea the cat), CC0
tissue        ``ihc.png`` (whole)                 IHC-stained colonic glands, CMMI; no known copyright
                                                  restrictions
text          ``page.png`` (text lines)           scanned page, scikit-image (no licence stated)
stars         ``hubble_deep_field.jpg`` (whole)   NASA Hubble eXtreme Deep Field, public domain
coins         ``coins.png`` (whole)               Brooklyn Museum collection, no known copyright restrictions
retina        ``retina.jpg`` (inside the fundus)  Wikimedia Commons (Häggström), CC0 1.0
moon          ``moon.png`` (whole)                lunar surface, scikit-image (no licence stated)
============  ==================================  ===========================================================

Region layouts also use ``camera.png`` (Lav Varshney, CC0), ``astronaut.png`` (NASA, public domain),
``rocket.jpg`` (SpaceX, public domain), ``motorcycle_left.png`` (Middlebury 2014 stereo data set, no
licence stated), ``chelsea.png``, ``coffee.png`` and ``coins.png``.

scikit-learn's ``china.jpg`` / ``flower.jpg`` (CC BY 2.0) are deliberately not used: scikit-learn is not a
dependency of this package, and the class list must not depend on what else happens to be installed.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as nnf
from PIL import Image
from torch.utils.data import Dataset

from .base import SeededItems, SegmentationDataModule, check_positive
from .transforms import SegmentationTransform

_FIELD_OF_VIEW = 256  # photo pixels across one image, about (see _field_of_view_shrink)
# (class name, file, crop boxes as (top, left, bottom, right) in the original photo, downscale factor)
SOURCES: tuple[tuple[str, str, tuple[tuple[int, int, int, int] | None, ...], int], ...] = (
    ("brick", "brick.png", (None,), 1),
    ("grass", "grass.png", (None,), 1),
    ("gravel", "gravel.png", (None,), 1),
    ("wood", "coffee.png", ((0, 440, 170, 600), (250, 485, 400, 600)), 1),
    ("fur", "chelsea.png", ((0, 130, 100, 340), (150, 0, 300, 160)), 1),
    ("tissue", "ihc.png", (None,), 1),
    ("text", "page.png", ((45, 0, 185, 384),), 1),
    ("stars", "hubble_deep_field.jpg", (None,), 2),
    ("coins", "coins.png", (None,), 1),
    ("retina", "retina.jpg", ((350, 350, 1050, 1050),), 2),
    ("moon", "moon.png", (None,), 1),
)
CLASS_NAMES: tuple[str, ...] = tuple(name for name, *_ in SOURCES)
MAX_CLASSES = len(SOURCES)
LAYOUT_PHOTOS = (
    "camera.png",
    "astronaut.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
)
# Share of images whose layout comes from a photo (the rest use smooth random fields).
_PHOTO_LAYOUT_PROB = 0.5
_LAYOUT_MAX_SIDE = 256
_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ2RGB = torch.linalg.inv(_RGB2YIQ)

_INSTALL_HINT = "pip install scikit-image (its wheel ships the sample photos; nothing is downloaded)"


def skimage_data_dir() -> Path:
    """The ``skimage/data`` folder of the installed scikit-image, without importing it."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"PhotoTexturesDataModule needs scikit-image's bundled sample photos; {_INSTALL_HINT}")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    needed = {name for _, name, _, _ in SOURCES} | set(LAYOUT_PHOTOS)
    missing = sorted(needed - {p.name for p in folder.glob("*")})
    if missing:
        raise ImportError(
            f"scikit-image at {folder.parent} lacks the sample photos {missing}; reinstall it from a wheel: "
            f"{_INSTALL_HINT}"
        )
    return folder


def _read(folder: Path, name: str, mode: str, factor: int = 1) -> tuple[Image.Image, int]:
    """The photo converted to ``mode``, and by how much it is already shrunk (JPEGs decode at reduced size)."""
    with Image.open(folder / name) as image:
        width = image.width
        if factor > 1:
            image.draft(mode, (image.width // factor, image.height // factor))
        return image.convert(mode), round(width / image.width)


def _field_of_view_shrink(image_size: tuple[int, int]) -> int:
    """How much the photos are shrunk (box filter) before sampling, so that an image shows about the same
    ~256 photo pixels across at every image size: small images still see several bricks, stones or letters."""
    return max(1, round(_FIELD_OF_VIEW / max(image_size)))


@functools.lru_cache(maxsize=4)
def _texture_sources(folder: str, shrink: int = 1, min_side: int = 1) -> tuple[tuple[torch.Tensor, ...], ...]:
    """Per class, its crops as float 3xhxw tensors in [0, 1], shrunk ``shrink`` times (less where a crop would
    get shorter than ``min_side``)."""
    classes = []
    for _, name, boxes, factor in SOURCES:
        photo, shrunk = _read(Path(folder), name, "RGB", factor)
        crops = []
        for box in boxes:
            crop = photo if box is None else photo.crop(tuple(v // shrunk for v in (box[1], box[0], box[3], box[2])))
            if factor // shrunk > 1:
                crop = crop.reduce(factor // shrunk)
            fits = max(1, min(crop.size) // min_side)
            if min(shrink, fits) > 1:
                crop = crop.reduce(min(shrink, fits))
            pixels = np.asarray(crop, dtype=np.float32).transpose(2, 0, 1) / 255
            crops.append(torch.from_numpy(np.ascontiguousarray(pixels)))
        classes.append(tuple(crops))
    return tuple(classes)


@functools.lru_cache(maxsize=2)
def _layout_sources(folder: str) -> tuple[torch.Tensor, ...]:
    """Layout photos as float 1xhxw luminance tensors, longest side at most 256."""
    layouts = []
    for name in LAYOUT_PHOTOS:
        photo, _ = _read(Path(folder), name, "L", factor=2)  # only JPEGs decode smaller; resized below
        scale = _LAYOUT_MAX_SIDE / max(photo.size)
        if scale < 1:
            photo = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BILINEAR)
        layouts.append(torch.from_numpy(np.asarray(photo, dtype=np.float32)[None] / 255))
    return tuple(layouts)


def _rand(g: torch.Generator, low: float = 0.0, high: float = 1.0, shape: tuple = ()) -> torch.Tensor:
    return low + (high - low) * torch.rand(shape, generator=g)


def _randint(g: torch.Generator, low: int, high: int) -> int:
    """Uniform int in [low, high)."""
    return int(torch.randint(low, high, (), generator=g))


def _affine_sample(
    source: torch.Tensor, g: torch.Generator, size: tuple[int, int], zoom_range: tuple[float, float]
) -> torch.Tensor:
    """A randomly placed, scaled (source pixels per output pixel), rotated and flipped crop of ``source``."""
    _, src_h, src_w = source.shape
    height, width = size
    low, high = zoom_range
    zoom = math.exp(_rand(g, math.log(low), math.log(high)).item())
    radius = 0.5 * math.hypot(height, width)
    # Shrink the zoom (down to half the range's low end) so that the rotated window fits inside the source;
    # whatever still sticks out is filled by reflection.
    zoom = max(min(zoom, 0.5 * min(src_h, src_w) / radius), 0.5 * low)
    angle = _rand(g, 0, 2 * math.pi).item()
    flip = -1.0 if torch.rand((), generator=g) < 0.5 else 1.0
    reach = zoom * radius
    cy = _rand(g, min(reach, src_h / 2), max(src_h - reach, src_h / 2)).item()
    cx = _rand(g, min(reach, src_w / 2), max(src_w - reach, src_w / 2)).item()
    cos, sin = math.cos(angle) * zoom, math.sin(angle) * zoom
    dy = torch.arange(height, dtype=torch.float32).view(-1, 1) - (height - 1) / 2
    dx = (torch.arange(width, dtype=torch.float32).view(1, -1) - (width - 1) / 2) * flip
    sx = cx + cos * dx - sin * dy
    sy = cy + sin * dx + cos * dy
    grid = torch.stack([(2 * sx + 1) / src_w - 1, (2 * sy + 1) / src_h - 1], dim=-1)[None]
    return nnf.grid_sample(source[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0]


def _smooth_field(g: torch.Generator, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """``channels`` smooth multi-octave random fields (CxHxW, roughly zero mean)."""
    cells = _randint(g, 2, 5)
    field = torch.zeros(channels, *size)
    for octave, weight in enumerate((1.0, 0.5, 0.25)):
        grid = torch.rand(1, channels, cells * 2**octave, cells * 2**octave, generator=g) - 0.5
        field += weight * nnf.interpolate(grid, size=size, mode="bicubic", align_corners=False)[0]
    return field


def _majority_filter(labels: torch.Tensor, count: int) -> torch.Tensor:
    """Removes speckles: each pixel takes the most frequent label of its 5x5 neighbourhood."""
    onehot = nnf.one_hot(labels, count).permute(2, 0, 1).float()
    return _separable(onehot, [1.0] * 5).argmax(0)


def _layout(g: torch.Generator, count: int, size: tuple[int, int], folder: str) -> torch.Tensor:
    """An HxW map of region ids in ``[0, count)`` with irregular, natural boundaries."""
    height, width = size
    if torch.rand((), generator=g) < _PHOTO_LAYOUT_PROB:
        layouts = _layout_sources(folder)
        photo = layouts[_randint(g, 0, len(layouts))]
        side = min(photo.shape[-2:])
        zoom = _rand(g, 0.4, 1.0).item() * side / max(height, width)
        luma = _affine_sample(photo, g, size, (zoom, zoom))
        luma = luma + 0.15 * _smooth_field(g, 1, size)  # breaks up flat areas (sky, walls) a little
        sigma = 0.02 * min(height, width)
        luma = _blur(luma, sigma)[0]
        levels = torch.quantile(luma.flatten(), torch.linspace(0, 1, count + 1)[1:-1])
        labels = torch.bucketize(luma, levels)
        labels = torch.randperm(count, generator=g)[labels]  # which level gets which region: random
    else:
        field = _smooth_field(g, count, size) + _rand(g, -0.1, 0.1, (count, 1, 1))
        labels = field.argmax(0)
    return _majority_filter(labels, count)


def _blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a CxHxW tensor (edge pixels repeated)."""
    radius = max(1, math.ceil(2.5 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=torch.float32) / sigma) ** 2)
    return _separable(image, (taps / taps.sum()).tolist())


def _separable(image: torch.Tensor, kernel: list[float]) -> torch.Tensor:
    """Correlates the last two dims of ``image`` with ``kernel`` (odd length), edge pixels repeated.

    Written as shifted elementwise sums: on the small images here this beats ``conv2d`` and stays fast when
    the CPU is shared.
    """
    radius = len(kernel) // 2
    for dim in (-1, -2):
        size = image.shape[dim]
        index = torch.arange(-radius, size + radius).clamp_(0, size - 1)
        padded = image.index_select(dim, index)
        out = kernel[0] * padded.narrow(dim, 0, size)
        for offset in range(1, len(kernel)):
            out += kernel[offset] * padded.narrow(dim, offset, size)
        image = out
    return image


def _jitter_colour(texture: torch.Tensor, g: torch.Generator, strength: float) -> torch.Tensor:
    """Randomises mean colour, hue, saturation, tint and contrast of one region's texture.

    ``strength`` 1 draws the mean colour from the same distribution for every class (and rotates hue fully,
    changes contrast by up to x1.65); 0 leaves the photo as it is.
    """
    # The whole jitter of the deviations from the mean colour is one 3x3 colour matrix, built in YIQ space.
    chroma = torch.eye(3)
    if torch.rand((), generator=g) < 0.3 * strength:
        chroma[1:] = 0  # grayscale
    angle = strength * _rand(g, -math.pi, math.pi).item()
    saturation = math.exp(strength * _rand(g, -0.7, 0.7).item())
    cos, sin = math.cos(angle) * saturation, math.sin(angle) * saturation
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, cos, -sin], [0.0, sin, cos]])
    tint = torch.eye(3)  # luminance-correlated tint, so that gray photos get colour texture as well
    tint[1:, 0] = strength * _rand(g, -0.35, 0.35, (2,))
    mean = texture.mean((1, 2), keepdim=True)
    deviation = texture - mean
    contrast = math.exp(strength * _rand(g, -0.5, 0.5).item())  # the photo's contrast, times 0.6 to 1.65
    matrix = contrast * _YIQ2RGB @ tint @ rotate @ chroma @ _RGB2YIQ
    new_mean = mean + strength * (_rand(g, 0.15, 0.85, (3, 1, 1)) - mean)
    return new_mean + _channel_mix(matrix, deviation)


def _channel_mix(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """``matrix`` (Kx3) applied to the channels of a 3xHxW image, as elementwise ops (cheap on small images)."""
    m = matrix[:, :, None, None]
    return m[:, 0] * image[0] + m[:, 1] * image[1] + m[:, 2] * image[2]


def render_mosaic(
    g: torch.Generator,
    num_classes: int,
    image_size: tuple[int, int],
    max_regions: int,
    color_jitter: float,
    folder: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Renders one mosaic: a float 3xHxW image in [0, 1] and an int64 HxW mask of class ids."""
    sources = _texture_sources(folder, _field_of_view_shrink(image_size), max(image_size))
    count = _randint(g, 2, min(max_regions, num_classes) + 1)
    classes = torch.randperm(num_classes, generator=g)[:count]
    regions = _layout(g, count, image_size, folder)
    image = torch.zeros(3, *image_size)
    for region, cls in enumerate(classes.tolist()):
        crops = sources[cls]
        crop = crops[_randint(g, 0, len(crops))]
        texture = _jitter_colour(_affine_sample(crop, g, image_size, (0.6, 1.6)), g, color_jitter)
        image = torch.where(regions == region, texture, image)
    mask = classes[regions]

    illumination = 1 + 0.3 * color_jitter * _smooth_field(g, 1, image_size)
    image = image * illumination
    if torch.rand((), generator=g) < 0.5:
        image = _blur(image, _rand(g, 0.4, 1.0).item())
    image = image + _rand(g, 0.005, 0.03).item() * torch.randn(image.shape, generator=g)
    return image.clamp_(0, 1), mask


class PhotoTexturesDataset(SeededItems):
    """``length`` mosaics of one split; item ``i`` depends only on ``(seed, split, i)``.

    Args:
        split: "train", "val" or "test".
        length: Number of items.
        num_classes: Number of classes (the first ``num_classes`` of :data:`CLASS_NAMES`).
        image_size: ``(height, width)`` of the rendered mosaics.
        max_regions: Most classes in one image (2 to ``max_regions`` are drawn).
        color_jitter: Per-region colour randomisation, 0 (photo colours) to 1 (mean colour uninformative).
        seed: Base seed of the data set.
        transform: Joint transform applied to ``(image, mask)``; ``None`` returns the raw [0, 1] image.
    """

    def __init__(
        self,
        split: str,
        length: int,
        num_classes: int = 6,
        image_size: tuple[int, int] = (128, 128),
        max_regions: int = 4,
        color_jitter: float = 0.25,
        seed: int = 0,
        transform: SegmentationTransform | None = None,
    ) -> None:
        super().__init__(split, length, seed, transform)
        self.num_classes, self.image_size, self.max_regions = num_classes, tuple(image_size), max_regions
        self.color_jitter = float(color_jitter)
        self.folder = str(skimage_data_dir())

    def render(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return render_mosaic(g, self.num_classes, self.image_size, self.max_regions, self.color_jitter, self.folder)


class PhotoTexturesDataModule(SegmentationDataModule):
    """Mosaics of real photographed textures (scikit-image sample photos; no download). Predict uses the test split.

    Harder than :class:`SyntheticScenesDataModule`: real textures vary within a class, colour is randomised
    per region and boundaries are irregular. Needs ``scikit-image`` installed (a package dependency).

    Args:
        num_classes: Number of classes, 2 to ``MAX_CLASSES`` (11); class ``k`` is ``CLASS_NAMES[k]``
            (brick, grass, gravel, wood, fur, tissue, text, stars, coins, retina, moon).
        image_size: ``(height, width)`` of the generated mosaics, both >= 16.
        num_train: Number of training mosaics.
        num_val: Number of validation mosaics.
        num_test: Number of test mosaics.
        max_regions: Most classes in one mosaic (2 to ``max_regions`` are drawn, capped at ``num_classes``).
        color_jitter: Per-region colour randomisation in [0, 1]; 1 makes the mean colour of a region
            uninformative, 0 keeps the photos' colours (easier); 0.25 (default) leaves colour a weak cue.
        seed: Seed of the mosaics and of the train shuffling.
        batch_size: Samples per batch.
        num_workers: Data-loading worker processes.
        crop_size: ``(height, width)`` of the random train crop; ``None`` (default) disables cropping.
        scale_range: Random train rescale range; ``(1.0, 1.0)`` (default) keeps sizes equal within a batch.
        hflip: Whether to randomly flip training samples horizontally.
        ignore_index: Mask value ignored by losses and metrics (only produced by crop padding here).
    """

    def __init__(
        self,
        num_classes: int = 6,
        image_size: tuple[int, int] = (128, 128),
        num_train: int = 512,
        num_val: int = 64,
        num_test: int = 64,
        max_regions: int = 4,
        color_jitter: float = 0.25,
        seed: int = 0,
        batch_size: int = 8,
        num_workers: int = 0,
        crop_size: tuple[int, int] | None = None,
        scale_range: tuple[float, float] = (1.0, 1.0),
        hflip: bool = True,
        ignore_index: int = 255,
    ) -> None:
        super().__init__(
            num_classes=num_classes,
            batch_size=batch_size,
            num_workers=num_workers,
            crop_size=crop_size,
            scale_range=scale_range,
            hflip=hflip,
            ignore_index=ignore_index,
            seed=seed,
        )
        if num_classes > MAX_CLASSES:
            raise ValueError(
                f"num_classes must be <= {MAX_CLASSES} for photo textures (one class per source photo: "
                f"{', '.join(CLASS_NAMES)}), got {num_classes}; lower num_classes"
            )
        check_positive("num_train", num_train)
        check_positive("num_val", num_val)
        check_positive("num_test", num_test)
        check_positive("max_regions", max_regions, minimum=2)
        if not 0.0 <= color_jitter <= 1.0:
            raise ValueError(f"color_jitter must be in [0, 1], got {color_jitter}")
        size = tuple(image_size)
        if len(size) != 2 or any(int(s) != s for s in size) or min(size) < 16:
            raise ValueError(f"image_size must be (height, width) with both ints >= 16, got {image_size}")
        skimage_data_dir()  # fail now, not in the first data loader, when scikit-image is missing
        self.image_size = (int(size[0]), int(size[1]))
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.max_regions = max_regions
        self.color_jitter = float(color_jitter)
        self.class_names = CLASS_NAMES[: self.num_classes]
        self.save_hyperparameters()

    def _dataset(self, split: str, length: int, transform: SegmentationTransform) -> PhotoTexturesDataset:
        return PhotoTexturesDataset(
            split,
            length,
            self.num_classes,
            self.image_size,
            self.max_regions,
            self.color_jitter,
            self.seed,
            transform,
        )

    def _build_datasets(self) -> tuple[Dataset, Dataset, Dataset]:
        return (
            self._dataset("train", self.num_train, self.train_transform()),
            self._dataset("val", self.num_val, self.eval_transform()),
            self._dataset("test", self.num_test, self.eval_transform()),
        )
