"""List a dataset split into a stable, deterministic order of items; assign items to shards.

Two layouts, local or on object storage:

* **image folder** (ImageNet and any user data): ``{root}/{split}/<class>/<image>``. Labels are the
  index of the class (parent folder) name among the split's sorted class names, and items are in
  the order of a depth-first walk over sorted directory entries — both exactly as the official
  ``dataset.py`` (``_list_image_files_recursively``, ``ImageNet.__init__``), so row ``i`` of the
  official ``train.npy`` (before its flip interleaving) is item ``i`` here. A *flat* split (ImageNet
  val as distributed: ``val/ILSVRC2012_val_00000001.JPEG`` …) takes its labels from a label file
  (:func:`read_label_file`: Kaggle ``LOC_val_solution.csv`` or the devkit's ground truth + synset
  list), and :func:`align_classes` maps them onto the class indices of the folder splits.
* **MS-COCO 2014/2017**: ``{root}/annotations/captions_{split}.json`` + ``{root}/{split}/``. Items are
  the images in ascending image-id order, each with all of its captions (in annotation order).

Nothing vanishes silently: files with other extensions, COCO images without a caption, caption
entries whose image is missing, and images that no annotation mentions become :class:`Reject`
records. Shard ``s`` holds items ``[s·R, (s+1)·R)`` of the stable order (:func:`plan_shards`), so
shard contents do not depend on how the job was scheduled.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

from pipeline import storage
from pipeline.config import ConfigError
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
    label_file: str = ""  # labels from this file (redacted URL) instead of class folders; "" = folders


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
                      limit: Optional[int] = None, labels: Optional[str] = None,
                      synsets: Optional[str] = None) -> Listing:
    """List ``{root}/{split}`` in the official order with official labels.

    Class-folder layout: the label is the index of the parent folder among the sorted class folders
    (of the whole split, also with ``limit``). Flat layout (images directly in the split folder):
    ``labels`` names its label file (:func:`read_label_file`; ``synsets`` for the devkit's), and
    every listed image must be in it; labels then index the label file's sorted classes until
    :func:`align_classes` maps them onto the folder splits' classes.

    Raises ``FileNotFoundError`` if the split folder or a label file does not exist or the split
    holds no image, :class:`ConfigError` for a flat split without a label file, an image the label
    file does not cover, or an unreadable label file.
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
    if not images:
        raise FileNotFoundError(f"{storage.redact(storage.join(root, split))}: no image files "
                                f"with extensions {sorted(exts)}")
    where = storage.redact(storage.join(root, split))
    if labels:
        truth, universe = read_label_file(resolve(root, labels), storage_cfg,
                                          resolve(root, synsets) if synsets else None)
        stems = [_strip_ext(p.rsplit("/", 1)[-1]) for p in images]
        missing = [s for s in stems if s not in truth]
        if missing:
            raise ConfigError(f"source.labels.{split}: {storage.redact(resolve(root, labels))} has no label for "
                              f"{len(missing)} of the {len(stems)} images of {where} (e.g. {missing[:3]}); "
                              f"give the label file of this split")
        classes = sorted(universe)
        names = [truth[s] for s in stems]
        label_file = storage.redact(resolve(root, labels))
    else:
        flat = [p for p in images if "/" not in _rel(p, split_path)]
        if flat:
            raise ConfigError(f"source.labels.{split}: {len(flat)} images lie directly in {where} (e.g. "
                              f"{flat[0].rsplit('/', 1)[-1]}), with no class folder; set source.labels.{split} "
                              f"to its label file (LOC_val_solution.csv, or ILSVRC2012_validation_ground_truth"
                              f".txt with source.synsets=<devkit meta.mat or synset list>)")
        # as official: the label is the index of the parent folder's name among the sorted names
        names = [p.rsplit("/", 2)[-2] for p in images]
        classes = sorted(set(names))  # of the whole split, so `limit` does not change the labels
        label_file = ""
    if limit is not None:
        images, names = images[:limit], names[:limit]
    index = {c: i for i, c in enumerate(classes)}
    items = [Item(index=i, key=_strip_ext(_rel(p, split_path)), path=_rel(p, root_path),
                  url=storage.to_url(fs, p), label=index[name])
             for i, (p, name) in enumerate(zip(images, names))]
    return Listing(split=split, items=items, classes=classes, rejects=rejects, label_file=label_file)


def resolve(root: str, path: str) -> str:
    """A label/synset file setting → its URL: scheme-less paths not starting with "/" are under ``root``."""
    return path if "://" in path or path.startswith("/") else storage.join(root, path)


def _cat(url: str, storage_cfg: StorageLike, what: str) -> bytes:
    fs, path = storage.filesystem(url, storage_cfg)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"{storage.redact(url)}: {what} does not exist")
    return fs.cat_file(path)


