"""The streaming token reader (:class:`StreamingReader`, see :mod:`pipeline.readers` for the interface):
a webdataset pipeline over a split's shards for splits that do not fit in memory (COCO with text
features). Shards are read by ranged reads, so of a shard's caption features only the rows used are
fetched (:mod:`pipeline.ranged`); every draw comes from generators seeded by (seed, epoch, rank, worker).
"""
from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import numpy as np
import torch

from pipeline import shards as shards_mod
from pipeline import storage
from pipeline.commits import sha256
from pipeline.errors import DataError
from pipeline.ranged import RangeReader
from pipeline.readers import TokenReader, _seeds
from pipeline.shards import SplitInfo


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
    ``text.npy`` as :class:`pipeline.ranged.NpyRows`, so only the caption features that are used are fetched
    (one of ~5 per image, or none when the caption is dropped). Picklable (spawn workers)."""

    def __init__(self, storage_cfg: storage.StorageLike, sizes: dict[str, int], chunk: int):
        self.storage_cfg = storage.as_storage_config(storage_cfg)
        self.sizes, self.chunk = sizes, chunk

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        for sample in src:
            url = sample["url"]
            fs, path = storage.filesystem(url, self.storage_cfg)
            reader = RangeReader(fs, path, self.sizes.get(url), self.chunk)
            for entry in shards_mod.iter_tar_entries_ranged(reader, lazy=("text.npy",)):
                yield {**entry, "__url__": url}


class _VerifiedShards:
    """Pipeline stage for token-only shards: ``{"url": …}`` → tar entries of the whole shard, read in one
    request and checked against the manifest's sha256 before any row is used (a damaged shard is never
    trained on). Raises :class:`~pipeline.errors.DataError` naming the shard. Picklable (spawn workers)."""

    def __init__(self, storage_cfg: storage.StorageLike, digests: dict[str, str], verify: bool):
        self.storage_cfg = storage.as_storage_config(storage_cfg)
        self.digests, self.verify = digests, verify

    def __call__(self, src: Iterator[dict]) -> Iterator[dict]:
        import tarfile

        for sample in src:
            url = sample["url"]
            data = storage.read_url(url, self.storage_cfg)
            if self.verify and sha256(data) != self.digests.get(url):
                raise DataError(f"{storage.redact(url)}: sha256 differs from the manifest (corrupt or replaced shard)")
            try:
                entries = list(shards_mod.iter_tar_entries(data))
            except tarfile.TarError as e:  # only reachable with verify off
                raise DataError(f"{storage.redact(url)}: not a readable tar ({e})") from None
            for entry in entries:
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
                 multiprocessing_context: Optional[str] = None, range_chunk: int = 64 * 1024,
                 info: Optional[SplitInfo] = None, verify: bool = True):
        if resampled and not batches_per_epoch:
            raise ValueError("batches_per_epoch: required with resampled=True (the stream is infinite)")
        self._open(root, split, rank, world_size, flip, storage_cfg, info)
        if not self.info.shards:
            raise ValueError(f"{split}: the manifest lists no shard")
        self.storage_cfg = storage.as_storage_config(storage_cfg)
        self.batch_size, self.rank, self.world_size, self.num_workers = batch_size, rank, world_size, num_workers
        self.seed, self.flip, self.caption, self.p_uncond = seed, flip, caption, p_uncond
        self.shuffle_shards, self.shuffle_buffer, self.resampled = shuffle_shards, shuffle_buffer, resampled
        self.batches_per_epoch, self.drop_last, self.epoch, self.step = batches_per_epoch, drop_last, epoch, step
        self.multiprocessing_context, self.range_chunk, self.verify = multiprocessing_context, range_chunk, verify

    def pipeline(self, epoch: int) -> Any:
        """The ``webdataset.DataPipeline`` of one epoch for this rank (batches of ``batch_size``)."""
        import webdataset as wds

        if self.info.dataset.get("text"):  # caption features: fetch only the rows used
            sizes = {u: int(r["bytes"]) for u, r in zip(self.info.urls, self.info.shards)}
            opener: Any = _RangedShards(self.storage_cfg, sizes, self.range_chunk)
        else:  # token rows only: one read per shard, verified against the manifest before use
            opener = _VerifiedShards(self.storage_cfg, {u: r["sha256"] for u, r in zip(self.info.urls, self.info.shards)},
                                     self.verify)
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
        context = self.multiprocessing_context if self.num_workers > 0 else None
        return torch.utils.data.DataLoader(self.pipeline(epoch), batch_size=None, num_workers=self.num_workers,
                                           multiprocessing_context=context)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip, count = self.step, 0
        it = iter(self.loader(self.epoch))
        try:
            while self.batches_per_epoch is None or count < self.batches_per_epoch:
                try:
                    batch = next(it, None)
                except DataError as e:  # from a DataLoader worker: its message holds the worker's traceback
                    last = str(e).strip().splitlines()[-1]
                    raise DataError(last.split("DataError: ", 1)[-1]) from None
                if batch is None:
                    break
                count += 1
                if count <= skip:  # resume: replay deterministically up to the saved step
                    continue
                self.step = count
                yield batch
        finally:
            del it  # shuts the DataLoader workers down (resampled streams never end)
        self.epoch, self.step = self.epoch + 1, 0
