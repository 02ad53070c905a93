"""Reference FID statistics from real images (the fid-stats job, ``python -m jobs.fid_stats``).

The sample job's unit / commit / merge machinery over real images — a folder (recursively), webdataset
tars, or the ``arr_0`` images of an ADM reference batch npz: each unit's images are decoded and
center-cropped (an ADM batch's are used as stored), fed to the FID Inception, and their FeatureStats
written and committed; the driver merges them exactly into ``{output.uri}/fid_stats.npz`` with ``mu`` /
``sigma`` (pytorch-fid statistics; docs/evaluation.md says which reference goes with which protocol).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch

import enat
from pipeline import storage
from pipeline.cluster import pick_device, run_pool
from pipeline.commits import CommitLog, file_identity, fingerprint, sha256
from pipeline.config import ConfigError
from pipeline.models import InceptionSection, build_inception
from pipeline.sample.config import COMPUTE_RENAMED, FORMAT_VERSION, TORCH_SPELLING, RealImagesConfig
from pipeline.sample.formats import (adm_npz_layout, merge_stats, npz_bytes, read_adm_npz_rows, read_unit_stats,
                                     stats_npz_bytes)
from pipeline.sections import ComputeSection, OutputSection, RayConfig, StorageConfig


@dataclass(frozen=True)
class FidStatsJobConfig:
    """`python -m jobs.fid_stats --config x.yaml`: reference mu / sigma from real images."""

    RENAMED: ClassVar[dict[str, str]] = {**COMPUTE_RENAMED, "overwrite": "output.overwrite",
                                         "inception.dtype": "inception.precision"}

    source: RealImagesConfig = field(default_factory=RealImagesConfig)
    inception: InceptionSection = field(default_factory=InceptionSection)
    output: OutputSection = field(default_factory=OutputSection)  # fid_stats.npz (mu, sigma), manifest.json, _parts/
    compute: ComputeSection = field(default_factory=ComputeSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.source.root:
            raise ConfigError("source.root: required (folder or shards of real images)")
        if not self.output.uri:
            raise ConfigError("output.uri: required (output folder URL)")
        if not self.inception.weights:
            raise ConfigError("inception.weights: required (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")


@dataclass(frozen=True)
class RealUnit:
    """One work unit of real images: file URLs (folder), one tar URL (webdataset), or the rows
    [start, stop) of an ADM npz's `arr_0` (adm_npz: `urls` holds the npz URL)."""

    urls: tuple[str, ...]
    rows: Optional[tuple[int, int]] = None

    def row(self, unit: int, identity_fingerprint: str) -> dict[str, Any]:
        """The Ray Data row (JSON strings keep Arrow from guessing types)."""
        key = [identity_fingerprint, list(self.urls)] + ([list(self.rows)] if self.rows else [])
        return {"unit": unit, "urls": json.dumps(list(self.urls)), "rows": json.dumps(self.rows),
                "fingerprint": fingerprint(key)}

    @staticmethod
    def from_row(row: dict[str, Any]) -> "RealUnit":
        rows = json.loads(row["rows"])
        return RealUnit(tuple(json.loads(row["urls"])), tuple(rows) if rows else None)


