"""Tests of the data layer: DataModules, joint transforms and the synthetic task's difficulty."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex

from lightning_segcompress.data import (
    CityscapesDataModule,
    SegmentationFolderDataModule,
    SegmentationTransform,
    SyntheticScenesDataModule,
)
from lightning_segcompress.data.cityscapes import label_ids_to_train_ids
from lightning_segcompress.data.synthetic import MAX_CLASSES, SyntheticScenesDataset
from lightning_segcompress.data.transforms import IMAGENET_MEAN, IMAGENET_STD

MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def denormalize(image: torch.Tensor) -> torch.Tensor:
    return ((image * STD + MEAN) * 255).round().to(torch.uint8)


def check_batches(dm, batch_size: int, size: tuple[int, int]) -> None:
    loaders = [dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()]
    for loader in loaders:
        images, masks = next(iter(loader))
        assert images.dtype == torch.float32 and masks.dtype == torch.int64
        assert images.shape[1:] == (3, *size) and masks.shape[1:] == size
        assert images.shape[0] == masks.shape[0] <= batch_size
        assert ((masks >= 0) & (masks < dm.num_classes) | (masks == dm.ignore_index)).all()


# --------------------------------------------------------------------------- fake data trees


def write_pair(image_path: Path, mask_path: Path, size=(32, 48), num_classes=4, seed=0) -> None:
    rng = np.random.default_rng(seed)
    height, width = size
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image_path)
    mask = rng.integers(0, num_classes, (height, width), dtype=np.uint8)
    mask[0, :4] = 255
    Image.fromarray(mask, mode="L").save(mask_path)


def make_folder(root: Path, count: int, ext: str = ".png", **kwargs) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(count):
        write_pair(root / "images" / f"img{i:02d}{ext}", root / "masks" / f"img{i:02d}.png", seed=i, **kwargs)
    return root


def make_cityscapes(root: Path, counts=None, size=(32, 64)) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (counts or {"train": 4, "val": 2}).items():
        for i in range(count):
            city = f"city{i % 2}"
            name = f"{city}_{i:06d}_000019"
            image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
            image_dir.mkdir(parents=True, exist_ok=True)
            label_dir.mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            Image.fromarray(image).save(image_dir / f"{name}_leftImg8bit.png")
            labels = np.zeros(size, dtype=np.uint8)
            labels[:, : size[1] // 3] = 7
            labels[:, size[1] // 3 : 2 * size[1] // 3] = 26
            Image.fromarray(labels, mode="L").save(label_dir / f"{name}_gtFine_labelIds.png")
    return root


# --------------------------------------------------------------------------- synthetic


def small_synthetic(**kwargs) -> SyntheticScenesDataModule:
    defaults = dict(image_size=(32, 32), num_train=8, num_val=4, num_test=4, batch_size=4)
    return SyntheticScenesDataModule(**{**defaults, **kwargs})


def test_synthetic_batches():
    dm = small_synthetic()
    dm.setup("fit")
    check_batches(dm, 4, (32, 32))
    assert dm.num_classes == 6 and dm.ignore_index == 255
    assert dm.hparams["num_train"] == 8
    images, _ = next(iter(small_synthetic(crop_size=(24, 16)).train_dataloader()))
    assert images.shape == (4, 3, 24, 16)


def test_synthetic_determinism():
    first = SyntheticScenesDataset("val", 8, image_size=(32, 32), seed=3)
    second = SyntheticScenesDataset("val", 8, image_size=(32, 32), seed=3)
    for a, b in zip(first[5], second[5]):
        assert torch.equal(a, b)
    other_seed = SyntheticScenesDataset("val", 8, image_size=(32, 32), seed=4)
    assert not torch.equal(first[5][0], other_seed[5][0])
    other_split = SyntheticScenesDataset("test", 8, image_size=(32, 32), seed=3)
    assert not torch.equal(first[5][0], other_split[5][0])
    fresh = SyntheticScenesDataset("val", 8, image_size=(32, 32), seed=3)
    late = [first[i] for i in range(8)][5]
    assert torch.equal(fresh[5][0], late[0]) and torch.equal(fresh[5][1], late[1])


def test_synthetic_train_loader_is_seeded():
    def first_masks(seed):
        return next(iter(small_synthetic(seed=seed, hflip=False).train_dataloader()))[1]

    assert torch.equal(first_masks(0), first_masks(0))


def test_synthetic_class_balance():
    dataset = SyntheticScenesDataset("train", 48, num_classes=6, image_size=(64, 64))
    masks = torch.stack([dataset[i][1] for i in range(48)])
    assert set(masks.unique().tolist()) == set(range(6))
    assert 0.25 < (masks == 0).float().mean().item() < 0.75
    many = SyntheticScenesDataset("train", 64, num_classes=12, image_size=(64, 64))
    assert set(torch.cat([many[i][1].flatten() for i in range(64)]).unique().tolist()) == set(range(12))


def test_synthetic_baselines_are_weak():
    """Neither the majority class nor per-pixel colour predicts the synthetic labels."""
    num_classes = 6
    dm = SyntheticScenesDataModule(
        num_classes=num_classes, image_size=(64, 64), num_train=64, num_val=32, hflip=False
    )
    dm.setup("fit")
    train = [dm.train_set[i] for i in range(64)]
    val = [dm.val_set[i] for i in range(32)]
    train_pixels = torch.stack([image for image, _ in train]).permute(0, 2, 3, 1).reshape(-1, 3)
    train_labels = torch.stack([mask for _, mask in train]).flatten()
    val_pixels = torch.stack([image for image, _ in val]).permute(0, 2, 3, 1).reshape(-1, 3)
    val_labels = torch.stack([mask for _, mask in val]).flatten()

    majority = torch.bincount(train_labels, minlength=num_classes).argmax()
    centroids = torch.stack([train_pixels[train_labels == k].mean(0) for k in range(num_classes)])
    by_colour = torch.cdist(val_pixels, centroids).argmin(1)

    def miou(pred):
        metric = MulticlassJaccardIndex(num_classes, ignore_index=255)
        return metric(pred, val_labels).item()

    majority_miou, colour_miou = miou(torch.full_like(val_labels, int(majority))), miou(by_colour)
    print(f"majority-class mIoU {majority_miou:.3f}, colour-centroid mIoU {colour_miou:.3f}")
    assert majority_miou < 0.25
    assert colour_miou < 0.25


# --------------------------------------------------------------------------- transforms


def test_transform_flip_and_crop_are_joint():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = image[..., 0].astype(np.int64)  # the mask is a copy of the red channel: any misalignment shows
    flip = SegmentationTransform(train=True, hflip_prob=1.0)
    out_image, out_mask = flip(image, mask)
    assert torch.equal(out_mask, torch.from_numpy(mask).flip(-1))
    assert torch.equal(denormalize(out_image)[0].long(), out_mask)

    crop = SegmentationTransform(train=True, crop_size=(16, 12), hflip_prob=1.0)
    for _ in range(5):
        out_image, out_mask = crop(image, mask)
        assert out_image.shape == (3, 16, 12) and out_mask.shape == (16, 12)
        assert torch.equal(denormalize(out_image)[0].long(), out_mask)


def test_transform_pads_mask_with_ignore_index_and_scales_with_nearest():
    image = torch.full((3, 10, 10), 128, dtype=torch.uint8)
    mask = torch.zeros(10, 10, dtype=torch.long)
    mask[:, 5:] = 3
    _, padded = SegmentationTransform(train=True, crop_size=(16, 16), hflip=False)(image, mask)
    assert padded.shape == (16, 16) and (padded == 255).any()
    assert set(padded.unique().tolist()) == {0, 3, 255}
    big_image, big_mask = SegmentationTransform(train=True, scale_range=(2.0, 2.0), hflip=False)(image, mask)
    assert big_image.shape == (3, 20, 20) and set(big_mask.unique().tolist()) == {0, 3}


def test_transform_accepts_pil_numpy_and_tensor():
    array = np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8)
    mask = np.ones((12, 16), dtype=np.uint8)
    transform = SegmentationTransform(train=False, size=(8, 8))
    outputs = [
        transform(array, mask),
        transform(Image.fromarray(array), Image.fromarray(mask)),
        transform(torch.from_numpy(array).permute(2, 0, 1), torch.from_numpy(mask)),
    ]
    for image, out_mask in outputs:
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and out_mask.dtype == torch.int64
        assert torch.allclose(image, outputs[0][0])
    with pytest.raises(ValueError, match="differ"):
        transform(array, mask[:6])


# --------------------------------------------------------------------------- folder


def test_folder_layout_b_splits_deterministically(tmp_path):
    root = make_folder(tmp_path / "data", 10, ext=".jpg")
    dm = SegmentationFolderDataModule(
        str(root), num_classes=4, val_fraction=0.3, batch_size=2, crop_size=(16, 16)
    )
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), dm.test_set) == (7, 3, None)
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 16, 16) and masks.shape == (2, 16, 16) and masks.dtype == torch.int64
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 3, 32, 48) and masks.shape == (2, 32, 48)
    again = SegmentationFolderDataModule(str(root), num_classes=4, val_fraction=0.3)
    again.setup()
    assert again.val_set.pairs == dm.val_set.pairs
    train_stems = {p.stem for p, _ in dm.train_set.pairs}
    assert train_stems.isdisjoint(p.stem for p, _ in dm.val_set.pairs)


def test_folder_layout_a_with_test_split(tmp_path):
    for split, count in (("train", 4), ("val", 2), ("test", 3)):
        make_folder(tmp_path / split, count)
    dm = SegmentationFolderDataModule(
        str(tmp_path), num_classes=4, batch_size=2, crop_size=(24, 24), image_size=(32, 32)
    )
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 2, 3)
    assert dm.predict_dataloader().dataset is dm.test_set
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 24, 24) and masks.shape == (2, 24, 24)
    images, masks = next(iter(dm.test_dataloader()))
    assert images.shape == (2, 3, 32, 32) and masks.dtype == torch.int64


def test_folder_structural_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SegmentationFolderDataModule(str(tmp_path / "missing"), num_classes=4).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="images does not exist"):
        SegmentationFolderDataModule(str(tmp_path / "empty"), num_classes=4).setup()
    make_folder(tmp_path / "a" / "train", 2)
    with pytest.raises(FileNotFoundError, match="add a val/ split"):
        SegmentationFolderDataModule(str(tmp_path / "a"), num_classes=4).setup()
    root = make_folder(tmp_path / "b", 4)
    (root / "masks" / "img01.png").unlink()
    (root / "masks" / "img03.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"2 image\(s\).*no mask.*'img01', 'img03'"):
        SegmentationFolderDataModule(str(root), num_classes=4).setup()


def test_folder_per_file_errors(tmp_path):
    root = make_folder(tmp_path / "data", 4)
    write_pair(root / "images" / "img00.png", root / "masks" / "img00.png", num_classes=7)
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8)).save(root / "masks" / "img01.png")
    Image.fromarray(np.zeros((32, 48, 3), dtype=np.uint8)).save(root / "masks" / "img02.png")
    dm = SegmentationFolderDataModule(str(root), num_classes=4, val_fraction=0.5)
    dm.setup()
    datasets = {p.stem: (ds, i) for ds in (dm.train_set, dm.val_set) for i, (p, _) in enumerate(ds.pairs)}

    def load(stem):
        ds, index = datasets[stem]
        return ds[index]

    with pytest.raises(ValueError, match=r"img00\.png has labels \[4, 5, 6\].*set num_classes"):
        load("img00")
    with pytest.raises(ValueError, match=r"img01\.png is 20x20 \(WxH\) but image .* is 48x32"):
        load("img01")
    with pytest.raises(ValueError, match="mode RGB"):
        load("img02")
    image, mask = load("img03")
    assert mask.dtype == torch.int64 and (mask == 255).any()


# --------------------------------------------------------------------------- cityscapes


def test_cityscapes_label_mapping():
    ids = np.array([7, 8, 26, 33, 0, 1, 6, 34, -1, 255])
    assert label_ids_to_train_ids(ids).tolist() == [0, 1, 13, 18, 255, 255, 255, 255, 255, 255]
    assert label_ids_to_train_ids(ids, ignore_index=-100)[4] == -100


def test_cityscapes_batches_and_mapping(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    dm = CityscapesDataModule(str(root), crop_size=(16, 32), scale_range=(0.75, 1.5), batch_size=2)
    assert dm.num_classes == 19
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (4, 2)
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 16, 32) and masks.dtype == torch.int64
    assert dm.test_dataloader().dataset is dm.val_set and dm.predict_dataloader().dataset is dm.val_set
    _, mask = dm.val_set[0]
    assert mask.shape == (32, 64)
    assert mask[:, :21].unique().tolist() == [0]
    assert mask[:, 22:42].unique().tolist() == [13]
    assert mask[:, 43:].unique().tolist() == [255]


def test_cityscapes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Cityscapes root .* does not exist"):
        CityscapesDataModule(str(tmp_path / "missing")).setup()
    root = make_cityscapes(tmp_path / "only_train", counts={"train": 2})
    with pytest.raises(FileNotFoundError, match=r"leftImg8bit/val does not exist"):
        CityscapesDataModule(str(root)).setup()
    root = make_cityscapes(tmp_path / "no_label")
    next((root / "gtFine" / "val").glob("*/*_labelIds.png")).unlink()
    with pytest.raises(FileNotFoundError, match="1 image.*no gtFine labelIds file"):
        CityscapesDataModule(str(root)).setup()
    root = make_cityscapes(tmp_path / "bad_size")
    label = next((root / "gtFine" / "val").glob("*/*_labelIds.png"))
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(label)
    dm = CityscapesDataModule(str(root))
    dm.setup()
    bad = [i for i, (_, path) in enumerate(dm.val_set.pairs) if path == label][0]
    with pytest.raises(ValueError, match="is 16x16 .* but image .* is 64x32"):
        dm.val_set[bad]


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(num_workers=-1), "num_workers must be >= 0"),
        (dict(num_classes=1), "num_classes must be >= 2"),
        (dict(num_classes=MAX_CLASSES + 1), "num_classes must be <="),
        (dict(num_train=0), "num_train must be >= 1"),
        (dict(max_objects=0), "max_objects must be >= 1"),
        (dict(scale_range=(2.0, 1.0)), "scale_range must be"),
        (dict(scale_range=(0.0, 1.0)), "scale_range must be"),
        (dict(crop_size=(0, 16)), "crop_size must be two positive ints"),
        (dict(image_size=(8, 64)), "image_size must be"),
        (dict(ignore_index=3), "ignore_index=3 is a valid class id"),
    ],
)
def test_synthetic_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticScenesDataModule(**kwargs)


def test_folder_and_cityscapes_config_validation(tmp_path):
    with pytest.raises(ValueError, match="val_fraction must be in"):
        SegmentationFolderDataModule(str(tmp_path), num_classes=4, val_fraction=1.0)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        SegmentationFolderDataModule(str(tmp_path), num_classes=1)
    with pytest.raises(ValueError, match="image_size must be two positive ints"):
        CityscapesDataModule(str(tmp_path), image_size=(-1, 4))
    with pytest.raises(ValueError, match="fewer than batch_size"):
        small_synthetic(num_train=2).train_dataloader()


def test_datamodules_parse_with_jsonargparse():
    parser = ArgumentParser()
    parser.add_class_arguments(SyntheticScenesDataModule, "synthetic")
    parser.add_class_arguments(SegmentationFolderDataModule, "folder")
    parser.add_class_arguments(CityscapesDataModule, "cityscapes")
    cfg = parser.parse_args(
        ["--synthetic.image_size=[64, 64]", "--folder.root=/data", "--folder.num_classes=3",
         "--folder.crop_size=[32, 32]", "--cityscapes.root=/cs", "--cityscapes.crop_size=null"]
    )  # fmt: skip
    assert cfg.synthetic.image_size == (64, 64) and cfg.folder.crop_size == (32, 32)
    assert cfg.cityscapes.crop_size is None and cfg.cityscapes.scale_range == (0.5, 2.0)
