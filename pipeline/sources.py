"""List a dataset split into a stable, deterministic order of items; assign items to shards.

Two layouts, local or on object storage:

* **image folder** (ImageNet and any user data): ``{root}/{split}/<class>/<image>``. Labels are the
  index of the class (parent folder) name among the split's sorted class names, and items are in
  the order of a depth-first walk over sorted directory entries — both exactly as the official
  ``dataset.py`` (``_list_image_files_recursively``, ``ImageNet.__init__``), so row ``i`` of the
  official ``train.npy`` (before its flip interleaving) is item ``i`` here.
* **MS-COCO 2014/2017**: ``{root}/annotations/captions_{split}.json`` + ``{root}/{split}/``. Items are
  the images in ascending image-id order, each with all of its captions (in annotation order).

Nothing vanishes silently: files with other extensions, COCO images without a caption, caption
entries whose image is missing, and images that no annotation mentions become :class:`Reject`
records. Shard ``s`` holds items ``[s·R, (s+1)·R)`` of the stable order (:func:`plan_shards`), so
shard contents do not depend on how the job was scheduled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional, Sequence

from pipeline import storage
from pipeline.storage import StorageLike


@dataclass(frozen=True)
class Item:
    """One image to tokenize."""

    index: int  # position in the split's stable order
    key: str  # sample key: relative path without extension ("n01440764/n01440764_10026")
    path: str  # path relative to the dataset root ("train/n01440764/n01440764_10026.JPEG")
    url: str  # full URL/path to read the bytes from
    label: int = -1  # class index (-1: none)
    captions: tuple[str, ...] = ()  # COCO captions


@dataclass(frozen=True)
class Reject:
    """A record that was not tokenized, and why (a row of rejects.parquet)."""

    key: str
    path: str
    reason: str
    detail: str = ""
    shard: int = -1  # -1: rejected while listing


@dataclass
class Listing:
    """A listed split: items in stable order, class names (label i = classes[i]), listing rejects."""

    split: str
    items: list[Item]
    classes: list[str] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


@dataclass(frozen=True)
class ShardPlan:
    """The items of one shard; ``fingerprint`` identifies its contents across reruns."""

    split: str
    shard: int
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return shard_name(self.split, self.shard)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(json.dumps([it.index, it.key, it.path, it.label, list(it.captions)]).encode())
        return h.hexdigest()


def shard_name(split: str, shard: int) -> str:
    """``("train", 3)`` → ``"train-000003"`` (brace-expandable: ``train-{000000..000099}.tar``)."""
    return f"{split}-{shard:06d}"


def plan_shards(listing: Listing, samples_per_shard: int) -> list[ShardPlan]:
    """Cut the stable item order into shards of ``samples_per_shard`` items (the last may be short)."""
    items = listing.items
    return [ShardPlan(listing.split, s, tuple(items[i:i + samples_per_shard]))
            for s, i in enumerate(range(0, len(items), samples_per_shard))]


def _rel(path: str, root_path: str) -> str:
    return path[len(root_path):].lstrip("/") if path.startswith(root_path) else path


def _strip_ext(name: str) -> str:
    head, _, tail = name.rpartition("/")
    stem = tail.rsplit(".", 1)[0] if "." in tail else tail
    return f"{head}/{stem}" if head else stem


def list_image_folder(root: str, split: str, storage_cfg: StorageLike = None,
                      extensions: Sequence[str] = ("jpg", "jpeg", "png", "gif"),
                      limit: Optional[int] = None) -> Listing:
    """List ``{root}/{split}`` (class-folder layout) in the official order with official labels.

    Raises ``FileNotFoundError`` if the split folder does not exist or holds no image.
    """
    fs, root_path = storage.filesystem(root, storage_cfg)
    root_path = root_path.rstrip("/")
    split_path = f"{root_path}/{split}"
    storage.invalidate(fs, split_path)
    if not fs.exists(split_path):
        raise FileNotFoundError(f"{storage.redact(storage.join(root, split))}: split folder does not exist")
    exts = {e.lower().lstrip(".") for e in extensions}
    files = list(fs.find(split_path))
    # as official: _list_image_files_recursively sorts the entries of every directory and recurses
    # depth first, which is the lexicographic order of the path components.
    files.sort(key=lambda p: _rel(p, split_path).split("/"))
    images, rejects = [], []
    for p in files:
        name = p.rsplit("/", 1)[-1]
        ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
        rel = _rel(p, root_path)
        if "." not in name or ext not in exts:
            rejects.append(Reject(key=_strip_ext(_rel(p, split_path)), path=rel, reason="extension",
                                  detail=f"extension {ext!r} not in {sorted(exts)}"))
            continue
        images.append(p)
    if limit is not None:
        images = images[:limit]
    if not images:
        raise FileNotFoundError(f"{storage.redact(storage.join(root, split))}: no image files "
                                f"with extensions {sorted(exts)}")
    # as official: the label is the index of the parent folder's name among the sorted names
    parents = [p.rsplit("/", 2)[-2] for p in images]
    classes = sorted(set(parents))
    index = {c: i for i, c in enumerate(classes)}
    items = [Item(index=i, key=_strip_ext(_rel(p, split_path)), path=_rel(p, root_path),
                  url=storage.to_url(fs, p), label=index[parent])
             for i, (p, parent) in enumerate(zip(images, parents))]
    return Listing(split=split, items=items, classes=classes, rejects=rejects)


def list_coco(root: str, split: str, storage_cfg: StorageLike = None,
              limit: Optional[int] = None) -> Listing:
    """List an MS-COCO captions split (``annotations/captions_{split}.json`` + ``{split}/`` images).

    Raises ``FileNotFoundError`` if the annotation file is missing, ``ValueError`` if it is not
    COCO captions JSON.
    """
    fs, root_path = storage.filesystem(root, storage_cfg)
    root_path = root_path.rstrip("/")
    ann_path = f"{root_path}/annotations/captions_{split}.json"
    img_dir = f"{root_path}/{split}"
    if not storage.exists(fs, ann_path):
        raise FileNotFoundError(f"{storage.redact(storage.join(root, 'annotations', f'captions_{split}.json'))}: "
                                f"COCO captions file does not exist")
    try:
        doc = json.loads(fs.cat_file(ann_path))
        images = doc["images"]
        anns = doc["annotations"]
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"captions_{split}.json: not a COCO captions file ({type(e).__name__}: {e})") from None
    storage.invalidate(fs, img_dir)
    present = {_rel(p, img_dir) for p in fs.find(img_dir)} if fs.exists(img_dir) else set()
    by_id = {int(im["id"]): im for im in images}
    caps: dict[int, list[str]] = {}
    rejects: list[Reject] = []
    for a in anns:
        iid = int(a["image_id"])
        if iid not in by_id:
            rejects.append(Reject(key=f"ann-{a.get('id', '?')}", path="", reason="missing-image",
                                  detail=f"caption {a.get('id')} refers to image_id {iid}, not in images"))
            continue
        caps.setdefault(iid, []).append(str(a["caption"]))
    items: list[Item] = []
    listed = set()
    for iid in sorted(by_id):
        fname = by_id[iid]["file_name"]
        listed.add(fname)
        rel = f"{split}/{fname}"
        key = _strip_ext(fname)
        if fname not in present:
            n = len(caps.get(iid, []))
            rejects.append(Reject(key=key, path=rel, reason="missing-image",
                                  detail=f"image {iid} ({n} captions) has no file {fname}"))
            continue
        if not caps.get(iid):
            rejects.append(Reject(key=key, path=rel, reason="no-caption", detail=f"image {iid} has no caption"))
            continue
        items.append(Item(index=len(items), key=key, path=rel, url=storage.to_url(fs, f"{img_dir}/{fname}"),
                          label=-1, captions=tuple(caps[iid])))
    for fname in sorted(present - listed):
        rejects.append(Reject(key=_strip_ext(fname), path=f"{split}/{fname}", reason="unannotated",
                              detail="image file not listed in the captions file"))
    if limit is not None:
        items = items[:limit]
    if not items:
        raise FileNotFoundError(f"{storage.redact(root)}: split {split!r} has no captioned image")
    return Listing(split=split, items=items, classes=[], rejects=rejects)


def list_source(kind: str, root: str, split: str, storage_cfg: StorageLike = None,
                extensions: Sequence[str] = ("jpg", "jpeg", "png", "gif"),
                limit: Optional[int] = None) -> Listing:
    """Dispatch on ``kind`` (``"imagefolder"`` or ``"coco"``)."""
    if kind == "imagefolder":
        return list_image_folder(root, split, storage_cfg, extensions, limit)
    if kind == "coco":
        return list_coco(root, split, storage_cfg, limit)
    raise ValueError(f"source.kind: unknown source kind {kind!r}; known: imagefolder, coco")
