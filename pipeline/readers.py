"""Training-time readers of tokenized splits, two behind one interface.

* :class:`InMemoryReader` — loads the whole split on every rank (ImageNet-256 with flips is
  ~1.3 GB of uint16) and serves a seeded per-epoch permutation sliced by rank: exact epochs, the
  same number of batches on every rank, random access to any ``(epoch, step)``, so resuming needs
  nothing else.
* :class:`~pipeline.streaming.StreamingReader` — a webdataset pipeline over the shards for splits that do not fit (COCO
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
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Optional

import numpy as np
import torch

from pipeline import storage
from pipeline.commits import sha256
from pipeline.config import location
from pipeline.errors import DataError
from pipeline.shards import Rows, SplitInfo, open_split, read_shard_bytes


@dataclass(frozen=True)
class ReaderConfig:
    """Training-time token reader (pipeline.readers.make_reader); one per rank."""

    kind: Literal["memory", "stream"] = "memory"  # memory: whole split in RAM (ImageNet); stream: webdataset
    root: str = location("")  # dataset root URL written by the tokenize job (holds dataset.json)
    split: str = "train"  # split folder under root
    batch_size: int = 64  # per rank
    seed: int = 0  # permutation / flip / caption / drop draws derive from (seed, epoch[, rank, worker])
    flip: Literal["random", "none", "both"] = "random"  # both = plain and flipped rows every epoch (official)
    caption: Literal["random", "first"] = "random"  # which caption of an image (caption datasets)
    p_uncond: float = 0.0  # label → num_classes / caption → empty caption with this probability (0.15 official)
    drop_last: bool = True  # memory: False pads the last global batch by wrapping around
    num_workers: int = 2  # stream: DataLoader workers per rank
    shuffle_buffer: int = 1000  # stream: sample shuffle buffer per worker (0: no sample shuffling)
    shuffle_shards: bool = True  # stream: shuffle the shard order every epoch
    resampled: bool = False  # stream: draw shards with replacement forever (set batches_per_epoch)
    batches_per_epoch: Optional[int] = None  # stream: nominal epoch length in batches
    # check every shard's sha256 against the manifest before its rows are used (memory; stream of token-only
    # shards). Caption shards streamed by byte ranges are not hashed: only the rows used are fetched
    verify: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"p_uncond: must lie in [0, 1), got {self.p_uncond}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be ≥ 1, got {self.batch_size}")
        if self.resampled and not self.batches_per_epoch:
            raise ValueError("batches_per_epoch: required with resampled=true (the stream is infinite)")


def _seeds(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]))


class TokenReader:
    """The common interface: iterate one epoch of batches; resume from ``state_dict()``."""

    info: SplitInfo
    epoch: int
    step: int
    empty_context: Optional[np.ndarray]  # (T, D) float16 features of the empty caption (caption datasets)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    def _open(self, root: str, split: str, rank: int, world_size: int, flip: str,
              storage_cfg: storage.StorageLike, info: Optional[SplitInfo]) -> None:
        """Set ``info`` (the caller's when it opened the split already) and ``empty_context``, after checking
        rank and flip against the split."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if flip not in ("random", "none", "both"):
            raise ValueError(f"flip: must be random, none or both, got {flip!r}")
        self.info = info if info is not None else open_split(root, split, storage_cfg)
        if flip in ("random", "both") and not self.info.dataset["splits"][self.info.split].get("flips"):
            raise ValueError(f"{self.info.split}: this split has no flipped tokens (tokenize.flips); use flip='none'")
        text, self.empty_context = self.info.dataset.get("text"), None
        if text:
            url = storage.join(self.info.root, text.get("empty_context", "empty_context.npy"))
            self.empty_context = np.load(io.BytesIO(storage.read_url(url, storage_cfg)), allow_pickle=False)

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
    blobs = storage.cat_many(fs, paths)
    parts = []
    for row, p in zip(info.shards, paths):
        data = blobs[p]
        if verify and sha256(data) != row["sha256"]:
            raise DataError(f"{storage.redact(storage.to_url(fs, p))}: sha256 differs from the manifest "
                             f"(corrupt or replaced shard)")
        rows = read_shard_bytes(data, seq_len=info.seq_len)
        if len(rows) != row["samples"]:
            raise DataError(f"{row['name']}: {len(rows)} samples, manifest says {row['samples']}")
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
                 storage_cfg: storage.StorageLike = None, rows: Optional[Rows] = None,
                 info: Optional[SplitInfo] = None):
        self._open(root, split, rank, world_size, flip, storage_cfg, info)
        self.rows = rows if rows is not None else load_split_rows(self.info, storage_cfg, verify)
        self.batch_size, self.rank, self.world_size, self.seed = batch_size, rank, world_size, seed
        self.flip, self.caption, self.p_uncond, self.drop_last = flip, caption, p_uncond, drop_last
        self.epoch, self.step, self.has_labels = epoch, step, self.info.num_classes > 0
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


def make_reader(cfg: ReaderConfig, rank: int = 0, world_size: int = 1, storage_cfg: storage.StorageLike = None,
                epoch: int = 0, step: int = 0, info: Optional[SplitInfo] = None) -> TokenReader:
    """``ReaderConfig`` → :class:`InMemoryReader` or :class:`StreamingReader` for this rank.

    ``info``: the split as :func:`~pipeline.shards.open_split` read it (on the driver), so the reader does
    not read ``dataset.json`` and the manifest again; None reads them."""
    common = dict(batch_size=cfg.batch_size, rank=rank, world_size=world_size, seed=cfg.seed, flip=cfg.flip,
                  caption=cfg.caption, p_uncond=cfg.p_uncond, drop_last=cfg.drop_last, epoch=epoch, step=step,
                  storage_cfg=storage_cfg, info=info)
    if cfg.kind == "memory":
        return InMemoryReader(cfg.root, cfg.split, verify=cfg.verify, **common)
    if cfg.kind == "stream":
        from pipeline.streaming import StreamingReader

        return StreamingReader(cfg.root, cfg.split, num_workers=cfg.num_workers, shuffle_shards=cfg.shuffle_shards,
                               shuffle_buffer=cfg.shuffle_buffer, resampled=cfg.resampled,
                               batches_per_epoch=cfg.batches_per_epoch, verify=cfg.verify, **common)
    raise ValueError(f"reader.kind: unknown reader {cfg.kind!r}; known: memory, stream")
