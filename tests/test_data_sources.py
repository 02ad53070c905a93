"""pipeline.tokenize.sources and pipeline.images on real dataset layouts: ImageNet val as distributed (a flat
folder + each label file users have), class alignment across splits, and U-ViT's COCO crop."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError
from pipeline.tokenize.sources import align_classes, list_image_folder
from tests.datasets import make_imagenet_like


@pytest.fixture
def imagenet(tmp_path):
    return make_imagenet_like(tmp_path / "ilsvrc")


@pytest.mark.parametrize("fmt", ["kaggle-csv", "devkit-txt-synsets", "devkit-meta-mat"])
def test_flat_val_takes_the_train_class_indices(imagenet, fmt):
    data = imagenet
    assert data.devkit_order != sorted(data.devkit_order)  # ILSVRC2012_ID order is not the label order
    labels, synsets = {"kaggle-csv": (data.csv, None), "devkit-txt-synsets": (data.ground_truth, data.synsets_txt),
                       "devkit-meta-mat": (data.ground_truth, data.meta_mat)}[fmt]
    root = str(data.root)
    listings = {"train": list_image_folder(root, "train"),
                "val": list_image_folder(root, "val", labels=labels, synsets=synsets)}
    assert align_classes(listings) == data.classes  # as official: sorted train folder names
    val = listings["val"]
    assert [it.key for it in val.items] == sorted(data.val_truth)
    assert [it.label for it in val.items] == [data.classes.index(data.val_truth[it.key]) for it in val.items]
    assert len({it.label for it in val.items}) == len(data.classes) and val.classes == data.classes
    assert [it.label for it in listings["train"].items] == \
        [data.classes.index(it.key.split("/")[0]) for it in listings["train"].items]


def test_flat_val_labels_align_to_an_existing_dataset(imagenet):
    """A val-only run into a dataset whose train split is already tokenized uses its classes."""
    data = imagenet
    known = data.classes + ["n09999999"]  # dataset.json of the earlier train run
    val = list_image_folder(str(data.root), "val", labels=data.csv)
    assert align_classes({"val": val}, known) == known
    assert [it.label for it in val.items] == [known.index(data.val_truth[it.key]) for it in val.items]


def test_label_file_problems_are_named_before_any_decode(imagenet):
    data, root = imagenet, str(imagenet.root)
    with pytest.raises(ConfigError, match=r"source\.labels\.val: 6 images lie directly in"):
        list_image_folder(root, "val")  # used to become one class named "val"
    with pytest.raises(ConfigError, match=r"source\.synsets: required"):
        list_image_folder(root, "val", labels=data.ground_truth)
    lines = (data.root / data.csv).read_text().splitlines()
    missing = lines[1].split(",")[0]
    (data.root / "partial.csv").write_text("\n".join(lines[:1] + lines[2:]) + "\n")
    with pytest.raises(ConfigError, match=f"partial.csv has no label for 1 of the 6 images.*{missing}"):
        list_image_folder(root, "val", labels="partial.csv")
    with pytest.raises(FileNotFoundError, match="nope.csv: label file"):
        list_image_folder(root, "val", labels="nope.csv")
    (data.root / "wrong.csv").write_text("ImageId,PredictionString\n" +
                                         "".join(f"{s},n07777777 1 2 3 4\n" for s in data.val_truth))
    listings = {"train": list_image_folder(root, "train"), "val": list_image_folder(root, "val", labels="wrong.csv")}
    with pytest.raises(ConfigError, match=r"source\.labels\.val: .*wrong.csv names classes \['n07777777'\]"):
        align_classes(listings)


def test_class_folders_must_match_across_splits(tmp_path):
    for split, classes in (("train", ["n01", "n02", "n03"]), ("val", ["n01", "n02", "n04"])):
        for c in classes:
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (16, 16)).save(tmp_path / split / c / "a.png")
    listings = {s: list_image_folder(str(tmp_path), s) for s in ("train", "val")}
    with pytest.raises(ConfigError, match=r"split 'val' differ.*only in 'val': \['n04'\], missing in 'val': \['n03'\]"):
        align_classes(listings)


def test_limit_keeps_the_labels_of_the_full_split(imagenet):
    full = list_image_folder(str(imagenet.root), "train")
    few = list_image_folder(str(imagenet.root), "train", limit=3)
    assert few.classes == full.classes and [it.label for it in few.items] == [it.label for it in full.items[:3]]


def test_uvit_crop_matches_pil_on_a_non_square_image():
    """U-ViT's COCO crop (datasets.py center_crop): the centered short-side square, one Lanczos resize."""
    from pipeline.images import decode_and_crop, resolve_crop

    rng = np.random.default_rng(0)
    for w, h in ((97, 61), (50, 83)):
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "PNG")
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        ref = np.asarray(Image.fromarray(arr).crop((left, top, left + side, top + side))
                         .resize((32, 32), Image.Resampling.LANCZOS))
        got = decode_and_crop(buf.getvalue(), 32, crop="uvit")
        assert got.ok and got.array.shape == (32, 32, 3)
        np.testing.assert_array_equal(got.array, ref)
        assert not np.array_equal(decode_and_crop(buf.getvalue(), 32).array, ref)  # ADM's crop differs
    assert resolve_crop("auto", "coco") == "uvit" and resolve_crop("auto", "imagefolder") == "adm"
