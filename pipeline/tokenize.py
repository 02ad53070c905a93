"""The tokenize graph on Ray Data: list → read bytes → decode + crop → VQ encode → write shards.

The driver lists each split in a stable order and cuts it into shards (:func:`sources.plan_shards`);
a shard is the unit of work. Ray Data then runs, per shard::

    read_bytes   (CPU task)     every image of the shard, fetched concurrently through fsspec
    decode_crop  (CPU task)     pipeline.images.decode_and_crop → uint8 (n, R, R, 3) + rejects
    ShardEncoder (actor pool)   VQ codes of the crops and their flips in batches, text features,
                                then the shard tar and its commit record, each one atomic write

``read_bytes`` and ``decode_crop`` are fused by Ray Data into one task, so raw bytes never travel.
With GPU actors (``tokenize.decode_on="tasks"``, the default when ``actor_num_gpus > 0``) the
decode tasks spread over every CPU of the cluster and feed the GPUs; with CPU-only encoding
(``"actors"``, the default without GPUs) each actor reads and decodes its own shard, which saves
moving every crop between processes when the CPUs do all the work anyway.

A shard is committed when its record ``{split}/_parts/{name}.json`` exists (written after the
tar). A rerun skips committed shards whose plan and config fingerprints match and redoes the rest,
so a killed job resumes with nothing missing and nothing duplicated; the manifest, rejects and
dataset.json are written by the driver once every shard is committed.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict
from typing import Any, Optional

import numpy as np
import torch

from pipeline import shards as shards_mod
from pipeline import storage
from pipeline.config import (ConfigError, TokenizeJobConfig, TokenizerConfig, config_to_dict,
                             load_config)
from pipeline.images import decode_and_crop, resolve_crop
from pipeline.sources import (Item, Listing, Reject, ShardPlan, align_classes, list_source, plan_shards,
                              shard_name)

PARTS_DIR = "_parts"


# ---------------------------------------------------------------------------------------------------
# Tokenizer and identities


def code_version() -> dict[str, Optional[str]]:
    """Package version and git commit of this code (None where unknown)."""
    version = None
    with contextlib.suppress(Exception):
        from importlib.metadata import version as _v
        version = _v("enat-pipeline")
    sha = None
    with contextlib.suppress(Exception):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if out.returncode == 0:
            sha = out.stdout.strip()
    return {"package": version, "git": sha}


def _state_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_tokenizer(cfg: TokenizerConfig, storage_cfg: storage.StorageLike = None) -> tuple[Any, dict[str, Any]]:
    """Build the VQ tokenizer and its identity ``{kind, class, weights (redacted URL),
    weights_sha256, codebook_size, downsample, random}``.

    ``weights_sha256`` is the sha256 of the weights file (or of the state dict for random weights).
    """
    data = None
    if cfg.weights:
        fs, path = storage.filesystem(cfg.weights, storage_cfg)
        data = fs.cat_file(path)
    if cfg.kind == "vqgan":
        from enat.vqgan import VQGAN

        if data is not None:
            tok = VQGAN.from_official(io.BytesIO(data), cfg.preset)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                tok = VQGAN(cfg.preset)
    elif cfg.kind == "patch":
        from enat.patch_vq import PatchVQ

        if data is None:
            raise ConfigError("tokenizer.weights: required for tokenizer.kind=patch (a PatchVQ state dict)")
        tok = PatchVQ.from_state_dict(io.BytesIO(data))
    else:
        raise ConfigError(f"tokenizer.kind: unknown tokenizer {cfg.kind!r}; known: vqgan, patch")
    if int(tok.codebook_size) > 65536:
        raise ConfigError(f"tokenizer: codebook_size {tok.codebook_size} does not fit uint16 token shards")
    tok.eval()
    identity = {"kind": cfg.kind, "class": f"{type(tok).__module__}.{type(tok).__qualname__}",
                "preset": cfg.preset if cfg.kind == "vqgan" else None,
                "weights": storage.redact(cfg.weights) if cfg.weights else None,
                "weights_sha256": hashlib.sha256(data).hexdigest() if data is not None else _state_sha256(tok),
                "random": data is None, "seed": cfg.seed if data is None else None,
                "codebook_size": int(tok.codebook_size), "downsample": int(tok.downsample)}
    return tok, identity


def split_has_flips(split: str, mode: str) -> bool:
    """``tokenize.flips``: "train" → splits whose name starts with "train" (as official: train only)."""
    return mode == "all" or (mode == "train" and split.startswith("train"))


def config_fingerprint(cfg: TokenizeJobConfig, tok_identity: dict, text_identity: Optional[dict],
                       split: str) -> str:
    """What decides a shard's bytes besides its items; a committed shard is reused only if equal."""
    key = {"format": shards_mod.FORMAT_VERSION, "tokenizer": tok_identity["weights_sha256"],
           "tokenizer_kind": tok_identity["kind"], "image": asdict(cfg.image),
           "flips": split_has_flips(split, cfg.tokenize.flips),
           "rows_per_entry": cfg.tokenize.rows_per_entry, "text_rows_per_entry": cfg.tokenize.text_rows_per_entry,
           "text": text_identity and text_identity["weights_sha256"]}
    crop = resolve_crop(cfg.source.crop, cfg.source.kind)
    if crop != "adm":  # only then, so shards committed before the crop setting existed stay valid
        key["crop"] = crop
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Ray Data stages (module-level, picklable)


