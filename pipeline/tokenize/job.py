"""The tokenize graph on Ray Data: list → read bytes → decode + crop → VQ encode → write shards.

The driver lists each split in a stable order and cuts it into shards (:func:`sources.plan_shards`);
a shard is the unit of work. Ray Data then runs, per shard (the stages are in :mod:`.encode`)::

    read_bytes   (CPU task)     every image of the shard, fetched concurrently through fsspec
    decode_crop  (CPU task)     pipeline.images.decode_and_crop → uint8 (n, R, R, 3) + rejects
    ShardEncoder (actor pool)   VQ codes of the crops and their flips in batches, text features,
                                then the shard tar and its commit record, each one atomic write

``read_bytes`` and ``decode_crop`` are fused by Ray Data into one task, so raw bytes never travel.
With GPU actors (``compute.decode_on="tasks"``, the default when ``compute.gpus_per_worker > 0``) the
decode tasks spread over every CPU of the cluster and feed the GPUs; with CPU-only encoding
(``"actors"``, the default without GPUs) each actor reads and decodes its own shard, which saves
moving every crop between processes when the CPUs do all the work anyway.

A shard is committed when its record ``{split}/_parts/{name}.json`` exists (written after the
tar; :class:`pipeline.commits.CommitLog`). A rerun skips committed shards whose plan and config
fingerprints match and redoes the rest, so a killed job resumes with nothing missing and nothing
duplicated; the manifest, rejects and dataset.json are written by the driver once every shard is
committed.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any, Optional

from pipeline import shards, storage
from pipeline.cluster import run_pool
from pipeline.commits import CommitLog, code_version, fingerprint
from pipeline.config import ConfigError, config_to_dict
from pipeline.images import resolve_crop
from pipeline.models import build_tokenizer
from pipeline.tokenize.config import TokenizeJobConfig
from pipeline.tokenize.encode import ShardEncoder, decode_crop, read_bytes, shard_rows
from pipeline.tokenize.sources import Listing, ShardPlan, align_classes, list_source, plan_shards, shard_name


def run_tokenize(cfg: TokenizeJobConfig, log: Any = print) -> dict[str, Any]:
    """Run the tokenize job for every split of ``cfg`` on the current Ray cluster (init it first).

    Every check that can fail runs before the first image is decoded: tokenizer weights and
    resolution, text encoder, label files, class sets across splits and against an existing
    dataset.json, and conflicts with shards already in ``output.uri``.

    Returns the summary ``{"splits": {split: {read, written, converted, rejected, shards,
    skipped_shards, ...}}, "out": url, "images_per_s", run_s, first_unit_s, steady_per_s,
    worker_seconds}``. Raises ``ConfigError`` when ``output.uri`` holds shards made from a different
    plan or config and ``output.overwrite`` is false, or when the splits' classes disagree (naming the
    split and classes); nothing is written then.
    """
    src, out_uri = cfg.source, cfg.output.uri
    fs, out = storage.filesystem(out_uri, cfg.storage)
    out = out.rstrip("/")
    where = f"output.uri {storage.redact(out_uri)}"

    # --- checks: tokenizer, text encoder, the dataset already there, listings and classes
    tok_identity, text_identity, empty = _identities(cfg)
    existing = _existing_dataset(fs, out, cfg, tok_identity)
    listings: dict[str, Listing] = {
        split: list_source(src.kind, src.root, split, cfg.storage, src.extensions, src.limit,
                           src.labels.get(split), src.synsets)
        for split in src.splits}
    # labels must mean the same classes in every split and in what output.uri already holds
    classes = align_classes(listings, (existing or {}).get("classes") or ())

    # --- plan: shards per split, and which of them are still to do
    crop = resolve_crop(src.crop, src.kind)
    summary: dict[str, Any] = {"out": storage.redact(out_uri), "splits": {}}
    plans: dict[str, list[ShardPlan]] = {}
    fingerprints: dict[str, str] = {}
    commits: dict[str, CommitLog] = {}
    todo: list[ShardPlan] = []
    for split in src.splits:
        plans[split] = plan_shards(listings[split], cfg.tokenize.samples_per_shard)
        fingerprints[split] = config_fingerprint(cfg, tok_identity, text_identity, split, crop)
        commits[split] = CommitLog(fs, f"{out}/{split}", key="shard", name=lambda s, split=split: shard_name(split, s))
        planned = {p.shard: {"plan_fingerprint": p.fingerprint, "config_fingerprint": fingerprints[split]}
                   for p in plans[split]}
        units, skipped = commits[split].todo(planned, cfg.output.overwrite, where)
        by_shard = {p.shard: p for p in plans[split]}
        todo += [by_shard[u] for u in units]
        summary["splits"][split] = {"items": len(listings[split].items), "shards": len(plans[split]),
                                    "skipped_shards": skipped}
        log(f"[tokenize] {split}: {len(listings[split].items)} images, {len(listings[split].rejects)} rejected "
            f"while listing, {len(plans[split])} shards ({skipped} already committed)")

    # --- run: decode tasks (unless the actors decode) feeding the encoder actor pool
    decode = {"resolution": cfg.image.resolution, "min_side": cfg.image.min_side,
              "max_pixels": cfg.image.max_pixels, "crop": crop}
    in_worker = cfg.compute.decode_in_worker()
    timing = {"run_s": 0.0, "first_unit_s": None, "steady_per_s": None, "worker_seconds": {}}
    if todo:
        timing = run_pool(shard_rows(todo), ShardEncoder, (cfg, fingerprints, decode if in_worker else None),
                          cfg.compute, what="tokenize", total=sum(len(p.items) for p in todo), count="read",
                          stages=() if in_worker else _decode_stages(cfg, decode),
                          postfix=lambda r: {"shard": f"{r['split']}-{r['shard']:06d}", "rejected": r["rejected"]},
                          log=log)

    # --- everything is committed: rejects and manifests per split, the empty caption, then dataset.json
    totals = {split: _finish_split(fs, out, split, cfg, listings[split], commits[split], plans[split],
                                   summary["splits"][split]) for split in src.splits}
    if empty is not None:
        storage.put_atomic(fs, f"{out}/empty_context.npy", shards.npy_bytes(empty))
    dataset = _dataset_json(cfg, existing, listings, classes, crop, tok_identity, text_identity, totals)
    shards.write_json(fs, f"{out}/dataset.json", dataset)

    run_items = sum(len(p.items) for p in todo)
    summary["images_per_s"] = round(run_items / timing["run_s"], 2) if run_items and timing["run_s"] > 0 else 0.0
    summary.update(timing)
    for split, s in summary["splits"].items():
        log(f"[tokenize] {split}: read {s['read']}, written {s['written']}, converted {s['converted']}, "
            f"rejected {s['rejected']} {s['rejected_by_reason'] or ''}")
    written = sum(s.get("written", 0) for s in summary["splits"].values())
    log(f"[tokenize] done: {written} samples in {storage.redact(out_uri)} "
        f"({len(todo)} shards run in {timing['run_s']:.1f} s, {summary['images_per_s']} images/s)")
    if cfg.mlflow.enabled:
        _track(cfg, summary, listings, totals, tok_identity)
    return summary


def _track(cfg: TokenizeJobConfig, summary: dict, listings: dict[str, Listing], totals: dict,
           tok_identity: dict) -> None:
    """The job's MLflow run: its config, counts and rate, and the lineage: each split of the source
    (digest: the listing) as an input, each split of the token dataset (digest: its shards' sha256) as
    an output."""
    from pipeline import tracking

    m = cfg.mlflow
    name = m.run_name or "tokenize-" + cfg.output.uri.rstrip("/").rsplit("/", 1)[-1]
    with tracking.start_run(m.tracking_uri, m.experiment or "enat", run_name=name,
                            tags={"enat_job": "tokenize", "output_uri": cfg.output.uri}) as run:
        run.log_params(config_to_dict(cfg))
        for split, s in summary["splits"].items():
            run.log_metrics({f"{split}.{k}": s[k] for k in ("read", "written", "rejected", "converted")})
            items = listings[split].items
            run.log_dataset(f"source/{split}", storage.join(cfg.source.root, split),
                            fingerprint([(it.key, it.path) for it in items]), "source",
                            {"kind": cfg.source.kind, "split": split, "images": len(items)})
            run.log_dataset(f"tokens/{split}", cfg.output.uri, totals[split]["digest"], "output",
                            {"split": split, "num_samples": totals[split]["samples"],
                             "resolution": cfg.image.resolution,
                             "tokenizer": {k: tok_identity[k] for k in ("kind", "preset", "weights_sha256")}})
        run.log_metrics({"images_per_s": summary["images_per_s"]})
        summary["mlflow_run_id"] = run.run_id


# ---------------------------------------------------------------------------------------------------
# Checks and fingerprints


def config_fingerprint(cfg: TokenizeJobConfig, tok_identity: dict, text_identity: Optional[dict], split: str,
                       crop: str) -> str:
    """What decides a shard's bytes besides its items; a committed shard is reused only if equal."""
    key = {"format": shards.FORMAT_VERSION, "tokenizer": tok_identity["weights_sha256"],
           "tokenizer_kind": tok_identity["kind"], "image": asdict(cfg.image),
           "flips": cfg.tokenize.has_flips(split),
           "rows_per_entry": cfg.tokenize.rows_per_entry, "text_rows_per_entry": cfg.tokenize.text_rows_per_entry,
           "text": text_identity and text_identity["weights_sha256"]}
    if crop != "adm":  # only then, so shards committed before the crop setting existed stay valid
        key["crop"] = crop
    return fingerprint(key)


def _identities(cfg: TokenizeJobConfig) -> tuple[dict, Optional[dict], Any]:
    """(tokenizer identity, text encoder identity or None, empty caption features or None); checks the
    resolution against the tokenizer and builds the text encoder once, so bad weights fail here."""
    tok, tok_identity = build_tokenizer(cfg.tokenizer, cfg.storage)
    del tok
    if cfg.image.resolution % tok_identity["downsample"]:
        raise ConfigError(f"image.resolution: {cfg.image.resolution} is not a multiple of the tokenizer's "
                          f"downsampling factor {tok_identity['downsample']}")
    if cfg.source.kind != "coco":
        return tok_identity, None, None
    from pipeline.text import build_text_encoder, empty_context

    enc = build_text_encoder(cfg.text, storage_cfg=cfg.storage)
    return tok_identity, enc.identity(), empty_context(enc)  # (T, D) float16


def _existing_dataset(fs: Any, out: str, cfg: TokenizeJobConfig, tok_identity: dict) -> Optional[dict]:
    """The dataset.json already in ``output.uri`` (None if none); refused if made with another tokenizer
    or resolution, unless ``output.overwrite``."""
    path = f"{out}/dataset.json"
    existing = shards.read_json(fs, path) if storage.exists(fs, path) else None
    if existing and not cfg.output.overwrite and (
            existing["tokenizer"]["weights_sha256"] != tok_identity["weights_sha256"]
            or existing["resolution"] != cfg.image.resolution):
        raise ConfigError(f"output.uri: {storage.redact(cfg.output.uri)} already holds a dataset made with another "
                          f"tokenizer or resolution; choose a new output.uri or set output.overwrite=true")
    return existing


def _decode_stages(cfg: TokenizeJobConfig, decode: dict) -> list[tuple]:
    """read_bytes + decode_crop as CPU tasks (``compute.decode_on=tasks``).

    Decode tasks reserve the memory a shard needs (raw bytes + crops). Because the encoder actors
    request none, this also keeps Ray Data from fusing decoding into the actors when their CPU requests
    happen to be equal: decoding must scale over all CPUs, not the actors.
    """
    per_image = 3 * cfg.image.resolution ** 2 + 512 * 1024  # crop + a generous compressed source image
    base = 384 * 2**20  # a worker with torch and PIL imported
    task = {"num_cpus": cfg.compute.decode_cpus, "memory": base + 2 * cfg.tokenize.samples_per_shard * per_image}
    return [(read_bytes, {"storage_cfg": cfg.storage}, task), (decode_crop, decode, task)]


# ---------------------------------------------------------------------------------------------------
# Outputs written by the driver once every shard is committed


def _finish_split(fs: Any, out: str, split: str, cfg: TokenizeJobConfig, listing: Listing, commits: CommitLog,
                  plans: list[ShardPlan], summary: dict) -> dict:
    """Write the split's rejects.parquet and manifest.parquet, update its ``summary`` entry; returns its
    dataset.json entry. ``RuntimeError`` when a planned shard is not committed."""
    recs = commits.require([p.shard for p in plans])
    rejects = [{**asdict(r), "split": split} for r in listing.rejects]
    rejects += [{**r, "split": split} for rec in recs for r in rec["rejects"]]
    shards.write_rejects(fs, f"{out}/{split}/rejects.parquet", rejects)
    shards.write_manifest(fs, f"{out}/{split}/manifest.parquet", recs)
    written = sum(r["samples"] for r in recs)
    converted = sum(len(r["converted"]) for r in recs)
    read = len(listing.items) + len(listing.rejects)
    by_reason: dict[str, int] = {}
    for r in rejects:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    summary.update(read=read, written=written, converted=converted, rejected=len(rejects),
                   rejected_by_reason=by_reason)
    n = len(plans)
    return {"samples": written, "rows": sum(r["rows"] for r in recs), "shards": n,
            "flips": cfg.tokenize.has_flips(split), "read": read, "rejected": len(rejects),
            "rejected_by_reason": dict(sorted(by_reason.items())), "converted": converted,
            "bytes": sum(r["bytes"] for r in recs), "digest": fingerprint([r["sha256"] for r in recs]),
            "pattern": f"{split}-{{000000..{n - 1:06d}}}.tar" if n else None,
            "seconds": {k: round(sum(r["seconds"][k] for r in recs), 3) for k in ("read", "decode", "encode", "write")}}


def _dataset_json(cfg: TokenizeJobConfig, existing: Optional[dict], listings: dict[str, Listing], classes: list,
                  crop: str, tok_identity: dict, text_identity: Optional[dict], totals: dict) -> dict:
    """dataset.json: what the readers and the train job need to know about the token shards."""
    src = cfg.source
    grid = cfg.image.resolution // tok_identity["downsample"]
    dataset = dict(existing or {})
    dataset.update({
        "format": "enat-token-shards", "format_version": shards.FORMAT_VERSION,
        "created": dataset.get("created") or shards.utc_now(), "updated": shards.utc_now(),
        "code_version": code_version(),
        "source": {"kind": src.kind, "root": storage.redact(src.root),
                   "crop": crop,  # the center crop of every token row
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
    return dataset