def list_real_images(src: RealImagesConfig, storage_cfg: storage.StorageLike = None) -> list[RealUnit]:
    """The work units of real images (folder: chunks of ``unit_size`` files in sorted order; webdataset:
    one unit per tar; adm_npz: chunks of ``unit_size`` rows, the file's layout checked first). Raises
    ``FileNotFoundError`` when there is nothing to read, ``ValueError`` for an unusable ADM npz."""
    fs, root = storage.filesystem(src.root, storage_cfg)
    root = root.rstrip("/")
    if src.kind == "adm_npz":
        n = adm_npz_layout(fs, root, src.root, src.resolution).count
        n = n if src.limit is None else min(n, src.limit)
        url = storage.to_url(fs, root)
        return [RealUnit((url,), (s, min(s + src.unit_size, n))) for s in range(0, n, src.unit_size)]
    if src.kind == "webdataset":
        tars = [root] if root.endswith(".tar") else storage.list_files(fs, root, suffix=".tar", recursive=True)
        if not tars:
            raise FileNotFoundError(f"{storage.redact(src.root)}: no .tar shards")
        return [RealUnit((storage.to_url(fs, t),)) for t in tars]
    exts = {e.lower().lstrip(".") for e in src.extensions}
    files = [p for p in storage.list_files(fs, root, recursive=True)
             if "." in p.rsplit("/", 1)[-1] and p.rsplit(".", 1)[-1].lower() in exts]
    if src.limit is not None:
        files = files[:src.limit]
    if not files:
        raise FileNotFoundError(f"{storage.redact(src.root)}: no image files with extensions {sorted(exts)}")
    urls = [storage.to_url(fs, p) for p in files]
    return [RealUnit(tuple(urls[i:i + src.unit_size])) for i in range(0, len(urls), src.unit_size)]


def _real_images(urls: Sequence[str], kind: str, extensions: Sequence[str],
                 storage_cfg: storage.StorageLike) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every image of a unit: files, or the image members of a tar; an unreadable file
    gives b"" (recorded as a reject)."""
    if kind == "webdataset":
        import tarfile

        exts = {e.lower().lstrip(".") for e in extensions}
        with tarfile.open(fileobj=io.BytesIO(storage.read_url(urls[0], storage_cfg)), mode="r|") as tf:
            for ti in tf:
                if ti.isreg() and ti.name.rsplit(".", 1)[-1].lower() in exts:
                    f = tf.extractfile(ti)
                    yield ti.name, f.read() if f is not None else b""
        return
    fs, _ = storage.filesystem(urls[0], storage_cfg)
    paths = [fs._strip_protocol(u) for u in urls]
    got = storage.cat_many(fs, paths, on_error="return")
    for u, p in zip(urls, paths):
        v = got.get(p)
        yield u, v if isinstance(v, bytes) else b""


class RealStatsActor:
    """Ray Data actor: a unit of real images (decoded and center-cropped files, or an ADM npz's rows as
    stored) → Inception → FeatureStats → commit."""

    def __init__(self, cfg: FidStatsJobConfig) -> None:
        self.cfg = cfg
        self.device = pick_device(cfg.compute)
        self.net, self.sha = build_inception(cfg.inception, cfg.storage, self.device)
        self.fs, out = storage.filesystem(cfg.output.uri, cfg.storage)
        self.out = out.rstrip("/")
        self.commits = CommitLog(self.fs, self.out)

    def _decoded(self, real: RealUnit, rejects: list[dict]) -> Iterator[np.ndarray]:
        """Center crops (uint8 [R, R, 3]) of the unit's image files; undecodable ones go to ``rejects``."""
        from pipeline.images import decode_and_crop

        src = self.cfg.source
        for name, data in _real_images(real.urls, src.kind, src.extensions, self.cfg.storage):
            d = decode_and_crop(data, src.resolution, crop=src.crop)
            if d.ok:
                yield d.array
            else:
                rejects.append({"name": storage.redact(name), "reason": d.reason, "detail": d.detail})

    @torch.no_grad()
    def __call__(self, row: dict) -> dict:
        src = self.cfg.source
        unit = int(row["unit"])
        t0 = time.perf_counter()
        feats = enat.FeatureStats.empty(2048, self.device)
        rejects, batch = [], []
        t_inc = 0.0

        def flush() -> None:
            nonlocal t_inc
            t = time.perf_counter()
            x = torch.from_numpy(np.stack(batch)).to(self.device).permute(0, 3, 1, 2)  # (b, 3, R, R) uint8
            feats.update(self.net(x)[0])
            batch.clear()
            t_inc += time.perf_counter() - t

        real = RealUnit.from_row(row)
        if real.rows is not None:  # adm_npz: decoded pixels already, used as stored
            images: Iterable[np.ndarray] = read_adm_npz_rows(real.urls[0], *real.rows, src.resolution, self.cfg.storage)
        else:
            images = self._decoded(real, rejects)
        for image in images:
            batch.append(image)
            if len(batch) == src.batch_size:
                flush()
        if batch:
            flush()
        data = stats_npz_bytes(feats, None)
        storage.put_atomic(self.fs, f"{self.out}/stats/{unit:06d}.npz", data)
        rec = {"unit": unit, "fingerprint": row["fingerprint"], "samples": feats.n, "rejects": rejects,
               "files": {f"stats/{unit:06d}.npz": {"bytes": len(data), "sha256": sha256(data)}},
               "identity": {"inception_sha256": self.sha},
               "seconds": {"read_decode": round(time.perf_counter() - t0 - t_inc, 4), "inception": round(t_inc, 4)}}
        self.commits.commit(unit, rec)
        if self.cfg.compute.throttle_s:
            time.sleep(self.cfg.compute.throttle_s)
        return {"unit": unit, "samples": len(rejects) + feats.n, **{f"{k}_s": v for k, v in rec["seconds"].items()}}


