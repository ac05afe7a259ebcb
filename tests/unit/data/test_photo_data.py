"""PhotoTexturesDataModule: real-photo texture mosaics from scikit-image's bundled sample photos."""

import importlib.util

import pytest
import torch
import yaml
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_segcompress import PhotoTexturesDataModule
from lightning_segcompress.data import photo_textures
from lightning_segcompress.data.photo_textures import CLASS_NAMES, MAX_CLASSES, PhotoTexturesDataset


def raw(split="train", length=8, num_classes=6, size=(32, 32), seed=0, **kwargs):
    """The first ``length`` untransformed (image in [0, 1], mask) pairs of a split."""
    dataset = PhotoTexturesDataset(split, length, num_classes, size, seed=seed, **kwargs)
    return [dataset[i] for i in range(length)]


def test_same_seed_same_tensors_other_seed_or_split_other_images():
    first, again = raw(seed=3), raw(seed=3)
    for (image, mask), (image2, mask2) in zip(first, again):
        assert torch.equal(image, image2) and torch.equal(mask, mask2)
    for other in (raw(seed=4), raw(split="val", seed=3)):
        assert all(not torch.equal(a[0], b[0]) for a, b in zip(first, other))
    # Items are independent of the data set length (rendered per index).
    assert torch.equal(PhotoTexturesDataset("train", 2, 6, (32, 32), seed=3)[1][0], first[1][0])


def test_shapes_dtypes_label_range_and_loaders():
    for image, mask in raw(length=6, size=(24, 40)):
        assert image.shape == (3, 24, 40) and image.dtype == torch.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert mask.shape == (24, 40) and mask.dtype == torch.int64
        assert 0 <= mask.min() and mask.max() < 6
        assert len(mask.unique()) >= 1

    dm = PhotoTexturesDataModule(num_classes=4, image_size=(32, 48), num_train=4, num_val=3, num_test=2,
                                 batch_size=2)
    assert dm.class_names == CLASS_NAMES[:4] == ("brick", "grass", "gravel", "wood")
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 48) and images.dtype == torch.float32
    assert masks.shape == (2, 32, 48) and masks.dtype == torch.int64
    assert len(dm.val_set) == 3 and len(dm.test_set) == 2
    images, _ = next(iter(dm.val_dataloader()))
    assert images.min() < 0  # ImageNet-normalised like the other data modules


def test_every_class_appears_and_mosaics_have_several_regions():
    items = raw(length=24, num_classes=MAX_CLASSES, size=(32, 32))
    masks = torch.stack([mask for _, mask in items])
    assert set(masks.unique().tolist()) == set(range(MAX_CLASSES))
    per_image = [len(mask.unique()) for mask in masks]
    assert max(per_image) >= 3 and sum(n >= 2 for n in per_image) >= len(items) - 2


def test_class_is_not_readable_from_colour():
    """Per-region mean colours of one class spread as widely as across classes; photo colours would not."""

    def region_means(items):
        means = {k: [] for k in range(6)}
        for image, mask in items:
            for k in mask.unique().tolist():
                inside = mask == k
                if inside.sum() >= 30:
                    means[k].append(image[:, inside].mean(1))
        return {k: torch.stack(v) for k, v in means.items() if len(v) >= 3}

    def colour_centroid_miou(train, val):
        """mIoU of labelling val pixels by the nearest per-class mean colour learnt on train pixels."""
        pixels = torch.cat([image.flatten(1).T for image, _ in train])
        labels = torch.cat([mask.flatten() for _, mask in train])
        centroids = torch.stack([pixels[labels == k].mean(0) for k in range(6)])
        val_pixels = torch.cat([image.flatten(1).T for image, _ in val])
        pred = torch.cdist(val_pixels, centroids).argmin(1)
        return MulticlassJaccardIndex(6)(pred, torch.cat([mask.flatten() for _, mask in val])).item()

    train_j, val_j = raw(length=24, color_jitter=1.0), raw("val", 12, color_jitter=1.0)
    train_p, val_p = raw(length=24, color_jitter=0.0), raw("val", 12, color_jitter=0.0)
    jittered = region_means(train_j)
    within = torch.stack([m.std(0).mean() for m in jittered.values()]).mean()
    between = torch.stack([m.mean(0) for m in jittered.values()]).std(0).mean()
    plain_within = torch.stack([m.std(0).mean() for m in region_means(train_p).values()]).mean()
    jittered_miou, plain_miou = colour_centroid_miou(train_j, val_j), colour_centroid_miou(train_p, val_p)
    print(f"region mean colour spread within class {within:.3f} (photo colours {plain_within:.3f}), "
          f"between class means {between:.3f}; colour-centroid mIoU {jittered_miou:.3f} "
          f"(photo colours {plain_miou:.3f})")
    assert within > 0.12 and within > 2 * between  # class means sit well inside each class's own spread
    assert plain_within < within / 2
    assert jittered_miou < 0.2 and plain_miou > jittered_miou + 0.05


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": MAX_CLASSES + 1}, rf"num_classes must be <= {MAX_CLASSES}.*lower num_classes"),
        ({"num_classes": 1}, "num_classes must be >= 2"),
        ({"image_size": (8, 64)}, r"image_size must be .* >= 16"),
        ({"image_size": (64,)}, "image_size must be"),
        ({"num_train": -1}, "num_train must be >= 1"),
        ({"num_val": 0}, "num_val must be >= 1"),
        ({"num_test": -5}, "num_test must be >= 1"),
        ({"max_regions": 1}, "max_regions must be >= 2"),
        ({"color_jitter": 1.5}, r"color_jitter must be in \[0, 1\]"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
    ],
)
def test_bad_arguments_fail_clearly(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PhotoTexturesDataModule(**kwargs)


def test_missing_scikit_image_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(photo_textures.importlib.util, "find_spec",
                        lambda name, *a: None if name == "skimage" else real(name, *a))
    with pytest.raises(ImportError, match="pip install scikit-image"):
        PhotoTexturesDataModule()
    with pytest.raises(ImportError, match="pip install scikit-image"):
        PhotoTexturesDataset("train", 2)


def test_builds_from_cli_yaml_with_plain_values(tmp_path):
    from lightning_segcompress.cli import SegCompressCLI

    config = {
        "model": {"init_args": {"num_classes": 5}},
        "data": {"class_path": "lightning_segcompress.PhotoTexturesDataModule",
                 "init_args": {"num_classes": 5, "image_size": [32, 32], "num_train": 4, "num_val": 2,
                               "num_test": 2, "max_regions": 3, "color_jitter": 0.5, "seed": 7,
                               "batch_size": 2}},
    }
    path = tmp_path / "photo.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = SegCompressCLI(args=["--config", str(path)], run=False)
    dm = cli.datamodule
    assert isinstance(dm, PhotoTexturesDataModule)
    assert (dm.num_classes, dm.image_size, dm.max_regions, dm.color_jitter, dm.seed) == (5, (32, 32), 3, 0.5, 7)
    assert dm.hparams["color_jitter"] == 0.5