def _items_to_json(items: tuple[Item, ...]) -> str:
    return json.dumps([asdict(it) for it in items])


def _items_from_json(s: str) -> list[Item]:
    return [Item(**{**d, "captions": tuple(d["captions"])}) for d in json.loads(s)]


def read_bytes(row: dict, storage_cfg: dict) -> dict:
    """Task stage: a shard row → the bytes of each of its images (fetched concurrently)."""
    t0 = time.perf_counter()
    items = _items_from_json(row["items"])
    blobs: list[bytes] = []
    errors: dict[int, str] = {}
    if items:
        fs, _ = storage.filesystem(items[0].url, storage_cfg)
        paths = [fs._strip_protocol(it.url) for it in items]
        got = fs.cat(paths, on_error="return") if len(paths) > 1 else {}
        for i, p in enumerate(paths):
            v = got[p] if p in got else _cat_one(fs, p)
            if isinstance(v, BaseException):
                errors[i] = storage.redact(f"{type(v).__name__}: {v}")
                blobs.append(b"")
            else:
                blobs.append(bytes(v))
    return {**row, "blobs": blobs, "read_errors": json.dumps(errors), "read_s": time.perf_counter() - t0}


def _cat_one(fs: Any, path: str) -> Any:
    try:
        return fs.cat_file(path)
    except Exception as e:  # returned like fs.cat(on_error="return") does
        return e


