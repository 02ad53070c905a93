"""Generators of small dataset layouts as they are really distributed (for the data tests).

:func:`make_imagenet_like` writes ILSVRC2012 as it ships: ``train/<wnid>/<wnid>_<n>.JPEG`` class
folders and a flat ``val/ILSVRC2012_val_<8 digits>.JPEG`` folder, plus every label file users have
for val — the Kaggle ``LOC_val_solution.csv``, the devkit's
``ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt`` with its ``meta.mat`` and a
wnid-per-line export of it. The devkit's synset order (ILSVRC2012_ID) is deliberately NOT the sorted
wnid order, as in the real devkit, so a reader that confuses the two gets wrong labels.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

DEVKIT = "ILSVRC2012_devkit_t12/data"


def jpeg(rng: np.random.Generator, w: int, h: int) -> bytes:
    """A smooth random RGB JPEG of ``w × h`` pixels."""
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@dataclass
class ImageNetLike:
    root: Path
    classes: list[str]  # sorted wnids: label i = classes[i] (the train split's, as official)
    val_truth: dict[str, str]  # val image stem → wnid
    devkit_order: list[str]  # wnid of ILSVRC2012_ID 1, 2, …
    csv: str = "LOC_val_solution.csv"  # label files, relative to root
    ground_truth: str = f"{DEVKIT}/ILSVRC2012_validation_ground_truth.txt"
    meta_mat: str = f"{DEVKIT}/meta.mat"
    synsets_txt: str = f"{DEVKIT}/synsets.txt"


def make_imagenet_like(root: Path, wnids: tuple[str, ...] = ("n02119789", "n01440764", "n03000134"),
                       train_per_class: int = 2, val: int = 6, seed: int = 0) -> ImageNetLike:
    """ImageNet as distributed (module docstring); ``wnids`` are in devkit (ILSVRC2012_ID) order."""
    rng = np.random.default_rng(seed)
    for w in wnids:
        d = root / "train" / w
        d.mkdir(parents=True, exist_ok=True)
        for i in range(train_per_class):
            (d / f"{w}_{i + 1}.JPEG").write_bytes(jpeg(rng, int(rng.integers(40, 70)), int(rng.integers(40, 70))))
    (root / "val").mkdir(parents=True, exist_ok=True)
    truth = {}
    for n in range(1, val + 1):
        stem = f"ILSVRC2012_val_{n:08d}"
        truth[stem] = wnids[(2 * n) % len(wnids)]  # every class, in no sorted order
        (root / "val" / f"{stem}.JPEG").write_bytes(jpeg(rng, int(rng.integers(40, 70)), int(rng.integers(40, 70))))
    data = ImageNetLike(root, sorted(wnids), truth, list(wnids))
    # Kaggle: ImageId,PredictionString ("<wnid> x0 y0 x1 y1 [<wnid> …]"), rows in no particular order
    lines = ["ImageId,PredictionString"] + [f"{s},{w} 1 2 30 40 {w} 3 4 20 30 " for s, w in reversed(truth.items())]
    (root / data.csv).write_text("\n".join(lines) + "\n")
    # devkit: one 1-based ILSVRC2012_ID per line, image n on line n
    (root / DEVKIT).mkdir(parents=True, exist_ok=True)
    (root / data.ground_truth).write_text("".join(f"{wnids.index(w) + 1}\n" for w in truth.values()))
    (root / data.synsets_txt).write_text("".join(f"{w}\n" for w in wnids))
    write_meta_mat(root / data.meta_mat, list(wnids))
    return data


def write_meta_mat(path: Path, leaves: list[str]) -> None:
    """A devkit-shaped ``meta.mat``: a ``synsets`` struct array (ILSVRC2012_ID, WNID, words,
    num_children), the leaves first with ids 1..K, then one non-leaf parent synset."""
    import scipy.io

    rows = [(i + 1, w, f"class {w}", 0) for i, w in enumerate(leaves)] + \
           [(len(leaves) + 1, "n00001740", "entity", len(leaves))]
    arr = np.zeros((len(rows), 1), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"),
                                          ("num_children", "O")])
    for i, r in enumerate(rows):
        arr[i, 0] = r
    scipy.io.savemat(str(path), {"synsets": arr})