def run_fid_stats(cfg: FidStatsJobConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Reference statistics of real images on the current Ray cluster: ``{output.uri}/fid_stats.npz`` with
    ``mu`` (float64 [2048]) and ``sigma`` (float64 [2048, 2048]), pytorch-fid's format. Resumable like the
    sample job. Returns {stats (URL), sha256, n, rejected, …}."""
    units = list_real_images(cfg.source, cfg.storage)
    fs, out = storage.filesystem(cfg.output.uri, cfg.storage)
    out = out.rstrip("/")
    source = {**dataclasses.asdict(cfg.source), "root": storage.redact(cfg.source.root)}
    if source["crop"] == "adm":  # statistics written before the crop option keep their fingerprint
        del source["crop"]
    identity = {"format_version": FORMAT_VERSION, "source": source,
                "inception": {"weights": file_identity(cfg.inception.weights, cfg.storage),
                              "uint8": cfg.inception.uint8, "dtype": TORCH_SPELLING[cfg.inception.precision]}}
    if cfg.source.kind == "adm_npz":  # one file: a changed file (size / etag) must not reuse its units
        identity["source_file"] = file_identity(cfg.source.root, cfg.storage)
    fp = fingerprint(identity)
    rows = [ru.row(u, fp) for u, ru in enumerate(units)]
    commits = CommitLog(fs, out)
    todo, skipped = commits.todo({r["unit"]: {"fingerprint": r["fingerprint"]} for r in rows},
                                 cfg.output.overwrite, f"output.uri {storage.redact(cfg.output.uri)}")
    log(f"[fid-stats] {len(units)} units of real images ({skipped} already committed)")
    timing = run_pool([rows[u] for u in todo], RealStatsActor, (cfg,), cfg.compute, what="fid-stats",
                      postfix=lambda r: {"unit": r["unit"]}, log=log) if todo else {}
    recs = commits.require([r["unit"] for r in rows])
    feats, _ = merge_stats(read_unit_stats(fs, out, recs))
    mu, sigma = feats.mean_cov()
    data = npz_bytes(mu=mu, sigma=sigma)
    storage.put_atomic(fs, f"{out}/fid_stats.npz", data)
    rejects = [r for rec in recs for r in rec["rejects"]]
    by_reason = collections.Counter(r["reason"] for r in rejects)
    summary = {"stats": storage.redact(storage.to_url(fs, f"{out}/fid_stats.npz")), "sha256": sha256(data),
               "n": feats.n, "rejected": len(rejects), "rejected_by_reason": dict(sorted(by_reason.items())),
               "units": len(rows), "units_run": len(todo), **timing}
    storage.put_atomic(fs, f"{out}/manifest.json", json.dumps(
        {"format": "enat-fid-stats", "fingerprint": fp, "identity": identity, "results": summary,
         "rejects": rejects, "units": [{"unit": r["unit"], "samples": r["samples"], "files": r["files"]}
                                       for r in recs]}, indent=1).encode())
    log(f"[fid-stats] {feats.n} images → {summary['stats']} ({len(rejects)} rejected {dict(by_reason) or ''})")
    return summary
