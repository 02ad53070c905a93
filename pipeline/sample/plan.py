"""The sample job's plan, decided on the driver before any sample is drawn.

Sample i → its label (class models) or caption (text models) and its unit i // unit_size; unit u → its
seed ``unit_seed(plan.seed, u)``. All of it is a pure function of the config, so sample i gets the same
label, seed and image whatever the number of workers, and a killed job rerun produces the same bytes
(ecosystem.md §2.2). The plan's fingerprint covers everything that decides a unit's bytes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

import enat
from pipeline import storage
from pipeline.commits import file_identity, fingerprint, unit_seed
from pipeline.config import ConfigError
from pipeline.models import model_config
from pipeline.sample.config import FORMAT_VERSION, TORCH_SPELLING, SampleJobConfig, SampleModelSection


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """int64 [N]: ``np.arange(C).repeat(N // C)`` (as official: train.py eval_step). Raises
    ``ConfigError`` if N is not a multiple of C."""
    if num_samples % num_classes:
        raise ConfigError(f"plan.num_samples: {num_samples} is not a multiple of the model's {num_classes} "
                          f"classes, so the labels cannot be class-balanced; choose a multiple "
                          f"(e.g. {max(1, num_samples // num_classes) * num_classes}) or plan.labels=uniform")
    return np.arange(num_classes, dtype=np.int64).repeat(num_samples // num_classes)


def uniform_labels(num_samples: int, num_classes: int, seed: int) -> np.ndarray:
    """int64 [N] i.i.d. uniform labels from the seed (DiT's `torch.randint` protocol, our own stream)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1ABE1]))
    return rng.integers(0, num_classes, num_samples, dtype=np.int64)


def read_prompts(data: bytes, name: str) -> list[list[str]]:
    """Prompt file bytes → one list of captions per "image", in a stable order.

    COCO captions JSON: images by ascending id, each with its captions in annotation order (images
    without a caption are dropped). A JSON list of strings or a text file: one single-caption entry per
    non-empty item / line. Raises ``ValueError`` naming the file.
    """
    if name.lower().endswith(".json"):
        try:
            doc = json.loads(data)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not JSON ({e})") from None
        if isinstance(doc, list):
            return [[str(s)] for s in doc if str(s).strip()]
        if isinstance(doc, dict) and "annotations" in doc:
            caps: dict[int, list[str]] = {}
            for a in doc["annotations"]:
                caps.setdefault(int(a["image_id"]), []).append(str(a["caption"]))
            ids = sorted(int(im["id"]) for im in doc.get("images", [])) or sorted(caps)
            return [caps[i] for i in ids if caps.get(i)]
        raise ValueError(f"{name}: expected a COCO captions file or a JSON list of strings")
    text = data.decode("utf-8")
    return [[line.strip()] for line in text.splitlines() if line.strip()]


def caption_plan(prompts: Sequence[Sequence[str]], num_samples: int, seed: int) -> list[str]:
    """One caption per sample: the images in a seeded random order (a new permutation each pass if N
    exceeds the image count), one seeded random caption of each (U-ViT's shuffled val loader)."""
    if not prompts:
        raise ConfigError("plan.captions: the prompt file holds no caption")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xC0C0]))
    order: list[int] = []
    while len(order) < num_samples:
        order.extend(rng.permutation(len(prompts)).tolist())
    out = []
    for img in order[:num_samples]:
        caps = prompts[img]
        out.append(caps[int(rng.integers(0, len(caps)))])
    return out


