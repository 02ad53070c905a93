"""Packed token shards (webdataset tars), the per-split manifest and rejects, and dataset.json.

Layout of a tokenized dataset at ``{out}``::

    {out}/dataset.json                       tokenizer identity, resolution, grid, label map, counts …
    {out}/empty_context.npy                  float16 (T, D) embedding of "" (caption datasets only)
    {out}/{split}/{split}-000000.tar …       shards, brace-expandable: {split}-{000000..000041}.tar
    {out}/{split}/manifest.parquet           one row per shard (MANIFEST_SCHEMA), written last
    {out}/{split}/rejects.parquet            one row per rejected record (REJECTS_SCHEMA)
    {out}/{split}/_parts/{split}-000000.json per-shard commit record (written after its tar)

A token row is 512 bytes at 256 px and a tar header is 512 too, so rows are packed: one tar entry
(webdataset "sample", key ``{shard:06d}_{chunk:05d}``) holds a chunk of N rows::

    tokens.npy       uint16  (N, L)      codes of the center crop, row-major over the (h, w) grid
    tokens_flip.npy  uint16  (N, L)      codes of its horizontal flip (splits with flips)
    cls.npy          int32   (N,)        class index, -1 without labels
    idx.npy          int64   (N,)        position of the image in the split's stable order
    keys.json        [str] * N           sample keys
    paths.json       [str] * N           source paths relative to the dataset root
    captions.json    [[str]] * N         caption datasets: every caption of every image
    text.npy         float16 (C, T, D)   caption datasets: text features of the C captions
    text_offsets.npy int64   (N + 1,)    captions of row i are text[offsets[i]:offsets[i+1]]

Tars are written with ``mtime=0`` and fixed owner/mode, so equal rows give byte-identical shards.

Members are plain (uncompressed) ``.npy``, so one caption's features are a contiguous byte range of
``text.npy``: :func:`iter_tar_entries_ranged` reads a shard through ranged reads and hands
``text.npy`` over as :class:`NpyRows`, which fetches only the rows asked for (a streaming reader
uses one caption of ~5 per image; each is 77×768 float16 = 118 KB with CLIP ViT-L/14).
"""
from __future__ import annotations

import datetime as _dt
import io
import json
import tarfile
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Iterator, Mapping, Optional, Sequence, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.ranged import NpyRows, RangeReader

FORMAT_VERSION = 1

MANIFEST_SCHEMA = pa.schema([
    ("name", pa.string()),  # "train-000000.tar", relative to {out}/{split}/
    ("shard", pa.int32()),
    ("samples", pa.int64()),  # images in the shard
    ("rows", pa.int64()),  # token rows (samples × 2 with flips)
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("first_key", pa.string()),  # null for an empty shard
    ("last_key", pa.string()),
])

REJECTS_SCHEMA = pa.schema([
    ("split", pa.string()),
    ("shard", pa.int32()),  # -1: rejected while listing the source
    ("key", pa.string()),
    ("path", pa.string()),
    ("reason", pa.string()),
    ("detail", pa.string()),
])


