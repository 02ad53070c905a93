"""The Ray Data stages of the tokenize graph (module-level, so they pickle): a shard row → its image bytes
(:func:`read_bytes`) → center crops (:func:`decode_crop`) → VQ codes, text features, the shard tar and its
commit record (:class:`ShardEncoder`, the actor)."""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict
from typing import Optional

import numpy as np
import torch

from pipeline import shards, storage
from pipeline.cluster import pick_device
from pipeline.commits import CommitLog, sha256
from pipeline.images import decode_and_crop
from pipeline.models import build_tokenizer
from pipeline.sections import StorageConfig, torch_dtype
from pipeline.tokenize.config import TokenizeJobConfig
from pipeline.tokenize.sources import Item, Reject, ShardPlan, shard_name


def shard_rows(plans: list[ShardPlan]) -> list[dict]:
    """The rows the graph runs on: one per shard, its items as JSON."""
    return [{"split": p.split, "shard": p.shard, "fingerprint": p.fingerprint, "items": _items_to_json(p.items),
             "n_items": len(p.items)} for p in plans]


def _items_to_json(items: tuple[Item, ...]) -> str:
    return json.dumps([asdict(it) for it in items])


def _items_from_json(s: str) -> list[Item]:
    return [Item(**{**d, "captions": tuple(d["captions"])}) for d in json.loads(s)]


def read_bytes(row: dict, storage_cfg: StorageConfig) -> dict:
    """Task stage: a shard row → the bytes of each of its images (fetched concurrently)."""
    t0 = time.perf_counter()
    items = _items_from_json(row["items"])
    blobs: list[bytes] = []
    errors: dict[int, str] = {}
    if items:
        fs, _ = storage.filesystem(items[0].url, storage_cfg)
        paths = [fs._strip_protocol(it.url) for it in items]
        got = storage.cat_many(fs, paths, on_error="return")
        for i, p in enumerate(paths):
            v = got[p] if p in got else storage.cat_many(fs, [p], on_error="return")[p]  # not expanded by fs.cat
            if isinstance(v, BaseException):
                errors[i] = storage.redact(f"{type(v).__name__}: {v}")
                blobs.append(b"")
            else:
                blobs.append(bytes(v))
    return {**row, "blobs": blobs, "read_errors": json.dumps(errors), "read_s": time.perf_counter() - t0}


def decode_crop(row: dict, resolution: int, min_side: int, max_pixels: int, crop: str) -> dict:
    """Task stage: image bytes → center crops ``uint8 (n, R, R, 3)`` (``crop``: pipeline.images.CROPS) + rejects."""
    t0 = time.perf_counter()
    items = _items_from_json(row["items"])
    read_errors = {int(k): v for k, v in json.loads(row["read_errors"]).items()}
    kept, crops, rejects, converted = [], [], [], []
    for i, (it, blob) in enumerate(zip(items, row["blobs"])):
        if i in read_errors:
            rejects.append(asdict(Reject(it.key, it.path, "unreadable", read_errors[i], row["shard"])))
            continue
        d = decode_and_crop(bytes(blob), resolution, min_side=min_side, max_pixels=max_pixels, crop=crop)
        if not d.ok:
            rejects.append(asdict(Reject(it.key, it.path, d.reason or "?", d.detail, row["shard"])))
            continue
        if d.converted_from:
            converted.append([it.key, d.converted_from])
        kept.append(it)
        crops.append(d.array)
    images = np.stack(crops) if crops else np.zeros((0, resolution, resolution, 3), np.uint8)
    out = {k: v for k, v in row.items() if k not in ("blobs", "read_errors")}
    out.update(items=_items_to_json(tuple(kept)), images=images, rejects=json.dumps(rejects),
               converted=json.dumps(converted), decode_s=time.perf_counter() - t0)
    return out


