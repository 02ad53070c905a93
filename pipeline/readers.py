"""Training-time readers of tokenized splits, two behind one interface.

* :class:`InMemoryReader` — loads the whole split on every rank (ImageNet-256 with flips is
  ~1.3 GB of uint16) and serves a seeded per-epoch permutation sliced by rank: exact epochs, the
  same number of batches on every rank, random access to any ``(epoch, step)``, so resuming needs
  nothing else.
* :class:`StreamingReader` — a webdataset pipeline over the shards for splits that do not fit (COCO
  with text features): shard shuffling, split by rank and DataLoader worker, a sample shuffle
  buffer, optional resampled (infinite) mode with a nominal epoch length. Deterministic for a given
  ``(seed, epoch, rank, num_workers)``, so ``(epoch, step)`` resumes by replaying ``step`` batches.

Both yield dict batches::

    tokens   int64   (B, L)     codes of the plain or flipped crop
    flipped  bool    (B,)
    index    int64   (B,)       position of the image in the split's stable order
    key      list[str]
    label    int64   (B,)       class (num_classes when dropped); datasets with classes only
    context  float16 (B, T, D)  text features of one caption (the empty caption when dropped)
    caption  list[str]          caption datasets only ("" when dropped)

``p_uncond`` drops the condition as the official ``CFGDataset`` does (label → num_classes), but
from a seeded generator instead of ``random.random()``, so it is reproducible.
"""
from __future__ import annotations

import io
import random
from typing import Any, Iterator, Optional

import numpy as np
import torch

from pipeline import shards as shards_mod
from pipeline import storage
from pipeline.config import ReaderConfig
from pipeline.shards import Rows, SplitInfo, open_split


def _seeds(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


def _load_empty_context(info: SplitInfo, storage_cfg: storage.StorageLike) -> Optional[np.ndarray]:
    text = info.dataset.get("text")
    if not text:
        return None
    fs, path = storage.filesystem(storage.join(info.root, text.get("empty_context", "empty_context.npy")),
                                  storage_cfg)
    return np.load(io.BytesIO(fs.cat_file(path)), allow_pickle=False)  # (T, D) float16


def _check_flip(info: SplitInfo, flip: str) -> None:
    has = bool(info.dataset["splits"][info.split].get("flips"))
    if flip in ("random", "both") and not has:
        raise ValueError(f"{info.split}: this split has no flipped tokens (tokenize.flips); use flip='none'")


class TokenReader:
    """The common interface: iterate one epoch of batches; resume from ``state_dict()``."""

    info: SplitInfo
    epoch: int
    step: int

    def __iter__(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch at the next iteration."""
        self.epoch, self.step = int(epoch), 0

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "step"}``: the next batch to serve."""
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])

    @property
    def seq_len(self) -> int:
        return self.info.seq_len

    @property
    def num_classes(self) -> int:
        return self.info.num_classes


# ---------------------------------------------------------------------------------------------------
# In memory


def load_split_rows(info: SplitInfo, storage_cfg: storage.StorageLike = None, verify: bool = True) -> Rows:
    """Fetch every shard of the manifest (concurrently on object stores) → concatenated rows.

    Raises ``ValueError`` naming the shard if its sha256 or sample count differs from the manifest.
    """
    urls = info.urls
    if not urls:
        return Rows.concat([], seq_len=info.seq_len)
    fs, _ = storage.filesystem(urls[0], storage_cfg)
    paths = [fs._strip_protocol(u) for u in urls]
    blobs = fs.cat(paths, on_error="raise") if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
    parts = []
    for row, p in zip(info.shards, paths):
        data = blobs[p]
        if verify and shards_mod.sha256(data) != row["sha256"]:
            raise ValueError(f"{storage.redact(storage.to_url(fs, p))}: sha256 differs from the manifest "
                             f"(corrupt or replaced shard)")
        rows = shards_mod.read_shard_bytes(data, seq_len=info.seq_len)
        if len(rows) != row["samples"]:
            raise ValueError(f"{row['name']}: {len(rows)} samples, manifest says {row['samples']}")
        parts.append(rows)
    return Rows.concat(parts, seq_len=info.seq_len)