@dataclass
class Rows:
    """Columnar rows of one shard (or a chunk of one). ``N`` = len(keys)."""

    keys: list[str]
    paths: list[str]
    index: np.ndarray  # int64 (N,)
    cls: np.ndarray  # int32 (N,)
    tokens: np.ndarray  # uint16 (N, L)
    tokens_flip: Optional[np.ndarray] = None  # uint16 (N, L)
    captions: Optional[list[list[str]]] = None
    text: Union[np.ndarray, "NpyRows", None] = None  # float16 (C, T, D); NpyRows: read row by row on demand
    text_offsets: Optional[np.ndarray] = None  # int64 (N + 1,)

    def __post_init__(self) -> None:
        n = len(self.keys)
        self.index = np.asarray(self.index, dtype=np.int64).reshape(n)
        self.cls = np.asarray(self.cls, dtype=np.int32).reshape(n)
        self.tokens = _as_u16(self.tokens, n, "tokens")
        if self.tokens_flip is not None:
            self.tokens_flip = _as_u16(self.tokens_flip, n, "tokens_flip")
            if self.tokens_flip.shape != self.tokens.shape:
                raise ValueError(f"tokens_flip {self.tokens_flip.shape} != tokens {self.tokens.shape}")
        if len(self.paths) != n:
            raise ValueError(f"paths: expected {n}, got {len(self.paths)}")
        if (self.captions is None) != (self.text is None):
            raise ValueError("captions and text go together")
        if self.captions is not None:
            if len(self.captions) != n:
                raise ValueError(f"captions: expected {n} lists, got {len(self.captions)}")
            counts = [len(c) for c in self.captions]
            offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            if self.text_offsets is None:
                self.text_offsets = offsets
            self.text_offsets = np.asarray(self.text_offsets, dtype=np.int64)
            if not np.array_equal(self.text_offsets, offsets):
                raise ValueError("text_offsets do not match the caption counts")
            if not isinstance(self.text, NpyRows):
                self.text = np.asarray(self.text, dtype=np.float16)
            if self.text.ndim != 3 or self.text.shape[0] != offsets[-1]:
                raise ValueError(f"text: expected ({offsets[-1]}, T, D) float16, got {self.text.shape}")

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, start: int, stop: int) -> "Rows":
        start, stop, _ = slice(start, stop).indices(len(self))
        cap = text = None
        if self.captions is not None:
            cap = self.captions[start:stop]
            text = self.text[self.text_offsets[start]:self.text_offsets[stop]]
        return Rows(self.keys[start:stop], self.paths[start:stop], self.index[start:stop], self.cls[start:stop],
                    self.tokens[start:stop],
                    None if self.tokens_flip is None else self.tokens_flip[start:stop], cap, text)

    @staticmethod
    def concat(parts: Sequence["Rows"], seq_len: int = 0) -> "Rows":
        """Concatenate chunks (empty input → zero rows of ``seq_len`` tokens)."""
        parts = [p for p in parts if len(p)] or list(parts[:1])
        if not parts:
            return Rows([], [], np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros((0, seq_len), np.uint16))
        flips = all(p.tokens_flip is not None for p in parts)
        text = all(p.captions is not None for p in parts)
        return Rows(
            keys=[k for p in parts for k in p.keys], paths=[k for p in parts for k in p.paths],
            index=np.concatenate([p.index for p in parts]), cls=np.concatenate([p.cls for p in parts]),
            tokens=np.concatenate([p.tokens for p in parts]),
            tokens_flip=np.concatenate([p.tokens_flip for p in parts]) if flips else None,
            captions=[c for p in parts for c in p.captions] if text else None,
            text=np.concatenate([p.text for p in parts]) if text else None)


def _as_u16(a: Any, n: int, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2 or a.shape[0] != n:
        raise ValueError(f"{name}: expected ({n}, L), got {a.shape}")
    if a.dtype != np.uint16:
        if a.size and (a.min() < 0 or a.max() > np.iinfo(np.uint16).max):
            raise ValueError(f"{name}: codes outside [0, 65535] cannot be stored as uint16")
        a = a.astype(np.uint16)
    return np.ascontiguousarray(a)


# ---------------------------------------------------------------------------------------------------
# Encoding one shard


def npy_bytes(a: np.ndarray) -> bytes:
    """Deterministic ``.npy`` serialisation (no pickle)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def json_bytes(obj: Any) -> bytes:
    """Deterministic compact UTF-8 JSON."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def entry_key(shard: int, chunk: int) -> str:
    """Tar entry key (no dots, as webdataset requires)."""
    return f"{shard:06d}_{chunk:05d}"


def pack_shard(rows: Rows, shard: int, rows_per_entry: int) -> bytes:
    """Rows → the bytes of a reproducible tar of packed entries (see the module docstring)."""
    import webdataset as wds

    if rows_per_entry < 1:
        raise ValueError(f"rows_per_entry: must be ≥ 1, got {rows_per_entry}")
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0, user="enat", group="enat") as tw:
        for chunk, start in enumerate(range(0, len(rows), rows_per_entry)):
            part = rows.slice(start, start + rows_per_entry)
            entry = {"__key__": entry_key(shard, chunk),
                     "tokens.npy": npy_bytes(part.tokens), "cls.npy": npy_bytes(part.cls),
                     "idx.npy": npy_bytes(part.index), "keys.json": json_bytes(part.keys),
                     "paths.json": json_bytes(part.paths)}
            if part.tokens_flip is not None:
                entry["tokens_flip.npy"] = npy_bytes(part.tokens_flip)
            if part.captions is not None:
                entry["captions.json"] = json_bytes(part.captions)
                entry["text.npy"] = npy_bytes(part.text)
                entry["text_offsets.npy"] = npy_bytes(part.text_offsets)
            tw.write(entry)
    return buf.getvalue()