def decode_crop(row: dict, resolution: int, min_side: int, max_pixels: int, crop: str = "adm") -> dict:
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
    """Actor stage: crops → VQ codes (+ flips) and text features → shard tar + commit record."""

    def __init__(self, cfg: dict, fingerprints: dict[str, str], decode: bool = False):
        self.cfg: TokenizeJobConfig = load_config(TokenizeJobConfig, cfg)
        self.fingerprints = fingerprints
        self.decode = decode  # read + decode the shard here (decode_on="actors")
        t = self.cfg.tokenize
        want_cuda = t.device == "cuda" or (t.device == "auto" and t.actor_num_gpus > 0 and torch.cuda.is_available())
        self.device = torch.device("cuda" if want_cuda else "cpu")
        if self.device.type == "cpu":  # one intra-op thread per reserved CPU; scale with more actors
            torch.set_num_threads(max(1, int(t.actor_num_cpus)))
        self.tok, self.tok_identity = build_tokenizer(self.cfg.tokenizer, self.cfg.storage)
        self.tok.to(self.device)
        self.text = None
        if self.cfg.source.kind == "coco":
            from pipeline.text import build_text_encoder

            self.text = build_text_encoder(self.cfg.text, device=str(self.device), storage_cfg=self.cfg.storage)
        self.fs, self.out = storage.filesystem(t.out, self.cfg.storage)
        self.out = self.out.rstrip("/")

    def _encode(self, images: np.ndarray, flips: bool) -> tuple[np.ndarray, Optional[np.ndarray]]:
        t = self.cfg.tokenize
        n = images.shape[0]
        grid = self.cfg.image.resolution // int(self.tok.downsample)
        plain = np.zeros((n, grid * grid), np.uint16)
        flipped = np.zeros((n, grid * grid), np.uint16) if flips else None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
        for s in range(0, n, t.batch_size):
            x = torch.from_numpy(images[s:s + t.batch_size].copy()).to(self.device)  # (B, R, R, 3) uint8
            x = x.permute(0, 3, 1, 2).float().div_(255.0)  # (B, 3, R, R) in [0, 1], as official: arr / 255
            b = x.shape[0]
            if flips:
                x = torch.cat([x, x.flip(dims=[-1])], dim=0)  # as official: extract_imagenet_feature.py
            ctx = (torch.autocast(self.device.type, dtype=dtype) if dtype is not None and self.device.type == "cuda"
                   else contextlib.nullcontext())
            with ctx:
                codes = self.tok.encode(x).reshape(x.shape[0], -1).cpu().numpy()  # (B or 2B, L)
            plain[s:s + b] = codes[:b]
            if flips:
                flipped[s:s + b] = codes[b:]
        return plain, flipped

    def __call__(self, row: dict) -> dict:
        if self.decode:
            im = self.cfg.image
            row = decode_crop(read_bytes(row, asdict(self.cfg.storage)), im.resolution, im.min_side, im.max_pixels,
                              resolve_crop(self.cfg.source.crop, self.cfg.source.kind))
        split, shard = row["split"], int(row["shard"])
        name = shard_name(split, shard)
        items = _items_from_json(row["items"])
        images = np.asarray(row["images"], dtype=np.uint8)  # (n, R, R, 3)
        if images.shape[0] != len(items):
            raise ValueError(f"{name}: {len(items)} items but {images.shape[0]} decoded images")
        flips = split_has_flips(split, self.cfg.tokenize.flips)
        t0 = time.perf_counter()
        tokens, tokens_flip = self._encode(images, flips)
        captions = text = None
        if self.text is not None:
            from pipeline.text import encode_in_batches

            captions = [list(it.captions) for it in items]
            flat = [c for caps in captions for c in caps]
            text = encode_in_batches(self.text, flat, self.cfg.text.batch_size)
        t1 = time.perf_counter()
        rows = shards_mod.Rows(keys=[it.key for it in items], paths=[it.path for it in items],
                               index=[it.index for it in items], cls=[it.label for it in items],
                               tokens=tokens, tokens_flip=tokens_flip, captions=captions, text=text)
        per_entry = self.cfg.tokenize.text_rows_per_entry if captions is not None else self.cfg.tokenize.rows_per_entry
        data = shards_mod.pack_shard(rows, shard, per_entry)
        storage.put_atomic(self.fs, f"{self.out}/{split}/{name}.tar", data)
        record = {"name": f"{name}.tar", "shard": shard, "split": split,
                  "plan_fingerprint": row["fingerprint"], "config_fingerprint": self.fingerprints[split],
                  "samples": len(items), "rows": len(items) * (2 if flips else 1), "bytes": len(data),
                  "sha256": shards_mod.sha256(data),
                  "first_key": items[0].key if items else None, "last_key": items[-1].key if items else None,
                  "read": int(row["n_items"]), "rejects": json.loads(row["rejects"]),
                  "converted": json.loads(row["converted"]),
                  "seconds": {"read": row["read_s"], "decode": row["decode_s"], "encode": t1 - t0,
                              "write": 0.0}}
        record["seconds"]["write"] = time.perf_counter() - t1
        # the commit record is written after the tar: its presence means the shard is complete
        storage.put_atomic(self.fs, f"{self.out}/{split}/{PARTS_DIR}/{name}.json",
                           json.dumps(record).encode())
        if self.cfg.tokenize.throttle_s:
            time.sleep(self.cfg.tokenize.throttle_s)
        return {"split": split, "shard": shard, "samples": len(items), "read": int(row["n_items"]),
                "rejected": len(record["rejects"]), "converted": len(record["converted"])}


