"""What runs a sample unit on a worker: :class:`UnitRunner` (generate → decode → Inception → write →
commit on one device) and :class:`SampleActor`, the Ray Data actor that loads the models once from the
job config and hands each row to its runner."""
from __future__ import annotations

import collections
import concurrent.futures as cf
import io
import threading
import time
from typing import Any, Optional

import numpy as np
import torch

import enat
from pipeline import storage
from pipeline.cluster import pick_device
from pipeline.commits import CommitLog, sha256
from pipeline.config import ConfigError
from pipeline.models import build_inception, build_tokenizer, decode_images, device_dtype
from pipeline.sample.config import OutputSection, SampleJobConfig
from pipeline.sample.formats import npz_bytes, png_bytes, sample_key, stats_npz_bytes, tar_bytes, to_uint8
from pipeline.sample.plan import Unit, checkpoint_config
from pipeline.sections import Precision


class UnitRunner:
    """Runs work units on one device: generate → decode → Inception → write → commit.

    Holds the loaded models; the Ray actor (:class:`SampleActor`) builds one from the job config, the
    throughput benchmark builds one from in-memory random models. ``inception=None`` skips the
    statistics (FID unavailable). ``decode_precision`` is the tokenizer decoder's autocast
    (``tokenizer.precision``).
    """

    def __init__(self, model: enat.ENAT, tokenizer: Any, inception: Optional[enat.FIDInception],
                 sampler: enat.SamplerConfig, out_url: str, *, storage_cfg: storage.StorageLike = None,
                 batch_size: int = 125, is_total: int = 0, is_splits: int = 10,
                 is_shuffle_seed: Optional[int] = enat.IS_SHUFFLE_SEED, text_encoder: Any = None,
                 output: OutputSection = OutputSection(), decode_precision: Precision = "fp32",
                 png_threads: int = 4, identity: Optional[dict] = None, throttle_s: float = 0.0) -> None:
        self.model, self.tok, self.inception, self.sampler = model, tokenizer, inception, sampler
        self.device = model.mlm_layer.bias.device
        self.text_encoder = text_encoder
        self.batch_size, self.is_total, self.is_splits = batch_size, is_total, is_splits
        self.is_shuffle_seed = is_shuffle_seed
        self.output = output
        self.decode_dtype = device_dtype(decode_precision, self.device, "tokenizer.precision")
        self.identity = identity or {}
        self.throttle_s = throttle_s
        self.pool = cf.ThreadPoolExecutor(png_threads, thread_name_prefix="png")
        self.fs, out = storage.filesystem(out_url, storage_cfg)
        self.out = out.rstrip("/")
        self.commits = CommitLog(self.fs, self.out)
        self.grid = model.config.grid
        # one unit at a time on the device; a second unit in flight (Ray actor concurrency) writes its files
        self._device = threading.Lock()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generator(self, unit: Unit) -> torch.Generator:
        """The unit's random stream: seeded by the plan, on the device the sampler draws on (the
        model's), so a CUDA runner never pairs a CPU generator with CUDA tensors."""
        return torch.Generator(self.device).manual_seed(unit.seed)

    def _cond(self, unit: Unit, s: int, e: int) -> torch.Tensor:
        if unit.captions:
            feats = self.text_encoder.encode(list(unit.captions[s:e]))  # (b, T, D) float16
            return torch.from_numpy(feats).float().to(self.device)
        return torch.tensor(unit.labels[s:e], dtype=torch.long, device=self.device)

    @torch.no_grad()
    def run(self, unit: Unit, fingerprint: str) -> dict[str, Any]:
        """Produce and commit one unit; returns its commit record. Thread-safe: concurrent calls take
        turns on the device and overlap only their writes."""
        secs: collections.Counter = collections.Counter()
        arrays: list[np.ndarray] = []
        features: list[np.ndarray] = []
        pngs: list[cf.Future] = []
        with self._device:
            feats, is_stats = self._compute(unit, secs, arrays, features, pngs)
        t_w = time.perf_counter()
        record = self._write(unit, fingerprint, np.concatenate(arrays), [f.result() for f in pngs],
                             feats, is_stats, features)
        secs["write"] += time.perf_counter() - t_w
        record["seconds"] = {k: round(secs[k], 4) for k in ("generate", "decode", "inception", "write")}
        self.commits.commit(unit.unit, record)  # last: its presence means every file of the unit is complete
        if self.throttle_s:
            time.sleep(self.throttle_s)
        return record

    def _compute(self, unit: Unit, secs: collections.Counter, arrays: list, features: list,
                 pngs: list) -> tuple[Optional[enat.FeatureStats], Optional[enat.ISStats]]:
        gen = self.generator(unit)
        feats = enat.FeatureStats.empty(2048, self.device) if self.inception is not None else None
        is_stats = (enat.ISStats.empty(self.is_total, self.is_splits, device=self.device,
                                       shuffle_seed=self.is_shuffle_seed)
                    if self.inception is not None and self.is_total else None)
        for s in range(0, unit.count, self.batch_size):
            e = min(s + self.batch_size, unit.count)
            t0 = time.perf_counter()
            cond = self._cond(unit, s, e)
            tokens = enat.generate(self.model, cond, self.sampler, generator=gen)  # (b, L)
            self._sync()
            t1 = time.perf_counter()
            images = decode_images(self.tok, tokens.view(-1, self.grid, self.grid), self.decode_dtype)  # (b, 3, H, W)
            self._sync()
            t2 = time.perf_counter()
            if self.inception is not None:
                pool3, logits = self.inception(images)  # (b, 2048), (b, 1008)
                feats.update(pool3)
                if is_stats is not None:
                    is_stats.update(logits, unit.start + s)
                if self.output.features:
                    features.append(pool3.cpu().numpy())
                self._sync()
            t3 = time.perf_counter()
            u8 = to_uint8(images)  # (b, H, W, 3)
            arrays.append(u8)
            if self.output.png:  # encoded by the pool while the next batch generates
                pngs.extend(self.pool.submit(png_bytes, a, self.output.png_compress_level) for a in u8)
            secs.update(generate=t1 - t0, decode=t2 - t1, inception=t3 - t2, write=time.perf_counter() - t3)
        return feats, is_stats

    def _put(self, rel: str, data: bytes, files: dict) -> None:
        storage.put_atomic(self.fs, f"{self.out}/{rel}", data)
        files[rel] = {"bytes": len(data), "sha256": sha256(data)}

    def _write(self, unit: Unit, fingerprint: str, u8: np.ndarray, pngs: list[bytes],
               feats: Optional[enat.FeatureStats], is_stats: Optional[enat.ISStats],
               features: list[np.ndarray]) -> dict:
        name = f"{unit.unit:06d}"
        files: dict[str, dict] = {}
        index = np.arange(unit.start, unit.start + unit.count, dtype=np.int64)
        labels = np.asarray(unit.labels, dtype=np.int64) if unit.labels else np.full(unit.count, -1, np.int64)
        if self.output.png:
            entries = []
            for i, png in zip(index.tolist(), pngs):
                e = {"__key__": sample_key(i), "png": png}
                if unit.captions:
                    e["txt"] = unit.captions[i - unit.start].encode("utf-8")
                else:
                    e["cls"] = str(int(labels[i - unit.start])).encode()
                entries.append(e)
            self._put(f"images/{name}.tar", tar_bytes(entries), files)
        if self.output.npz:
            self._put(f"npz/{name}.npz", npz_bytes(arr_0=u8, arr_1=labels), files)
        if feats is not None:
            self._put(f"stats/{name}.npz", stats_npz_bytes(feats, is_stats), files)
            if self.output.features:
                buf = io.BytesIO()
                np.save(buf, np.concatenate(features).astype(np.float32))
                self._put(f"features/{name}.npy", buf.getvalue(), files)
        for i in unit.grid:
            self._put(f"grid/{sample_key(i)}.png", png_bytes(u8[i - unit.start], 6), files)
        counts = collections.Counter(int(x) for x in unit.labels)
        return {"unit": unit.unit, "start": unit.start, "count": unit.count, "samples": int(u8.shape[0]),
                "seed": unit.seed, "fingerprint": fingerprint, "device": str(self.device),
                "resolution": [int(u8.shape[1]), int(u8.shape[2])],
                "label_counts": {str(k): v for k, v in sorted(counts.items())},
                "stats": feats is not None, "files": files, "identity": self.identity}


