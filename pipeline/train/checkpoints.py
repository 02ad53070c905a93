"""Training checkpoints on storage: written by every rank, committed by a manifest, verified on resume.

Layout: ``<output.uri>/<train.run_name>/step_000001000/`` holds the DeepSpeed files of every rank, ``ema.pt``,
``config.json`` (see :mod:`pipeline.train.engine`) and, written last by rank 0 once every rank's files are
uploaded, ``manifest.json``::

    {"format": 1, "name": "step_000001000", "step": 1000, "written": "...",
     "files": {"ema.pt": {"bytes": 123, "sha256": "..."}, "ckpt/mp_rank_00_model_states.pt": {...}, ...}}

A folder without a manifest is a write that did not finish (a killed job) and is ignored. On resume rank 0
takes the newest committed checkpoint (or ``output.resume_from=step_N``), downloads it and checks every file's
size and sha256; a damaged one is named and the next older one tried. The choice is broadcast so that every
rank restores the same checkpoint, and every rank verifies what it downloaded.

The torchrun launcher and Ray Train use this one store. Ray Train is told only metrics: its own checkpoint
bookkeeping (a snapshot in the run folder) would otherwise point at folders a user may delete or that may be
damaged, and a rerun would fail in Ray's checkpoint manager before our code could fall back.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Callable, Optional

from pipeline import storage
from pipeline.errors import CheckpointError

MANIFEST = "manifest.json"
SUPERSEDED = "manifest.superseded.json"  # a newer checkpoint set aside by an explicit output.resume_from
_NAME = re.compile(r"^step_\d{9}$")


def step_name(step: int) -> str:
    return f"step_{int(step):09d}"


def file_digests(local_dir: str) -> dict[str, dict[str, Any]]:
    """``{relative path: {"bytes", "sha256"}}`` of every file under ``local_dir`` (read in 8 MiB blocks)."""
    out: dict[str, dict[str, Any]] = {}
    for base, _, files in os.walk(local_dir):
        for f in files:
            full = os.path.join(base, f)
            h = hashlib.sha256()
            with open(full, "rb") as fh:
                while block := fh.read(8 * 2**20):
                    h.update(block)
            rel = os.path.relpath(full, local_dir).replace(os.sep, "/")
            out[rel] = {"bytes": os.path.getsize(full), "sha256": h.hexdigest()}
    return out


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class CheckpointStore:
    """The checkpoints of one run (``root`` = ``<output.uri>/<run_name>``)."""

    def __init__(self, root: str, storage_cfg: storage.StorageLike = None, keep_last: int = 0,
                 log: Callable[[str], None] = lambda m: print(m, flush=True)):
        self.root = root.rstrip("/")
        self.fs, self.path = storage.filesystem(self.root, storage_cfg)
        self.path = self.path.rstrip("/")
        self.keep_last = keep_last
        self.log = log

    def url(self, name: str) -> str:
        return storage.redact(storage.join(self.root, name))

    def names(self) -> list[str]:
        """Every ``step_*`` folder, oldest first (committed or not)."""
        storage.invalidate(self.fs, self.path)
        try:
            entries = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in entries) if _NAME.match(n))

    def manifest(self, name: str) -> Optional[dict]:
        """The folder's manifest; None if it has none (an unfinished write). Raises ``CheckpointError`` if
        it is unreadable."""
        p = f"{self.path}/{name}/{MANIFEST}"
        try:
            raw = self.fs.cat_file(p)
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw)
            assert isinstance(doc.get("files"), dict)
            return doc
        except (ValueError, AssertionError):
            raise CheckpointError(f"checkpoint {self.url(name)}: {MANIFEST} is damaged") from None

    def committed(self) -> list[str]:
        """The folders with a manifest, oldest first."""
        return [n for n in self.names() if storage.exists(self.fs, f"{self.path}/{n}/{MANIFEST}")]

    def latest(self) -> Optional[str]:
        """The URL of the newest committed checkpoint, or None."""
        names = self.committed()
        return storage.join(self.root, names[-1]) if names else None

    # -- write -------------------------------------------------------------------------------------

    def save(self, local_dir: str, name: str, rank: int, step: int) -> None:
        """Every rank calls this with its own local checkpoint files. Each file is uploaded once (by the
        lowest rank that has it), then rank 0 commits the manifest and removes old checkpoints."""
        dist = _dist()
        mine = file_digests(local_dir)
        every = [mine]
        if dist is not None:
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, mine)
        owner: dict[str, int] = {}
        for r, files in enumerate(every):
            for rel in files:
                owner.setdefault(rel, r)
        if rank == 0 and self.fs.exists(f"{self.path}/{name}"):
            # an earlier, unfinished or damaged write of this step: nothing of it may stay beside the new files
            self.fs.rm(f"{self.path}/{name}", recursive=True)
        if dist is not None:
            dist.barrier()
        upload = sorted(rel for rel, r in owner.items() if r == rank)
        if upload:
            remote = [f"{self.path}/{name}/{rel}" for rel in upload]
            if storage.is_local(self.fs):
                for p in remote:
                    os.makedirs(os.path.dirname(p), exist_ok=True)
            self.fs.put([os.path.join(local_dir, rel) for rel in upload], remote)
        if dist is not None:
            dist.barrier()
        if rank == 0:
            from pipeline.shards import utc_now

            files = {rel: every[r][rel] for rel, r in sorted(owner.items())}
            doc = {"format": 1, "name": name, "step": int(step), "written": utc_now(), "files": files}
            storage.put_atomic(self.fs, f"{self.path}/{name}/{MANIFEST}", json.dumps(doc, indent=1).encode())
            self._prune(name)

    def _prune(self, current: str) -> None:
        """Keep ``keep_last`` checkpoints up to ``current`` (0: all); newer folders are left alone."""
        if self.keep_last <= 0:
            return
        older = [n for n in self.names() if n < current]
        for n in older[:max(0, len(older) - (self.keep_last - 1))]:
            self.fs.rm(f"{self.path}/{n}", recursive=True)
        storage.invalidate(self.fs, self.path)

    # -- read --------------------------------------------------------------------------------------

    def fetch(self, name: str, local_dir: str) -> Optional[str]:
        """Download checkpoint ``name`` into ``local_dir`` and check it against its manifest; None if it is
        intact, else what is wrong (one phrase)."""
        doc = self.manifest(name)
        if doc is None:
            return f"incomplete (no {MANIFEST}: its write did not finish)"
        files = doc["files"]
        rels = sorted(files)
        local = [os.path.join(local_dir, *rel.split("/")) for rel in rels]
        for p in local:
            os.makedirs(os.path.dirname(p), exist_ok=True)
        missing = [rel for rel in rels if not self.fs.exists(f"{self.path}/{name}/{rel}")]
        if missing:
            return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        self.fs.get([f"{self.path}/{name}/{rel}" for rel in rels], local)
        have = file_digests(local_dir)
        for rel in rels:
            got, want = have.get(rel), files[rel]
            if got is None:
                return f"{rel} is missing"
            if got["bytes"] != want["bytes"]:
                return f"{rel} has {got['bytes']} bytes, the manifest says {want['bytes']} (truncated or replaced)"
            if got["sha256"] != want["sha256"]:
                return f"{rel}: sha256 differs from the manifest (damaged)"
        return None

    def pick(self, resume_from: str) -> tuple[Optional[str], Optional[str]]:
        """Rank 0: ``(name, local dir)`` of the checkpoint to resume from, downloaded and verified; (None,
        None) to start fresh. ``resume_from``: ``latest`` (the newest intact one), ``none`` or a name."""
        if resume_from == "none":
            return None, None
        names = self.names()
        if resume_from != "latest":
            if resume_from not in names:
                raise CheckpointError(f"output.resume_from: {self.url(resume_from)} does not exist; the run has "
                                      f"{', '.join(names) or 'no checkpoint'}")
            names = [resume_from]
        damaged = []
        for name in reversed(names):
            local = tempfile.mkdtemp(prefix=f"enat-restore-{name}-")
            try:
                problem = self.fetch(name, local)
            except CheckpointError as e:
                problem = str(e).split(": ", 1)[-1]
            if problem is None:
                if damaged:
                    self.log(f"[train] resuming from {name} instead")
                if resume_from != "latest":
                    self._set_aside_newer(name)
                return name, local
            shutil.rmtree(local, ignore_errors=True)
            if problem.startswith("incomplete") and resume_from == "latest":
                self.log(f"[train] checkpoint {self.url(name)}: {problem}; skipped")
                continue
            damaged.append(f"{name}: {problem}")
            self.log(f"[train] checkpoint {self.url(name)}: {problem}")
        if damaged:
            raise CheckpointError(f"output.resume_from: no intact checkpoint in {storage.redact(self.root)} "
                                  f"({'; '.join(damaged)}); set output.resume_from=none to start this run over")
        return None, None

    def _set_aside_newer(self, name: str) -> None:
        """Resuming from an older checkpoint on purpose: the newer ones belong to another history, so their
        manifests are renamed (their files stay) and a later ``latest`` cannot pick them."""
        for n in [n for n in self.names() if n > name]:
            src, dst = f"{self.path}/{n}/{MANIFEST}", f"{self.path}/{n}/{SUPERSEDED}"
            if self.fs.exists(src):
                storage.put_atomic(self.fs, dst, self.fs.cat_file(src))
                self.fs.rm(src)
                self.log(f"[train] checkpoint {self.url(n)} set aside (newer than output.resume_from={name}; "
                         f"its {MANIFEST} is now {SUPERSEDED})")
        storage.invalidate(self.fs, self.path)

    def restore(self, rank: int, resume_from: str = "latest") -> Optional[str]:
        """Every rank: a local folder holding the checkpoint to resume from (rank 0 chooses, every rank
        verifies its own download), or None to start fresh. Raises ``CheckpointError`` on every rank alike."""
        dist = _dist()
        choice: list[Any] = [None]
        local = None
        if rank == 0:
            try:
                name, local = self.pick(resume_from)
                choice = [{"name": name}]
            except CheckpointError as e:
                choice = [{"error": str(e)}]
        if dist is not None:
            dist.broadcast_object_list(choice, src=0)
        if "error" in choice[0]:
            raise CheckpointError(choice[0]["error"])
        name = choice[0]["name"]
        if name is None or rank == 0:
            return local
        local = tempfile.mkdtemp(prefix=f"enat-restore-{name}-")
        problem = self.fetch(name, local)
        if problem is not None:
            raise CheckpointError(f"checkpoint {self.url(name)}: {problem} (as read by rank {rank})")
        return local