# ---------------------------------------------------------------------------------------------------
# Driver


def _committed(fs: Any, out: str, split: str) -> dict[int, dict]:
    """Commit records of the split's finished shards, by shard id (fetched concurrently)."""
    paths = storage.list_files(fs, f"{out}/{split}/{PARTS_DIR}", suffix=".json")
    blobs = fs.cat(paths, on_error="raise") if len(paths) > 1 else {p: fs.cat_file(p) for p in paths}
    records = {}
    for p in paths:
        rec = json.loads(blobs[p])
        records[int(rec["shard"])] = rec
    return records


def _shard_rows(plans: list[ShardPlan]) -> list[dict]:
    return [{"split": p.split, "shard": p.shard, "fingerprint": p.fingerprint, "items": _items_to_json(p.items),
             "n_items": len(p.items)} for p in plans]


def run_tokenize(cfg: TokenizeJobConfig, log: Any = print) -> dict[str, Any]:
    """Run the tokenize job for every split of ``cfg`` on the current Ray cluster (init it first).

    Every check that can fail runs before the first image is decoded: tokenizer weights and
    resolution, text encoder, label files, class sets across splits and against an existing
    dataset.json, and conflicts with shards already in ``tokenize.out``.

    Returns the summary ``{"splits": {split: {read, written, converted, rejected, shards,
    skipped_shards, ...}}, "out": url}``. Raises ``ConfigError`` when ``tokenize.out`` holds shards
    made from a different plan or config and ``tokenize.overwrite`` is false, or when the splits'
    classes disagree (naming the split and classes); nothing is written then.
    """
    import ray

    t = cfg.tokenize
    fs, out = storage.filesystem(t.out, cfg.storage)
    out = out.rstrip("/")
    tok, tok_identity = build_tokenizer(cfg.tokenizer, cfg.storage)
    grid = cfg.image.resolution // tok_identity["downsample"]
    if cfg.image.resolution % tok_identity["downsample"]:
        raise ConfigError(f"image.resolution: {cfg.image.resolution} is not a multiple of the tokenizer's "
                          f"downsampling factor {tok_identity['downsample']}")
    text_identity = empty = None
    if cfg.source.kind == "coco":
        from pipeline.text import build_text_encoder, empty_context

        enc = build_text_encoder(cfg.text, storage_cfg=cfg.storage)
        text_identity = enc.identity()
        empty = empty_context(enc)  # (T, D) float16
    del tok

    ds_path = f"{out}/dataset.json"
    existing = shards_mod.read_json(fs, ds_path) if storage.exists(fs, ds_path) else None
    if existing and not t.overwrite:
        if existing["tokenizer"]["weights_sha256"] != tok_identity["weights_sha256"] or \
                existing["resolution"] != cfg.image.resolution:
            raise ConfigError(f"tokenize.out: {storage.redact(t.out)} already holds a dataset made with another "
                              f"tokenizer or resolution; choose a new tokenize.out or set tokenize.overwrite=true")

    summary: dict[str, Any] = {"out": storage.redact(t.out), "splits": {}}
    src = cfg.source
    listings: dict[str, Listing] = {
        split: list_source(src.kind, src.root, split, cfg.storage, src.extensions, src.limit,
                           src.labels.get(split), src.synsets)
        for split in src.splits}
    # labels must mean the same classes in every split and in what tokenize.out already holds
    classes = align_classes(listings, (existing or {}).get("classes") or ())
    plans: dict[str, list[ShardPlan]] = {}
    fingerprints: dict[str, str] = {}
    todo: list[ShardPlan] = []
    for split in cfg.source.splits:
        listing = listings[split]
        plans[split] = plan_shards(listing, t.samples_per_shard)
        fingerprints[split] = config_fingerprint(cfg, tok_identity, text_identity, split)
        storage.remove_stale_temps(fs, f"{out}/{split}")
        done = _committed(fs, out, split)
        skipped = 0
        for p in plans[split]:
            rec = done.get(p.shard)
            if rec is None:
                todo.append(p)
            elif rec["plan_fingerprint"] == p.fingerprint and rec["config_fingerprint"] == fingerprints[split]:
                skipped += 1
            elif t.overwrite:
                todo.append(p)
            else:
                raise ConfigError(f"tokenize.out: {p.name} in {storage.redact(t.out)} was made from different "
                                  f"inputs or settings; choose a new tokenize.out or set tokenize.overwrite=true")
        stale = sorted(set(done) - {p.shard for p in plans[split]})
        if stale:
            raise ConfigError(f"tokenize.out: {split} holds shard records {stale[:5]} beyond this plan's "
                              f"{len(plans[split])} shards; choose a new tokenize.out")
        summary["splits"][split] = {"items": len(listing.items), "shards": len(plans[split]),
                                    "skipped_shards": skipped}
        log(f"[tokenize] {split}: {len(listing.items)} images, {len(listing.rejects)} rejected while listing, "
            f"{len(plans[split])} shards ({skipped} already committed)")

    t_start = time.perf_counter()
    timing = _execute(cfg, todo, fingerprints, log) if todo else {}
    elapsed = time.perf_counter() - t_start

    # Everything is committed: write rejects, the empty caption, manifests, then dataset.json.
    totals: dict[str, Any] = {}
    for split in cfg.source.splits:
        records = _committed(fs, out, split)
        missing = [p.name for p in plans[split] if p.shard not in records]
        if missing:
            raise RuntimeError(f"{split}: shards {missing[:5]} were not committed; rerun the job to finish them")
        recs = [records[p.shard] for p in plans[split]]
        rejects = [{**asdict(r), "split": split} for r in listings[split].rejects]
        rejects += [{**r, "split": split} for rec in recs for r in rec["rejects"]]
        shards_mod.write_rejects(fs, f"{out}/{split}/rejects.parquet", rejects)
        written = sum(r["samples"] for r in recs)
        converted = sum(len(r["converted"]) for r in recs)
        read = len(listings[split].items) + len(listings[split].rejects)
        by_reason: dict[str, int] = {}
        for r in rejects:
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
        shards_mod.write_manifest(fs, f"{out}/{split}/manifest.parquet", recs)
        n = len(plans[split])
        totals[split] = {"samples": written, "rows": sum(r["rows"] for r in recs), "shards": n,
                         "flips": split_has_flips(split, t.flips), "read": read, "rejected": len(rejects),
                         "rejected_by_reason": dict(sorted(by_reason.items())), "converted": converted,
                         "bytes": sum(r["bytes"] for r in recs),
                         "pattern": f"{split}-{{000000..{n - 1:06d}}}.tar" if n else None,
                         "seconds": {k: round(sum(r["seconds"][k] for r in recs), 3)
                                     for k in ("read", "decode", "encode", "write")}}
        summary["splits"][split].update(read=read, written=written, converted=converted, rejected=len(rejects),
                                        rejected_by_reason=by_reason)
    if empty is not None:
        storage.put_atomic(fs, f"{out}/empty_context.npy", shards_mod.npy_bytes(empty))
    dataset = dict(existing or {})
    dataset.update({
        "format": "enat-token-shards", "format_version": shards_mod.FORMAT_VERSION,
        "created": dataset.get("created") or shards_mod.utc_now(), "updated": shards_mod.utc_now(),
        "code_version": code_version(),
        "source": {"kind": src.kind, "root": storage.redact(src.root),
                   "crop": resolve_crop(src.crop, src.kind),  # the center crop of every token row
                   "label_files": {s: listings[s].label_file for s in src.splits if listings[s].label_file}},
        "tokenizer": tok_identity, "resolution": cfg.image.resolution, "grid": [grid, grid],
        "seq_len": grid * grid, "codebook_size": tok_identity["codebook_size"], "token_dtype": "uint16",
        "num_classes": len(classes) if classes else dataset.get("num_classes", 0),
        "classes": classes or dataset.get("classes", []),  # label i = classes[i] (sorted class folder names)
        "label_map": {c: i for i, c in enumerate(classes or dataset.get("classes", []))},
        "text": None if text_identity is None else {**text_identity, "empty_context": "empty_context.npy"},
        "config": config_to_dict(cfg),
    })
    dataset.setdefault("splits", {}).update(totals)
    shards_mod.write_json(fs, ds_path, dataset)

    written = sum(s.get("written", 0) for s in summary["splits"].values())
    summary["seconds"] = round(elapsed, 3)
    run_items = sum(len(p.items) for p in todo)
    summary["images_per_s"] = round(run_items / elapsed, 2) if run_items and elapsed > 0 else 0.0
    summary.update(timing)
    for split, s in summary["splits"].items():
        log(f"[tokenize] {split}: read {s['read']}, written {s['written']}, converted {s['converted']}, "
            f"rejected {s['rejected']} {s['rejected_by_reason'] or ''}")
    log(f"[tokenize] done: {written} samples in {storage.redact(t.out)} "
        f"({len(todo)} shards run in {elapsed:.1f} s, {summary['images_per_s']} images/s)")
    return summary