def load_model(cfg: SampleJobConfig, mcfg: enat.ENATConfig) -> tuple[enat.ENAT, str]:
    """(ENAT in eval mode from ``model.checkpoint``, sha256 of the checkpoint bytes)."""
    data = storage.read_url(cfg.model.checkpoint, cfg.storage, "model.checkpoint")
    try:
        model = enat.ENAT.from_official(io.BytesIO(data), mcfg)
    except ValueError as e:
        raise ValueError(f"model.checkpoint {storage.redact(cfg.model.checkpoint)}: {e}") from None
    return model.eval(), sha256(data)


class SampleActor:
    """Ray Data actor: loads the models once from the job config, then runs one unit per row."""

    def __init__(self, cfg: SampleJobConfig) -> None:
        self.cfg = cfg
        device = pick_device(cfg.compute)
        mcfg, _ = checkpoint_config(cfg.model, cfg.storage)
        model, ckpt_sha = load_model(cfg, mcfg)
        tok, tok_id = build_tokenizer(cfg.tokenizer, cfg.storage)
        if int(tok.codebook_size) != mcfg.codebook_size:
            raise ConfigError(f"tokenizer: codebook_size {tok.codebook_size} does not match the model's "
                              f"{mcfg.codebook_size} (model.checkpoint {storage.redact(cfg.model.checkpoint)})")
        inception, inc_sha = build_inception(cfg.inception, cfg.storage, device)
        text = None
        if mcfg.text_conditioned:
            from pipeline.text import build_text_encoder

            text = build_text_encoder(cfg.text, device=str(device), storage_cfg=cfg.storage)
            if text.dim != mcfg.text_dim or text.length != mcfg.text_len:
                raise ConfigError(f"text: the encoder gives ({text.length}, {text.dim}) features, the model "
                                  f"expects ({mcfg.text_len}, {mcfg.text_dim})")
        identity = {"checkpoint_sha256": ckpt_sha, "tokenizer_sha256": tok_id["weights_sha256"],
                    "inception_sha256": inc_sha, "text_sha256": text.identity()["weights_sha256"] if text else None}
        self.runner = UnitRunner(model.to(device), tok.to(device), inception, cfg.sampler.resolve(),
                                 cfg.output.uri, storage_cfg=cfg.storage, batch_size=cfg.plan.batch_size,
                                 is_total=cfg.plan.num_samples, is_splits=cfg.fid.is_splits,
                                 is_shuffle_seed=cfg.fid.is_shuffle_seed, text_encoder=text, output=cfg.output,
                                 decode_precision=cfg.tokenizer.precision, png_threads=cfg.compute.png_threads,
                                 identity=identity, throttle_s=cfg.compute.throttle_s)

    def __call__(self, row: dict) -> dict:
        rec = self.runner.run(Unit.from_row(row), row["fingerprint"])
        return {"unit": rec["unit"], "samples": rec["samples"], **{f"{k}_s": v for k, v in rec["seconds"].items()}}
