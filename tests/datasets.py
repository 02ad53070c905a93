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
import json
import struct
import zlib
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


# ---------------------------------------------------------------------------------------------------
# Image folders and COCO releases full of bad inputs (the tokenize job's tests)


def _rand_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    # smooth random image: low-res noise upsampled, so codes vary across the picture
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _encode(arr_or_img, fmt: str, **kw) -> bytes:
    from PIL import Image

    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims ``width × height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_images(rng: np.random.Generator) -> dict[str, tuple[bytes, str | None]]:
    """name → (file bytes, expected reject reason or None when it must be converted and kept)."""
    from PIL import Image

    base = _rand_image(rng, 48, 40)
    good_jpeg = _encode(base, "JPEG", quality=90)
    rgba = np.concatenate([base, rng.integers(0, 256, (40, 48, 1), dtype=np.uint8)], axis=-1)
    pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    sixteen = Image.fromarray((rng.integers(0, 65535, (40, 48))).astype(np.uint16))
    big_jpeg = _encode(_rand_image(rng, 200, 160), "JPEG", quality=95)
    return {
        "truncated.JPEG": (big_jpeg[: len(big_jpeg) * 2 // 3], "truncated"),  # header intact, data cut
        "truncatedhead.JPEG": (good_jpeg[:300], "truncated"),  # cut inside the header
        "notimage.JPEG": (b"this is not an image at all\n" * 10, "not-an-image"),
        "empty.JPEG": (b"", "empty"),
        "tiny.png": (_encode(_rand_image(rng, 4, 3), "PNG"), "tiny"),
        "bomb.png": (png_bomb(), "decompression-bomb"),
        "cmyk.JPEG": (_encode(Image.fromarray(base).convert("CMYK"), "JPEG"), None),
        "gray.JPEG": (_encode(Image.fromarray(base).convert("L"), "JPEG"), None),
        "palette.png": (_encode(pal, "PNG"), None),
        "sixteen.png": (_encode(sixteen, "PNG"), None),
        "alpha.png": (_encode(Image.fromarray(rgba, "RGBA"), "PNG"), None),
    }


@dataclass
class ImageFolderData:
    root: Path
    split: str
    classes: list[str]
    files: dict[str, str | None]  # relative path under root → expected reject reason (None = kept)
    converted: set[str]  # relative paths expected to be converted from another mode


def make_image_folder(root: Path, split: str = "train", classes=("n02", "n01", "n03"), per_class: int = 6,
                      seed: int = 0, bad: bool = True, size=(40, 72)) -> ImageFolderData:
    """ImageNet layout ``root/split/<class>/<img>.JPEG`` with random sizes; ``bad`` adds every bad input."""
    rng = np.random.default_rng(seed)
    files: dict[str, str | None] = {}
    converted: set[str] = set()
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(x) for x in rng.integers(size[0], size[1], 2))
            rel = f"{split}/{c}/{c}_{i:04d}.JPEG"
            (root / rel).write_bytes(_encode(_rand_image(rng, w, h), "JPEG", quality=92))
            files[rel] = None
    if bad:
        c = sorted(classes)[0]
        for name, (data, reason) in bad_images(rng).items():
            rel = f"{split}/{c}/zz_{name}"
            (root / rel).write_bytes(data)
            files[rel] = reason
            if reason is None:
                converted.add(rel)
        rel = f"{split}/{c}/readme.txt"  # wrong extension: recorded, not silently dropped
        (root / rel).write_text("notes")
        files[rel] = "extension"
    return ImageFolderData(root, split, sorted(classes), files, converted)


@dataclass
class CocoData:
    root: Path
    split: str
    captions: dict[str, list[str]]  # key of every image that must be kept → its captions
    rejects: dict[str, str]  # key → expected reason


def make_coco(root: Path, split: str = "train2014", n: int = 8, seed: int = 0) -> CocoData:
    """COCO layout: annotations/captions_<split>.json + <split>/*.jpg, with bad entries."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns, captions, rejects = [], [], {}, {}
    aid = 1
    for i in range(n):
        iid = 1000 - 7 * i  # ids not in file order: listing must sort by id
        name = f"COCO_{split}_{iid:012d}.jpg"
        w, h = (int(x) for x in rng.integers(40, 80, 2))
        (root / split / name).write_bytes(_encode(_rand_image(rng, w, h), "JPEG"))
        images.append({"id": iid, "file_name": name, "width": w, "height": h})
        caps = [f"a photo number {i} variant {j} of something" for j in range(int(rng.integers(1, 4)))]
        for c in caps:
            anns.append({"id": aid, "image_id": iid, "caption": c})
            aid += 1
        captions[name[:-4]] = caps
    # an image with no caption
    name = f"COCO_{split}_{5:012d}.jpg"
    (root / split / name).write_bytes(_encode(_rand_image(rng, 50, 50), "JPEG"))
    images.append({"id": 5, "file_name": name, "width": 50, "height": 50})
    rejects[name[:-4]] = "no-caption"
    # a caption pointing to an image entry whose file is missing
    name = f"COCO_{split}_{6:012d}.jpg"
    images.append({"id": 6, "file_name": name, "width": 50, "height": 50})
    anns.append({"id": aid, "image_id": 6, "caption": "the image is gone"})
    aid += 1
    rejects[name[:-4]] = "missing-image"
    # a caption pointing to an image id that is not listed at all
    anns.append({"id": aid, "image_id": 424242, "caption": "dangling"})
    rejects[f"ann-{aid}"] = "missing-image"
    # a broken image file with captions
    name = f"COCO_{split}_{7:012d}.jpg"
    (root / split / name).write_bytes(b"")
    images.append({"id": 7, "file_name": name, "width": 50, "height": 50})
    anns.append({"id": aid + 1, "image_id": 7, "caption": "empty file"})
    rejects[name[:-4]] = "empty"
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return CocoData(root, split, captions, rejects)


def tiny_clip(d: Path) -> None:
    """A tiny random CLIP text model + byte-level tokenizer in save_pretrained layout."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # the GPT-2/CLIP byte-level alphabet: printable bytes stand for themselves, the rest map to 256+
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
                         pad_token_id=513)
    CLIPTextModel(cfg).save_pretrained(d)
