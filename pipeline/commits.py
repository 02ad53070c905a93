"""One resume protocol for every job that works in units (tokenize shards, sample units, fid-stats units).

A job cuts its work into units whose inputs are a pure function of the plan, so a unit's output bytes do
not depend on which worker makes it or when. Each unit is written by a worker as a set of files, each one
atomic put, and then its **commit record** ``{root}/_parts/{name}.json`` — written last, so its presence
means every file of the unit is complete. The record carries the unit's fingerprints (what decided its
bytes). On a rerun the driver reads every record once (:meth:`CommitLog.records`) and
:meth:`CommitLog.todo` decides per unit: same fingerprints → skip; no record → run; other fingerprints
→ run again with ``overwrite``, else stop with a :class:`~pipeline.config.ConfigError` naming the output
and the fix. Merges read exactly one record per planned unit (:meth:`CommitLog.require`), so nothing is
counted twice and nothing is lost.

Also here: the identities those fingerprints are made of (sha256 of bytes and of a module's weights, a
file's size + etag without reading it, the code version) and the unit seed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from pipeline import storage
from pipeline.config import ConfigError

PARTS_DIR = "_parts"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fingerprint(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; other types by their ``str``)."""
    return sha256(json.dumps(obj, sort_keys=True, default=str).encode())


def state_sha256(module: Any) -> str:
    """sha256 over a torch module's state dict (names and bytes, in name order): random weights' identity."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def unit_seed(seed: int, unit: int) -> int:
    """RNG seed of work unit ``unit``: a pure function of (seed, unit), in [0, 2**63)."""
    a, b = np.random.SeedSequence([seed, unit, 0x5A4D]).generate_state(2, np.uint32)
    return int((int(a) << 31) ^ int(b)) & (2**63 - 1)


def file_identity(url: Optional[str], storage_cfg: storage.StorageLike = None) -> Optional[dict]:
    """{uri (redacted), size, tag (etag / mtime)} of a file without reading it; None for no URL. Raises
    ``FileNotFoundError`` naming the URL."""
    if not url:
        return None
    fs, path = storage.filesystem(url, storage_cfg)
    storage.invalidate(fs, path)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{storage.redact(url)}: does not exist") from None
    tag = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return {"uri": storage.redact(url), "size": int(info.get("size") or 0), "tag": str(tag)}


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


class CommitLog:
    """The commit records under ``{root}/_parts``; records are keyed by ``record[key]`` (an int id)."""

    def __init__(self, fs: Any, root: str, key: str = "unit", name: Callable[[int], str] = "{:06d}".format):
        self.fs, self.root, self.key, self.name = fs, root.rstrip("/"), key, name
        self.dir = f"{self.root}/{PARTS_DIR}"

    def path(self, unit: int) -> str:
        return f"{self.dir}/{self.name(unit)}.json"

    def commit(self, unit: int, record: Mapping[str, Any]) -> None:
        """Write the record, after every file of the unit: the unit counts as done from here on."""
        storage.put_atomic(self.fs, self.path(unit), json.dumps(record).encode())

    def records(self) -> dict[int, dict]:
        """Every record, by unit id (one batched read)."""
        paths = storage.list_files(self.fs, self.dir, suffix=".json")
        blobs = storage.cat_many(self.fs, paths)
        return {int(rec[self.key]): rec for rec in (json.loads(blobs[p]) for p in paths)}

    def todo(self, planned: Mapping[int, Mapping[str, str]], overwrite: bool, where: str) -> tuple[list[int], int]:
        """(units to run, number skipped) for ``planned`` = {unit: {record field: fingerprint}}.

        ``where`` names the output setting in errors (e.g. ``"output.uri s3://b/x"``). Raises
        ``ConfigError`` when a unit was made from other inputs and ``overwrite`` is false, or when the
        output holds records beyond the plan.
        """
        storage.remove_stale_temps(self.fs, self.root)
        done = self.records()
        todo, skipped = [], 0
        for unit, fps in planned.items():
            rec = done.get(unit)
            if rec is not None and all(rec.get(k) == v for k, v in fps.items()):
                skipped += 1
            elif rec is None or overwrite:
                todo.append(unit)
            else:
                raise ConfigError(f"{where}: {self.name(unit)} was made from other inputs or settings; choose a "
                                  f"new output.uri or set output.overwrite=true")
        stale = sorted(set(done) - set(planned))
        if stale:
            raise ConfigError(f"{where}: holds records {[self.name(u) for u in stale[:5]]} beyond this plan's "
                              f"{len(planned)} units; choose a new output.uri")
        return todo, skipped

    def require(self, units: Sequence[int]) -> list[dict]:
        """The records of ``units`` in order; ``RuntimeError`` naming the missing ones."""
        done = self.records()
        missing = [self.name(u) for u in units if u not in done]
        if missing:
            raise RuntimeError(f"{missing[:5]} ({len(missing)} in all) were not committed; rerun the job to "
                               f"finish them")
        return [done[u] for u in units]