def read_synsets(url: str, storage_cfg: StorageLike = None) -> list[str]:
    """The devkit's synset list → ``wnids`` with ``wnids[ILSVRC2012_ID - 1]`` the class of that id.

    ``url`` is the devkit's ``data/meta.mat`` (read with ``scipy.io.loadmat``; its leaf synsets,
    ``num_children == 0``, are the 1000 classes) or a text file with one wnid per line in
    ILSVRC2012_ID order (e.g. exported from meta.mat; extra words after the wnid are ignored).
    """
    data = _cat(url, storage_cfg, "synset list (source.synsets)")
    if data[:6] == b"MATLAB":
        import scipy.io

        try:
            syn = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True)["synsets"]
            ids = [int(i) for i in syn["ILSVRC2012_ID"].ravel()]
            wnids = [str(w) for w in syn["WNID"].ravel()]
            leaf = ([int(c) == 0 for c in syn["num_children"].ravel()] if "num_children" in syn.dtype.names
                    else [True] * len(ids))
        except (KeyError, ValueError, TypeError) as e:
            raise ConfigError(f"source.synsets: {storage.redact(url)} is not the devkit's meta.mat (a 'synsets' "
                              f"struct with ILSVRC2012_ID and WNID): {type(e).__name__}: {e}") from None
        by_id = {i: w for i, w, is_leaf in zip(ids, wnids, leaf) if is_leaf}
        if sorted(by_id) != list(range(1, len(by_id) + 1)):
            raise ConfigError(f"source.synsets: {storage.redact(url)}: leaf ILSVRC2012_IDs are not 1..{len(by_id)}")
        return [by_id[i] for i in range(1, len(by_id) + 1)]
    wnids = [line.split()[0].rstrip(",") for line in data.decode("utf-8").splitlines() if line.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise ConfigError(f"source.synsets: {storage.redact(url)}: expected one distinct wnid per line")
    return wnids


def read_label_file(url: str, storage_cfg: StorageLike = None,
                    synsets: Optional[str] = None) -> tuple[dict[str, str], list[str]]:
    """A flat split's label file → ``({image stem: wnid}, the file's classes)``.

    Two formats, told apart by content:

    * Kaggle ``LOC_val_solution.csv``: header ``ImageId,PredictionString``; the wnid is the first
      token of PredictionString (the rest are boxes). Classes: the wnids it names.
    * devkit ``ILSVRC2012_validation_ground_truth.txt``: line ``i`` is the 1-based ILSVRC2012_ID of
      ``ILSVRC2012_val_{i:08d}``, in the devkit's synset order (not the sorted-wnid order), so the
      ``synsets`` list (:func:`read_synsets`) is required. Classes: every synset of that list.

    Raises :class:`ConfigError` naming the file and line for anything else.
    """
    text = _cat(url, storage_cfg, "label file (source.labels)").decode("utf-8-sig")
    where = storage.redact(url)
    lines = text.splitlines()
    if lines and lines[0].replace(" ", "").startswith("ImageId,PredictionString"):
        truth: dict[str, str] = {}
        for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
            if n == 1 or not row:
                continue
            if len(row) < 2 or not row[1].split():
                raise ConfigError(f"{where}: line {n}: expected ImageId,PredictionString with a wnid, got {row}")
            truth[row[0].strip()] = row[1].split()[0]
        return truth, sorted(set(truth.values()))
    try:
        ids = [int(line) for line in lines if line.strip()]
    except ValueError:
        raise ConfigError(f"{where}: neither LOC_val_solution.csv (header ImageId,PredictionString) nor the "
                          f"devkit's ground truth (one ILSVRC2012_ID per line)") from None
    if not synsets:
        raise ConfigError(f"source.synsets: required with {where} (devkit ground truth: its ids follow the "
                          f"devkit's synset order); give data/meta.mat or a wnid-per-line list in ILSVRC2012_ID order")
    wnids = read_synsets(synsets, storage_cfg)
    bad = [(n, i) for n, i in enumerate(ids, start=1) if not 1 <= i <= len(wnids)]
    if bad:
        raise ConfigError(f"{where}: line {bad[0][0]}: ILSVRC2012_ID {bad[0][1]} outside 1..{len(wnids)} of "
                          f"{storage.redact(synsets)}")
    return {f"ILSVRC2012_val_{n:08d}": wnids[i - 1] for n, i in enumerate(ids, start=1)}, sorted(wnids)


def align_classes(listings: Mapping[str, Listing], known: Sequence[str] = ()) -> list[str]:
    """Check that every split's labels mean the same classes; relabel label-file splits in place.

    The class list is ``known`` (dataset.json of an earlier run) if given, else that of the
    class-folder splits (which must all be equal: label i = i-th sorted folder name, as official),
    else the first label-file split's. A label-file split may name only classes of that list; its
    items are relabelled to indices in it. Returns the class list ([] without classes).
    Raises :class:`ConfigError` naming the split and the differing classes.
    """
    folders = {s: l for s, l in listings.items() if l.classes and not l.label_file}
    files = {s: l for s, l in listings.items() if l.label_file}
    ref_name, ref = "dataset.json", list(known)
    if not ref:
        first = next(iter(folders.items()), None) or next(iter(files.items()), None)
        if first is None:
            return []
        ref_name, ref = f"split {first[0]!r}", list(first[1].classes)
    for s, l in folders.items():
        if l.classes != ref:
            extra, lacking = sorted(set(l.classes) - set(ref)), sorted(set(ref) - set(l.classes))
            raise ConfigError(f"source: the class folders of split {s!r} differ from those of {ref_name} "
                              f"(only in {s!r}: {extra[:5]}, missing in {s!r}: {lacking[:5]}); labels would not "
                              f"match across splits")
    index = {c: i for i, c in enumerate(ref)}
    for s, l in files.items():
        named = sorted({l.classes[it.label] for it in l.items})
        unknown = [c for c in named if c not in index]
        if unknown:
            raise ConfigError(f"source.labels.{s}: {l.label_file} names classes {unknown[:5]} that {ref_name} "
                              f"does not have; labels would not match across splits")
        l.items[:] = [dataclasses.replace(it, label=index[l.classes[it.label]]) for it in l.items]
        l.classes = list(ref)
    return ref


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
                limit: Optional[int] = None, labels: Optional[str] = None,
                synsets: Optional[str] = None) -> Listing:
    """Dispatch on ``kind`` (``"imagefolder"`` or ``"coco"``); ``labels``/``synsets``: imagefolder only."""
    if kind == "imagefolder":
        return list_image_folder(root, split, storage_cfg, extensions, limit, labels, synsets)
    if kind == "coco":
        return list_coco(root, split, storage_cfg, limit)
    raise ValueError(f"source.kind: unknown source kind {kind!r}; known: imagefolder, coco")