def _npy(b: Union[bytes, "NpyRows"]) -> Any:
    return b if isinstance(b, NpyRows) else np.load(io.BytesIO(b), allow_pickle=False)


def unpack_entry(sample: Mapping[str, Any]) -> Rows:
    """One webdataset sample (members by extension, bytes) → :class:`Rows`.

    Raises ``ValueError`` naming the entry if a required member is missing or inconsistent.
    """
    key = sample.get("__key__", "?")
    try:
        keys = json.loads(sample["keys.json"])
        captions = json.loads(sample["captions.json"]) if "captions.json" in sample else None
        return Rows(keys=keys, paths=json.loads(sample["paths.json"]), index=_npy(sample["idx.npy"]),
                    cls=_npy(sample["cls.npy"]), tokens=_npy(sample["tokens.npy"]),
                    tokens_flip=_npy(sample["tokens_flip.npy"]) if "tokens_flip.npy" in sample else None,
                    captions=captions, text=_npy(sample["text.npy"]) if captions is not None else None,
                    text_offsets=_npy(sample["text_offsets.npy"]) if captions is not None else None)
    except KeyError as e:
        raise ValueError(f"{sample.get('__url__', '?')}: entry {key}: missing member {e}") from None


def iter_tar_entries(data: bytes) -> Iterator[dict[str, Any]]:
    """Tar bytes → webdataset-style samples ``{"__key__": …, "<ext>": bytes}`` in tar order."""
    current: Optional[dict[str, Any]] = None
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for ti in tf:
            if not ti.isreg():
                continue
            base, _, ext = ti.name.partition(".")
            f = tf.extractfile(ti)
            payload = f.read() if f is not None else b""
            if current is None or current["__key__"] != base:
                if current is not None:
                    yield current
                current = {"__key__": base}
            current[ext] = payload
    if current is not None:
        yield current


def iter_tar_entries_ranged(reader: RangeReader, lazy: Collection[str] = ("text.npy",)) -> Iterator[dict[str, Any]]:
    """Like :func:`iter_tar_entries` over a :class:`RangeReader`, but members whose extension is in
    ``lazy`` are not read: they come as :class:`NpyRows`. Member data that is not read is skipped
    (never fetched), so a shard's caption features cost only the rows that are used."""
    current: Optional[dict[str, Any]] = None
    with tarfile.open(fileobj=reader, mode="r:") as tf:
        for ti in tf:
            if not ti.isreg():
                continue
            base, _, ext = ti.name.partition(".")
            if current is None or current["__key__"] != base:
                if current is not None:
                    yield current
                current = {"__key__": base}
            current[ext] = (NpyRows(reader, ti.offset_data, ti.size, ti.name) if ext in lazy
                            else reader.pread(ti.offset_data, ti.size))
    if current is not None:
        yield current


def read_shard_bytes(data: bytes, seq_len: int = 0) -> Rows:
    """A whole shard's tar bytes → concatenated :class:`Rows`."""
    return Rows.concat([unpack_entry(s) for s in iter_tar_entries(data)], seq_len=seq_len)