def _execute(cfg: TokenizeJobConfig, todo: list[ShardPlan], fingerprints: dict[str, str],
             log: Any) -> dict[str, Any]:
    import ray

    t = cfg.tokenize
    rows = _shard_rows(todo)
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    decode_in_actor = t.decode_on == "actors" or (t.decode_on == "auto" and not t.actor_num_gpus)
    if not decode_in_actor:
        # Decode tasks reserve the memory a shard needs (raw bytes + crops). Because the encoder
        # actors request none, this also keeps Ray Data from fusing decoding into the actors when
        # their CPU requests happen to be equal: decoding must scale over all CPUs, not the actors.
        per_image = 3 * cfg.image.resolution ** 2 + 512 * 1024  # crop + a generous compressed source image
        base = 384 * 2**20  # a worker with torch and PIL imported
        task_args = {"num_cpus": t.decode_num_cpus, "memory": base + 2 * t.samples_per_shard * per_image}
        ds = ds.map(read_bytes, fn_kwargs={"storage_cfg": asdict(cfg.storage)}, **task_args)
        ds = ds.map(decode_crop, fn_kwargs={"resolution": cfg.image.resolution, "min_side": cfg.image.min_side,
                                            "max_pixels": cfg.image.max_pixels,
                                            "crop": resolve_crop(cfg.source.crop, cfg.source.kind)}, **task_args)
    ds = ds.map(ShardEncoder, fn_constructor_args=(config_to_dict(cfg), fingerprints, decode_in_actor),
                compute=ray.data.ActorPoolStrategy(size=t.encode_actors),
                num_cpus=t.actor_num_cpus, num_gpus=t.actor_num_gpus or None)
    total = sum(len(p.items) for p in todo)
    bar = None
    if t.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="img", desc="tokenize", dynamic_ncols=True, file=sys.stderr)
    done = 0
    t0 = time.perf_counter()
    t_first = first_n = None
    try:
        for r in ds.iter_rows():
            done += int(r["read"])
            if t_first is None:
                t_first, first_n = time.perf_counter(), done
            if bar is not None:
                bar.update(int(r["read"]))
                bar.set_postfix(shard=f"{r['split']}-{r['shard']:06d}", rejected=r["rejected"])
    finally:
        if bar is not None:
            bar.close()
    t_end = time.perf_counter()
    log(f"[tokenize] {len(todo)} shards, {done} images in {t_end - t0:.1f} s")
    # steady rate: after the first shard, i.e. without worker start-up and model loading
    steady = None
    if t_first is not None and t_end > t_first and done > first_n:
        steady = (done - first_n) / (t_end - t_first)
    return {"first_shard_s": None if t_first is None else round(t_first - t0, 3),
            "steady_images_per_s": None if steady is None else round(steady, 2)}