def grid_indices(num_samples: int, count: int) -> list[int]:
    """``count`` sample indices spread evenly over [0, N) (different classes under a balanced plan)."""
    return sorted({k * num_samples // count for k in range(min(count, num_samples))})


@dataclass(frozen=True)
class Unit:
    """One work unit: samples [start, start + count) with their conditions and the unit's seed."""

    unit: int
    start: int
    count: int
    seed: int
    labels: tuple[int, ...] = ()  # class models
    captions: tuple[str, ...] = ()  # text models
    grid: tuple[int, ...] = ()  # global indices of grid samples in this unit

    def fingerprint(self, plan_fingerprint: str) -> str:
        h = hashlib.sha256(plan_fingerprint.encode())
        h.update(json.dumps([self.unit, self.start, self.count, self.seed, list(self.labels),
                             list(self.captions)]).encode())
        return h.hexdigest()

    def row(self, plan_fingerprint: str) -> dict[str, Any]:
        """The Ray Data row (JSON strings keep Arrow from guessing types)."""
        return {"unit": self.unit, "start": self.start, "count": self.count, "seed": self.seed,
                "fingerprint": self.fingerprint(plan_fingerprint), "labels": json.dumps(list(self.labels)),
                "captions": json.dumps(list(self.captions)), "grid": json.dumps(list(self.grid))}

    @staticmethod
    def from_row(row: dict[str, Any]) -> "Unit":
        return Unit(int(row["unit"]), int(row["start"]), int(row["count"]), int(row["seed"]),
                    tuple(json.loads(row["labels"])), tuple(json.loads(row["captions"])),
                    tuple(json.loads(row["grid"])))


def make_units(num_samples: int, unit_size: int, seed: int, labels: Optional[np.ndarray] = None,
               captions: Optional[Sequence[str]] = None, grid: Sequence[int] = ()) -> list[Unit]:
    """Cut samples [0, N) into units of ``unit_size`` (the last may be short): unit u holds
    [u·U, min((u+1)·U, N)) and seed ``unit_seed(seed, u)`` — independent of how many workers run them."""
    gset = sorted(grid)
    units = []
    for u, s in enumerate(range(0, num_samples, unit_size)):
        e = min(s + unit_size, num_samples)
        units.append(Unit(u, s, e - s, unit_seed(seed, u),
                          tuple(int(x) for x in labels[s:e]) if labels is not None else (),
                          tuple(captions[s:e]) if captions is not None else (),
                          tuple(i for i in gset if s <= i < e)))
    return units


def checkpoint_config(section: SampleModelSection,
                      storage_cfg: storage.StorageLike = None) -> tuple[enat.ENATConfig, dict]:
    """The architecture (``model.preset`` + overrides, else ``config.json`` beside the checkpoint +
    overrides) and what that config.json says besides (e.g. the training ``step``; {} without one).
    Raises ``ConfigError``."""
    if section.preset:
        return model_config(section), {}
    ckpt = section.checkpoint
    url = storage.join(ckpt.rsplit("/", 1)[0], "config.json") if "/" in ckpt else "config.json"
    fs, path = storage.filesystem(url, storage_cfg)
    if not storage.exists(fs, path):
        raise ConfigError(f"model.preset: not set and {storage.redact(url)} does not exist; name the "
                          f"architecture (e.g. model.preset=enat-l for the official ENAT-L release)")
    doc = json.loads(fs.cat_file(path))
    if "model" not in doc:
        raise ConfigError(f"model.preset: {storage.redact(url)} has no 'model' section; set model.preset")
    try:
        base = enat.ENATConfig(**doc["model"])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {storage.redact(url)}: {e}") from None
    return model_config(section, base=base), {k: v for k, v in doc.items() if k != "model"}


@dataclass
class SamplePlan:
    """Everything the driver decided before any sample is drawn."""

    units: list[Unit]
    fingerprint: str
    num_samples: int
    model_config: enat.ENATConfig
    sampler: enat.SamplerConfig
    extra: dict  # config.json beside the checkpoint (training step …)
    identity: dict  # what the fingerprint covers (recorded in plan.json)


def build_plan(cfg: SampleJobConfig) -> SamplePlan:
    """Labels / captions, units and the plan fingerprint (no weights are read). Raises ``ConfigError``
    / ``FileNotFoundError`` for inconsistent settings or missing inputs, before any work starts."""
    mcfg, extra = checkpoint_config(cfg.model, cfg.storage)
    p = cfg.plan
    n = p.num_samples
    labels = captions = None
    if mcfg.text_conditioned:
        if not p.captions:
            raise ConfigError("plan.captions: required for a text-conditioned model (COCO captions JSON, a JSON "
                              "list or a .txt of prompts)")
        captions = caption_plan(read_prompts(storage.read_url(p.captions, cfg.storage, "plan.captions"), p.captions), n, p.seed)
    elif p.labels == "balanced":
        labels = balanced_labels(n, mcfg.num_classes)
    else:
        labels = uniform_labels(n, mcfg.num_classes, p.seed)
    grid = grid_indices(n, cfg.output.grid) if cfg.output.grid else []
    tok = cfg.tokenizer
    # the identity keeps the names and torch spellings it had before the keys were renamed (issue 12), so
    # outputs written then still resume
    identity = {
        "format_version": FORMAT_VERSION, "num_samples": n, "labels": None if captions else p.labels,
        "captions": fingerprint(captions) if captions else None, "seed": p.seed, "unit_size": p.unit_size,
        "batch_size": p.batch_size, "grid": grid,
        "model": {"config": mcfg.to_dict(), "checkpoint": file_identity(cfg.model.checkpoint, cfg.storage)},
        "sampler": enat.SamplerConfig.to_dict(cfg.sampler.resolve()),
        "tokenizer": {"kind": tok.kind, "preset": tok.preset, "seed": tok.seed,
                      "weights": file_identity(tok.weights, cfg.storage)},
        "text": dataclasses.asdict(cfg.text) | {"weights": file_identity(cfg.text.weights, cfg.storage)}
        if mcfg.text_conditioned else None,
        "inception": {"weights": file_identity(cfg.inception.weights, cfg.storage), "uint8": cfg.inception.uint8,
                      "dtype": TORCH_SPELLING[cfg.inception.precision]},
        "is_splits": cfg.fid.is_splits, "is_protocol": cfg.fid.is_protocol,
        "decode_dtype": TORCH_SPELLING[cfg.tokenizer.precision],
        "output": {"png": cfg.output.png, "npz": cfg.output.npz, "features": cfg.output.features,
                   "png_compress_level": cfg.output.png_compress_level},
    }
    units = make_units(n, p.unit_size, p.seed, labels, captions, grid)
    return SamplePlan(units, fingerprint(identity), n, mcfg, cfg.sampler.resolve(), extra, identity)