# ---------------------------------------------------------------------------------------------------
# Manifest, rejects, dataset.json


def _table_bytes(table: pa.Table) -> bytes:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue().to_pybytes()


def write_manifest(fs: Any, path: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Write ``manifest.parquet`` (rows sorted by shard) atomically; returns the table."""
    rows = sorted(rows, key=lambda r: r["shard"])
    table = pa.Table.from_pylist([{k: r.get(k) for k in MANIFEST_SCHEMA.names} for r in rows],
                                 schema=MANIFEST_SCHEMA)
    storage.put_atomic(fs, path, _table_bytes(table))
    return table


def read_manifest(fs: Any, path: str) -> list[dict[str, Any]]:
    """``manifest.parquet`` → list of row dicts; raises ``ValueError`` on a schema mismatch."""
    table = pq.read_table(io.BytesIO(fs.cat_file(path)))
    if not table.schema.equals(MANIFEST_SCHEMA):
        raise ValueError(f"{path}: manifest schema {table.schema} != expected {MANIFEST_SCHEMA}")
    return table.to_pylist()


def write_rejects(fs: Any, path: str, rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Write ``rejects.parquet`` (sorted by shard, key) atomically; returns the table."""
    rows = sorted(rows, key=lambda r: (r["shard"], r["key"], r["reason"]))
    table = pa.Table.from_pylist([{k: r.get(k, "") for k in REJECTS_SCHEMA.names} for r in rows],
                                 schema=REJECTS_SCHEMA)
    storage.put_atomic(fs, path, _table_bytes(table))
    return table


def read_rejects(fs: Any, path: str) -> list[dict[str, Any]]:
    return pq.read_table(io.BytesIO(fs.cat_file(path))).to_pylist()


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def write_json(fs: Any, path: str, obj: Any) -> None:
    storage.put_atomic(fs, path, json.dumps(obj, indent=2, sort_keys=False).encode("utf-8"))


def read_json(fs: Any, path: str) -> Any:
    return json.loads(fs.cat_file(path))


@dataclass
class SplitInfo:
    """What a reader needs about one split: shard URLs (from the manifest) and dataset metadata."""

    split: str
    root: str  # dataset root URL
    shards: list[dict[str, Any]]  # manifest rows
    dataset: dict[str, Any] = field(default_factory=dict)

    @property
    def urls(self) -> list[str]:
        return [storage.join(self.root, self.split, r["name"]) for r in self.shards]

    @property
    def samples(self) -> int:
        return int(sum(r["samples"] for r in self.shards))

    @property
    def seq_len(self) -> int:
        return int(self.dataset["seq_len"])

    @property
    def num_classes(self) -> int:
        return int(self.dataset.get("num_classes") or 0)


def open_split(root: str, split: str, storage_cfg: storage.StorageLike = None) -> SplitInfo:
    """Read ``{root}/dataset.json`` and ``{root}/{split}/manifest.parquet``.

    Raises ``FileNotFoundError`` naming the missing file (an unfinished tokenize job has none).
    """
    fs, path = storage.filesystem(root, storage_cfg)
    ds_path = f"{path.rstrip('/')}/dataset.json"
    man_path = f"{path.rstrip('/')}/{split}/manifest.parquet"
    for p in (ds_path, man_path):
        if not storage.exists(fs, p):
            raise FileNotFoundError(f"{storage.redact(storage.to_url(fs, p))}: not found — was the tokenize "
                                    f"job for split {split!r} run to completion?")
    dataset = read_json(fs, ds_path)
    if split not in dataset.get("splits", {}):
        raise FileNotFoundError(f"{storage.redact(root)}: dataset.json has no split {split!r}; "
                                f"has {sorted(dataset.get('splits', {}))}")
    return SplitInfo(split=split, root=root.rstrip("/"), shards=read_manifest(fs, man_path), dataset=dataset)