class InMemoryReader(TokenReader):
    """Whole split in RAM, seeded per-epoch permutation sliced by rank.

    ``batches_per_epoch`` is the same on every rank: ``M // (batch_size·world_size)`` with
    ``drop_last`` (M = samples, ×2 with ``flip="both"``), else ``ceil`` with the last global batch
    padded by wrapping around the permutation. ``batch(epoch, step)`` is a pure function.
    """

    def __init__(self, root: str, split: str = "train", *, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, flip: str = "random", caption: str = "random", p_uncond: float = 0.0,
                 drop_last: bool = True, epoch: int = 0, step: int = 0, verify: bool = True,
                 storage_cfg: storage.StorageLike = None, rows: Optional[Rows] = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if flip not in ("random", "none", "both"):
            raise ValueError(f"flip: must be random, none or both, got {flip!r}")
        self.info = open_split(root, split, storage_cfg)
        _check_flip(self.info, flip)
        self.rows = rows if rows is not None else load_split_rows(self.info, storage_cfg, verify)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.flip, self.caption, self.p_uncond, self.drop_last = flip, caption, p_uncond, drop_last
        self.epoch, self.step = epoch, step
        self.has_labels = self.info.num_classes > 0
        self.empty_context = _load_empty_context(self.info, storage_cfg)
        n = len(self.rows)
        self.num_samples = n * (2 if flip == "both" else 1)
        g = batch_size * world_size
        self.batches_per_epoch = self.num_samples // g if drop_last else -(-self.num_samples // g)
        if self.batches_per_epoch == 0:
            raise ValueError(f"{split}: {self.num_samples} samples < one global batch of {g}")
        self._cache: tuple[int, dict[str, np.ndarray]] | None = None

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _epoch_draws(self, epoch: int) -> dict[str, np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            rng = _seeds(self.seed, epoch)
            m = self.num_samples
            self._cache = (epoch, {"perm": rng.permutation(m), "flip": rng.integers(0, 2, m).astype(bool),
                                   "drop": rng.random(m) < self.p_uncond, "cap": rng.random(m)})
        return self._cache[1]

    def batch(self, epoch: int, step: int) -> dict[str, Any]:
        """The batch this rank sees at ``(epoch, step)``."""
        if not 0 <= step < self.batches_per_epoch:
            raise IndexError(f"step {step} outside [0, {self.batches_per_epoch})")
        d = self._epoch_draws(epoch)
        g, b = self.batch_size * self.world_size, self.batch_size
        pos = (step * g + self.rank * b + np.arange(b)) % self.num_samples  # wrap = padding without drop_last
        ids = d["perm"][pos]  # (B,) sample ids in [0, M)
        n = len(self.rows)
        rows = ids % n
        if self.flip == "both":
            flipped = ids >= n  # as official: train.npy holds every image plain and flipped
        elif self.flip == "random":
            flipped = d["flip"][ids]
        else:
            flipped = np.zeros(b, dtype=bool)
        tokens = self.rows.tokens[rows]
        if flipped.any():
            tokens = np.where(flipped[:, None], self.rows.tokens_flip[rows], tokens)
        out: dict[str, Any] = {"tokens": torch.from_numpy(tokens.astype(np.int64)),  # (B, L)
                               "flipped": torch.from_numpy(flipped.copy()),
                               "index": torch.from_numpy(self.rows.index[rows].copy()),
                               "key": [self.rows.keys[i] for i in rows]}
        drop = d["drop"][ids]
        if self.has_labels:
            label = self.rows.cls[rows].astype(np.int64)
            label[drop] = self.info.num_classes  # as official: CFGDataset empty_token = K
            out["label"] = torch.from_numpy(label)
        if self.rows.captions is not None:
            ctx, caps = [], []
            for j, i in enumerate(rows):
                lo, hi = self.rows.text_offsets[i], self.rows.text_offsets[i + 1]
                c = 0 if self.caption == "first" else int(d["cap"][ids[j]] * (hi - lo))
                if drop[j]:
                    ctx.append(self.empty_context)
                    caps.append("")
                else:
                    ctx.append(self.rows.text[lo + c])
                    caps.append(self.rows.captions[i][c])
            out["context"] = torch.from_numpy(np.stack(ctx))  # (B, T, D) float16
            out["caption"] = caps
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while self.step < self.batches_per_epoch:
            batch = self.batch(self.epoch, self.step)
            self.step += 1
            yield batch
        self.epoch, self.step = self.epoch + 1, 0


# ---------------------------------------------------------------------------------------------------
# Streaming (webdataset)


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class _ShardSource:
    """First pipeline stage: this (rank, worker)'s shard URLs as ``{"url": …}`` samples."""

    def __init__(self, urls: list[str], seed: int, epoch: int, rank: int, world_size: int,
                 shuffle: bool, resampled: bool):
        self.urls, self.seed, self.epoch = list(urls), seed, epoch
        self.rank, self.world_size, self.shuffle, self.resampled = rank, world_size, shuffle, resampled

    def __call__(self) -> Iterator[dict[str, str]]:
        worker, num_workers = _worker()
        if self.resampled:  # every (rank, worker) draws independently, forever
            rng = _seeds(self.seed, self.epoch, self.rank, worker, 1)
            while True:
                yield {"url": self.urls[int(rng.integers(len(self.urls)))]}
        urls = list(self.urls)
        if self.shuffle:  # the same order on every rank, then disjoint slices
            urls = [urls[i] for i in _seeds(self.seed, self.epoch, 2).permutation(len(urls))]
        mine = urls[self.rank::self.world_size]  # split by node (rank)
        for u in mine[worker::num_workers]:  # split by DataLoader worker
            yield {"url": u}


class _RangedShards:
    """Pipeline stage for caption datasets: ``{"url": …}`` → tar entries read by byte ranges, with
    ``text.npy`` as :class:`shards.NpyRows`, so only the caption features that are used are fetched
    (one of ~5 per image, or none when the caption is dropped). Picklable (spawn workers)."""

    def __init__(self, storage_cfg: storage.StorageLike, sizes: dict[str, int], chunk: int):
        self.storage_cfg = storage.as_storage_config(storage_cfg)
        self.sizes, self.chunk = sizes, chunk

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            url = sample["url"]
            fs, path = storage.filesystem(url, self.storage_cfg)
            reader = shards_mod.RangeReader(fs, path, self.sizes.get(url), self.chunk)
            for entry in shards_mod.iter_tar_entries_ranged(reader, lazy=("text.npy",)):
                yield {**entry, "__url__": url}


class _Unpack:
    """Tar entries (chunks of rows) → one sample per row, with flip/caption/drop chosen."""

    def __init__(self, seed: int, epoch: int, rank: int, flip: str, caption: str, p_uncond: float,
                 num_classes: int, empty_context: Optional[np.ndarray]):
        self.seed, self.epoch, self.rank = seed, epoch, rank
        self.flip, self.caption, self.p_uncond = flip, caption, p_uncond
        self.num_classes, self.empty_context = num_classes, empty_context

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        worker, _ = _worker()
        rng = _seeds(self.seed, self.epoch, self.rank, worker, 3)
        for entry in src:
            rows = shards_mod.unpack_entry(entry)
            n = len(rows)
            flips = rng.integers(0, 2, n).astype(bool)
            drops = rng.random(n) < self.p_uncond
            caps = rng.random(n)
            for i in range(n):
                choices = [False, True] if self.flip == "both" else [bool(flips[i]) if self.flip == "random" else False]
                for flipped in choices:
                    if flipped and rows.tokens_flip is None:
                        raise ValueError(f"{entry.get('__url__', '?')}: no flipped tokens; use flip='none'")
                    s = {"tokens": (rows.tokens_flip if flipped else rows.tokens)[i].copy(), "flipped": flipped,
                         "index": int(rows.index[i]), "key": rows.keys[i]}
                    if self.num_classes > 0:
                        s["label"] = self.num_classes if drops[i] else int(rows.cls[i])
                    if rows.captions is not None:
                        lo, hi = rows.text_offsets[i], rows.text_offsets[i + 1]
                        c = 0 if self.caption == "first" else int(caps[i] * (hi - lo))
                        if drops[i]:
                            s["context"], s["caption"] = self.empty_context, ""
                        else:
                            s["context"], s["caption"] = rows.text[lo + c].copy(), rows.captions[i][c]
                    yield s


class _Shuffle:
    def __init__(self, bufsize: int, seed: int, epoch: int, rank: int):
        self.bufsize, self.seed, self.epoch, self.rank = bufsize, seed, epoch, rank

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        if self.bufsize <= 1:
            yield from src
            return
        from webdataset.filters import _shuffle

        worker, _ = _worker()
        rng = random.Random(int(_seeds(self.seed, self.epoch, self.rank, worker, 4).integers(2**63)))
        yield from _shuffle(src, bufsize=self.bufsize, initial=self.bufsize, rng=rng)


def collate(samples: list[dict]) -> dict[str, Any]:
    """Samples → a batch of tensors (uint16 tokens cast to int64; see the module docstring)."""
    out: dict[str, Any] = {"tokens": torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64)),
                           "flipped": torch.tensor([s["flipped"] for s in samples], dtype=torch.bool),
                           "index": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
                           "key": [s["key"] for s in samples]}
    if "label" in samples[0]:
        out["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.int64)
    if "context" in samples[0]:
        out["context"] = torch.from_numpy(np.stack([s["context"] for s in samples]))  # (B, T, D) float16
        out["caption"] = [s["caption"] for s in samples]
    return out


class _Batch:
    def __init__(self, batch_size: int, partial: bool):
        self.batch_size, self.partial = batch_size, partial

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        from webdataset.filters import _batched

        yield from _batched(src, self.batch_size, collation_fn=collate, partial=self.partial)


class StreamingReader(TokenReader):
    """webdataset pipeline over the split's shards, one per rank, ``num_workers`` DataLoader workers.

    Without ``resampled`` an epoch is one pass over this rank's shards (ranks may differ by a batch;
    shards ≥ world_size × num_workers keeps every worker busy). With ``resampled`` every
    (rank, worker) draws shards with replacement and an epoch is ``batches_per_epoch`` batches on
    every rank. Works on ``s3://`` with the same storage config; spawn workers are fine.

    Caption datasets are read by byte ranges (``range_chunk`` bytes per request for tar headers and
    small members): of an image's caption features only the one used is fetched, none when dropped.
    """

    def __init__(self, root: str, split: str = "train", *, batch_size: int, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, flip: str = "random", caption: str = "random",
                 p_uncond: float = 0.0, shuffle_shards: bool = True, shuffle_buffer: int = 1000,
                 resampled: bool = False, batches_per_epoch: Optional[int] = None, drop_last: bool = False,
                 epoch: int = 0, step: int = 0, storage_cfg: storage.StorageLike = None,
                 multiprocessing_context: Optional[str] = None, range_chunk: int = 64 * 1024):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if flip not in ("random", "none", "both"):
            raise ValueError(f"flip: must be random, none or both, got {flip!r}")
        if resampled and not batches_per_epoch:
            raise ValueError("batches_per_epoch: required with resampled=True (the stream is infinite)")
        self.info = open_split(root, split, storage_cfg)
        _check_flip(self.info, flip)
        if not self.info.shards:
            raise ValueError(f"{split}: the manifest lists no shard")
        self.storage_cfg = storage.as_storage_config(storage_cfg)
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.seed, self.flip, self.caption, self.p_uncond = seed, flip, caption, p_uncond
        self.shuffle_shards, self.shuffle_buffer, self.resampled = shuffle_shards, shuffle_buffer, resampled
        self.batches_per_epoch, self.drop_last = batches_per_epoch, drop_last
        self.multiprocessing_context = multiprocessing_context
        self.range_chunk = range_chunk
        self.epoch, self.step = epoch, step
        self.empty_context = _load_empty_context(self.info, storage_cfg)

    def pipeline(self, epoch: int) -> Any:
        """The ``webdataset.DataPipeline`` of one epoch for this rank (batches of ``batch_size``)."""
        import webdataset as wds

        if self.info.dataset.get("text"):  # caption features: fetch only the rows used
            sizes = {u: int(r["bytes"]) for u, r in zip(self.info.urls, self.info.shards)}
            opener: Any = _RangedShards(self.storage_cfg, sizes, self.range_chunk)
        else:  # token rows only: one sequential read per shard
            opener = storage.ShardOpener(self.storage_cfg)
        return wds.DataPipeline(
            _ShardSource(self.info.urls, self.seed, epoch, self.rank, self.world_size, self.shuffle_shards,
                         self.resampled),
            opener,
            _Unpack(self.seed, epoch, self.rank, self.flip, self.caption, self.p_uncond, self.info.num_classes,
                    self.empty_context),
            _Shuffle(self.shuffle_buffer, self.seed, epoch, self.rank),
            _Batch(self.batch_size, partial=not self.drop_last),
        )

    def loader(self, epoch: int) -> torch.utils.data.DataLoader:
        kw: dict[str, Any] = {}
        if self.num_workers > 0 and self.multiprocessing_context:
            kw["multiprocessing_context"] = self.multiprocessing_context
        return torch.utils.data.DataLoader(self.pipeline(epoch), batch_size=None, num_workers=self.num_workers,
                                           **kw)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip, count = self.step, 0
        it = iter(self.loader(self.epoch))
        try:
            while self.batches_per_epoch is None or count < self.batches_per_epoch:
                try:
                    batch = next(it)
                except StopIteration:
                    break
                count += 1
                if count <= skip:  # resume: replay deterministically up to the saved step
                    continue
                self.step = count
                yield batch
        finally:
            del it  # shuts the DataLoader workers down (resampled streams never end)
        self.epoch, self.step = self.epoch + 1, 0


def make_reader(cfg: ReaderConfig, rank: int = 0, world_size: int = 1,
                storage_cfg: storage.StorageLike = None, epoch: int = 0, step: int = 0) -> TokenReader:
    """``ReaderConfig`` → :class:`InMemoryReader` or :class:`StreamingReader` for this rank."""
    if cfg.kind == "memory":
        return InMemoryReader(cfg.root, cfg.split, batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                              seed=cfg.seed, flip=cfg.flip, caption=cfg.caption, p_uncond=cfg.p_uncond,
                              drop_last=cfg.drop_last, epoch=epoch, step=step, verify=cfg.verify,
                              storage_cfg=storage_cfg)
    if cfg.kind == "stream":
        return StreamingReader(cfg.root, cfg.split, batch_size=cfg.batch_size, rank=rank, world_size=world_size,
                               num_workers=cfg.num_workers, seed=cfg.seed, flip=cfg.flip, caption=cfg.caption,
                               p_uncond=cfg.p_uncond, shuffle_shards=cfg.shuffle_shards,
                               shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
                               batches_per_epoch=cfg.batches_per_epoch, drop_last=cfg.drop_last, epoch=epoch,
                               step=step, storage_cfg=storage_cfg)
    raise ValueError(f"reader.kind: unknown reader {cfg.kind!r}; known: memory, stream")