class ShardEncoder:
    """Actor stage: crops → VQ codes (+ flips) and text features → shard tar + commit record.

    ``decode``: the keyword arguments of :func:`decode_crop` when this actor reads and decodes its own
    shards (``compute.decode_on=actors``), else None (task stages did it).
    """

    def __init__(self, cfg: TokenizeJobConfig, fingerprints: dict[str, str], decode: Optional[dict] = None):
        self.cfg, self.fingerprints, self.decode = cfg, fingerprints, decode
        self.device = pick_device(cfg.compute)
        self.tok, _ = build_tokenizer(cfg.tokenizer, cfg.storage)
        self.tok.to(self.device)
        # encoder autocast on cuda only (fp32 = official)
        self.dtype = torch_dtype(cfg.tokenizer.precision) if self.device.type == "cuda" else None
        self.text = None
        if cfg.source.kind == "coco":
            from pipeline.text import build_text_encoder

            self.text = build_text_encoder(cfg.text, device=str(self.device), storage_cfg=cfg.storage)
        self.fs, out = storage.filesystem(cfg.output.uri, cfg.storage)
        self.out = out.rstrip("/")

    def _encode(self, images: np.ndarray, flips: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
        bs = self.cfg.tokenize.batch_size
        n = images.shape[0]
        grid = self.cfg.image.resolution // int(self.tok.downsample)
        plain = np.zeros((n, grid * grid), np.uint16)
        flipped = np.zeros((n, grid * grid), np.uint16) if flips else None
        for s in range(0, n, bs):
            x = torch.from_numpy(images[s:s + bs].copy()).to(self.device)  # (B, R, R, 3) uint8
            x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, R, R) in [0, 1], as official: arr / 255
            b = x.shape[0]
            if flips:
                x = torch.cat([x, x.flip(dims=[-1])], dim=0)  # as official: extract_imagenet_feature.py
            ctx = (torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None
                   else contextlib.nullcontext())
            with ctx:
                codes = self.tok.encode(x).reshape(x.shape[0], -1).cpu().numpy()  # (B or 2B, L)
            plain[s:s + b] = codes[:b]
            if flips:
                flipped[s:s + b] = codes[b:]
        return plain, flipped

    def __call__(self, row: dict) -> dict:
        if self.decode is not None:
            row = decode_crop(read_bytes(row, self.cfg.storage), **self.decode)
        split, shard = row["split"], int(row["shard"])
        name = shard_name(split, shard)
        items = _items_from_json(row["items"])
        images = np.asarray(row["images"], dtype=np.uint8)  # (n, R, R, 3)
        if images.shape[0] != len(items):
            raise ValueError(f"{name}: {len(items)} items but {images.shape[0]} decoded images")
        flips = self.cfg.tokenize.has_flips(split)
        t0 = time.perf_counter()
        tokens, tokens_flip = self._encode(images, flips)
        captions = text = None
        if self.text is not None:
            from pipeline.text import encode_in_batches

            captions = [list(it.captions) for it in items]
            flat = [c for caps in captions for c in caps]
            text = encode_in_batches(self.text, flat, self.cfg.text.batch_size)
        t1 = time.perf_counter()
        rows = shards.Rows(keys=[it.key for it in items], paths=[it.path for it in items],
                           index=[it.index for it in items], cls=[it.label for it in items],
                           tokens=tokens, tokens_flip=tokens_flip, captions=captions, text=text)
        t = self.cfg.tokenize
        data = shards.pack_shard(rows, shard, t.text_rows_per_entry if captions is not None else t.rows_per_entry)
        storage.put_atomic(self.fs, f"{self.out}/{split}/{name}.tar", data)
        seconds = {"read": row["read_s"], "decode": row["decode_s"], "encode": t1 - t0,
                   "write": time.perf_counter() - t1}
        record = {"name": f"{name}.tar", "shard": shard, "split": split,
                  "plan_fingerprint": row["fingerprint"], "config_fingerprint": self.fingerprints[split],
                  "samples": len(items), "rows": len(items) * (2 if flips else 1), "bytes": len(data),
                  "sha256": sha256(data),
                  "first_key": items[0].key if items else None, "last_key": items[-1].key if items else None,
                  "read": int(row["n_items"]), "rejects": json.loads(row["rejects"]),
                  "converted": json.loads(row["converted"]), "seconds": seconds}
        # the commit record is written after the tar: its presence means the shard is complete
        CommitLog(self.fs, f"{self.out}/{split}", key="shard", name=lambda s: shard_name(split, s)).commit(
            shard, record)
        if self.cfg.compute.throttle_s:
            time.sleep(self.cfg.compute.throttle_s)
        return {"split": split, "shard": shard, "samples": len(items), "read": int(row["n_items"]),
                "rejected": len(record["rejects"]), "converted": len(record["converted"]),
                **{f"{k}_s": v for k, v in seconds.items()}}
