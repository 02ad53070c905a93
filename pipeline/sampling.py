"""Large-scale sampling and distributed FID / IS on Ray Data, and reference statistics from real images.

The sample job (``python -m jobs.sample``)::

    driver   plan: sample i → (label or caption, unit i // unit_size); unit u → seed f(seed, u)
             skip units whose commit record exists with the same fingerprint
    actors   (one per GPU; CPU actors here) load ENAT + tokenizer decoder + FID Inception once, then per
             unit: generate → decode → Inception pool3 / logits on the same device → PNGs in a
             webdataset tar and/or an ADM-style npz (arr_0 uint8 NHWC, arr_1 labels) + the unit's
             statistics (FeatureStats n / Σx / Σxxᵀ in float64, ISStats per split) → commit record
    driver   exact merge of the unit statistics in unit order → mu / sigma → FID vs the reference
             `.npz` (mu, sigma), Inception Score → results.json, fid_stats.npz, manifest.json, MLflow

A unit's label/caption list, its RNG seed and its batch split are pure functions of the plan, so sample i
gets the same label, seed and image whatever the number of workers, and a killed job rerun produces the
same bytes (ecosystem.md §2.2). Every object is written with one atomic put; a unit counts as done only
once its record ``_parts/{unit:06d}.json`` (written last) exists; the merge reads exactly one statistics
file per unit of the plan, so nothing is counted twice. Output layout at ``output.uri``::

    plan.json                 fingerprint, resolved config, MLflow run id (written first)
    images/000000.tar …       webdataset: {index:07d}.png + .cls (label) or .txt (caption)
    npz/000000.npz …          arr_0 uint8 (n, H, W, 3), arr_1 int64 labels (ADM's sample format)
    stats/000000.npz …        n, sum, outer (FeatureStats) + is_* (ISStats) of the unit
    features/000000.npy …     float32 (n, 2048) pool3 (output.features=true)
    grid/{index:07d}.png      the few samples of the MLflow grid
    _parts/000000.json …      commit records (files, sha256, label counts, timings, identities)
    fid_stats.npz             mu, sigma of all samples (pytorch-fid's format)
    samples_NxHxWx3.npz       all samples in one ADM npz (output.adm_npz=true)
    grid.png, results.json
    manifest.json             written last: units, files, results — readers trust it

The fid-stats job (``python -m jobs.fid_stats``) runs the same unit / commit / merge machinery over real
images (a folder, recursively, webdataset tars, or the ``arr_0`` images of an ADM reference batch npz) and
writes ``fid_stats.npz`` with ``mu`` / ``sigma`` (pytorch-fid statistics; docs/evaluation.md says which
reference goes with which protocol).
"""
from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import sys
import threading
import time
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Optional, Sequence

import numpy as np
import torch

import enat
from enat.fid import (IS_SHUFFLE_SEED, FeatureStats, FIDInception, ISStats, frechet_distance, is_protocol,
                      load_reference_stats)
from pipeline import storage
from pipeline.config import (ConfigError, RayConfig, StorageConfig, TextConfig, TokenizerConfig, config_to_dict,
                             load_config, location)
from pipeline.shards import read_npy_header

FORMAT_VERSION = 1
PARTS_DIR = "_parts"
Dtype = Literal["float32", "bfloat16", "float16"]
_TORCH_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "bmp")


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSection:
    """The ENAT checkpoint and its architecture."""

    # URL/path of the weights: an official release (e.g. ENAT-L `nnet_ema.pth`) or the EMA state dict
    # our training exports (`step_*/ema.pt`); both load through `ENAT.from_official`.
    checkpoint: str = location("")
    # ENAT preset (enat-facts §3); null: read `config.json` beside the checkpoint (our training export).
    preset: Optional[str] = None
    # architecture overrides on top of the preset (tiny test models)
    encoder_depth: Optional[int] = None  # blocks on the visible tokens
    decoder_depth: Optional[int] = None  # blocks on the [MASK] tokens
    dim: Optional[int] = None  # width
    num_heads: Optional[int] = None
    num_classes: Optional[int] = None  # 1000 for ImageNet; label num_classes is the null class
    codebook_size: Optional[int] = None  # must equal the tokenizer's (1024 for MAGE's VQGAN)
    seq_len: Optional[int] = None  # tokens per image (256 at 256 px, 1024 at 512 px)
    text_dim: Optional[int] = None  # text models: caption feature width (768 for CLIP ViT-L/14)
    text_len: Optional[int] = None  # text models: caption tokens (77)

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in enat.ENATConfig.presets():
            raise ValueError(f"preset: unknown ENAT preset {self.preset!r}; known: "
                             f"{', '.join(enat.ENATConfig.presets())}")


@dataclass(frozen=True)
class SamplerSection:
    """Sampler settings: a preset (enat-facts §6) with optional overrides."""

    preset: Literal["imagenet-256", "imagenet-512"] = "imagenet-256"
    steps: Optional[int] = None  # null: the preset's (8)
    cfg_scale: Optional[float] = None  # null: the preset's (2.5 at 256, 3.5 at 512)
    mask_temp: Optional[float] = None  # null: the preset's (1.5)
    sample_temp: Optional[float] = None  # null: the preset's (6 at 256, 4 at 512)
    reuse: bool = True  # SC-attention feature reuse across steps (ENAT; false: the ablation)
    dtype: Dtype = "float32"  # autocast for the network ("bfloat16" on GPUs; the official eval is fp16)
    compile: bool = False  # torch.compile the block stack (GPU)

    def resolve(self) -> enat.SamplerConfig:
        """The `enat.SamplerConfig` these settings describe."""
        base = enat.SamplerConfig.preset(self.preset)
        over = {k: getattr(self, k) for k in ("steps", "cfg_scale", "mask_temp", "sample_temp")
                if getattr(self, k) is not None}
        return dataclasses.replace(base, reuse=self.reuse, dtype=self.dtype, compile=self.compile, **over)

    def __post_init__(self) -> None:
        self.resolve()  # SamplerConfig's own checks, named by field


@dataclass(frozen=True)
class PlanSection:
    """What to sample. Defaults: the paper's FID-50K (enat-facts §9): 50 per class, in class order."""

    num_samples: int = 50_000  # FID-50K (ImageNet); 30,000 for COCO (coco-256 preset)
    # balanced: label(i) = i // (num_samples / num_classes), as official `np.arange(1000).repeat(50)`;
    # uniform: i.i.d. uniform labels drawn from the seed (DiT's protocol).
    labels: Literal["balanced", "uniform"] = "balanced"
    # text models: URL of the prompts — a COCO captions JSON (annotations/captions_val2014.json: a
    # shuffled image order from the seed, one random caption of each image, as U-ViT's FID-30K), a JSON
    # list of strings, or a .txt file with one prompt per line.
    captions: Optional[str] = location(None)
    seed: int = 1234  # enat-facts §5: the official code's seed
    unit_size: int = 1000  # samples per work unit (one tar / npz / statistics file each)
    batch_size: int = 125  # samples per forward (official eval batch per GPU at 256 px, enat-facts §6)

    def __post_init__(self) -> None:
        if self.num_samples < 2:
            raise ValueError(f"num_samples: need at least 2 samples, got {self.num_samples}")
        if self.unit_size < 1 or self.batch_size < 1:
            raise ValueError("unit_size and batch_size must be >= 1")


@dataclass(frozen=True)
class InceptionSection:
    """The FID Inception (pytorch-fid's network, enat.FIDInception)."""

    # pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (URL or path). null: no Inception, and FID /
    # IS are reported as unavailable; samples, grid and everything else are still produced.
    weights: Optional[str] = location(None)
    uint8: bool = False  # quantize to the uint8 grid first (ADM / PNG protocol); official ENAT: false
    dtype: Dtype = "float32"  # autocast for the convolutions (float32 = pytorch-fid's numbers)


@dataclass(frozen=True)
class RealImagesConfig:
    """Real images for reference statistics."""

    # folder: every image file below root, recursively; webdataset: .tar shards; adm_npz: the images
    # (`arr_0`, uint8 NHWC) of an ADM reference batch such as VIRTUAL_imagenet256_labeled.npz, so that
    # pytorch-fid statistics of the same reference images can be computed (docs/evaluation.md)
    kind: Literal["folder", "webdataset", "adm_npz"] = "folder"
    # folder URL; webdataset: a folder of .tar shards or a single .tar URL; adm_npz: the .npz URL
    root: str = location("")
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS  # file extensions that count as images (case-insensitive)
    # ADM / official center crop to this size (enat.vqgan.center_crop_arr); adm_npz: the images' size,
    # checked (they are used as stored, no crop or resize)
    resolution: int = 256
    # folder / webdataset: "adm" (ImageNet, as official) or "uvit" (U-ViT's crop + Lanczos resize, the
    # preprocessing behind fid_stats_mscoco256_val.npz: use it for COCO references; pipeline/images.py)
    crop: Literal["adm", "uvit"] = "adm"
    limit: Optional[int] = None  # only the first N files in listing order (folder) / images (adm_npz)
    unit_size: int = 1000  # folder / adm_npz: images per work unit (webdataset: one unit per tar)
    batch_size: int = 100  # images per Inception forward

    def __post_init__(self) -> None:
        if self.resolution < 8 or self.unit_size < 1 or self.batch_size < 1:
            raise ValueError("resolution >= 8, unit_size >= 1 and batch_size >= 1 required")


@dataclass(frozen=True)
class FIDSection:
    # reference statistics: an .npz with `mu` [2048] and `sigma` [2048, 2048] (U-ViT's fid_stats,
    # pytorch-fid --save-stats, ADM's reference batches, or our fid-stats job)
    reference: Optional[str] = location(None)
    # compute the reference from real images first (into {output.uri}/reference/) when `reference` is null
    reference_images: Optional[RealImagesConfig] = None
    # eigvals: the official ENAT eval (torch float64 eigvals, enat-facts §9); sqrtm: pytorch-fid (scipy)
    method: Literal["eigvals", "sqrtm"] = "eigvals"
    is_splits: int = 10  # Inception Score splits (torch-fidelity's and ADM's 10)
    # torch-fidelity: its default protocol — samples permuted by np.random.RandomState(2020).permutation(N),
    # then `is_splits` contiguous slices (enat.inception_score's default; the paper's IS ~300 needs it,
    # docs/evaluation.md). contiguous: splits are index ranges; with the class-ordered plan each split then
    # holds num_classes / is_splits classes only and the score is capped near that number.
    is_protocol: Literal["torch-fidelity", "contiguous"] = "torch-fidelity"

    @property
    def is_shuffle_seed(self) -> Optional[int]:
        """`shuffle_seed` of enat.ISStats / enat.inception_score for `is_protocol`."""
        return IS_SHUFFLE_SEED if self.is_protocol == "torch-fidelity" else None


@dataclass(frozen=True)
class OutputSection:
    uri: str = location("")  # output folder URL (s3://…, a path); required
    png: bool = True  # PNGs in one webdataset tar per unit
    npz: bool = True  # ADM-style npz per unit (arr_0 uint8 NHWC, arr_1 labels)
    adm_npz: bool = False  # also concatenate all units into one samples_NxHxWx3.npz (ADM evaluator input)
    features: bool = False  # pool3 features per unit (float32 .npy), e.g. for precision / recall
    png_compress_level: int = 1  # zlib level of the PNGs (lossless at any level; 1 is fastest)
    grid: int = 32  # samples in the grid image (0: none)
    overwrite: bool = False  # redo units committed with a different plan / config

    def __post_init__(self) -> None:
        if not 0 <= self.png_compress_level <= 9:
            raise ValueError(f"png_compress_level: must lie in [0, 9], got {self.png_compress_level}")
        if self.grid < 0:
            raise ValueError(f"grid: must be >= 0, got {self.grid}")


@dataclass(frozen=True)
class ComputeSection:
    actors: int = 1  # actor pool size (one per GPU on a cluster)
    actor_num_gpus: float = 0.0  # GPUs per actor (1 on a GPU cluster)
    actor_num_cpus: float = 1.0  # CPUs per actor (torch threads on CPU)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the actor has a GPU
    decode_dtype: Dtype = "float32"  # VQGAN decoder autocast (the official eval decodes under fp16)
    png_threads: int = 4  # PNG encoders per actor, overlapped with the next batch's generation
    # units an actor works on at once: with 2, one unit's files are written while the next one computes
    # (the device runs one unit at a time either way); outputs do not depend on it
    units_in_flight: int = 1
    progress: bool = True  # tqdm bar on the driver
    throttle_s: float = 0.0  # sleep after each unit (fault-injection tests only)

    def __post_init__(self) -> None:
        if self.actors < 1 or self.png_threads < 1 or self.units_in_flight < 1:
            raise ValueError("actors, png_threads and units_in_flight must be >= 1")


@dataclass(frozen=True)
class TrackingSection:
    """MLflow (driver only)."""

    enabled: bool = True  # false: no MLflow at all (results.json still holds everything)
    tracking_uri: Optional[str] = location(None)  # default: $MLFLOW_TRACKING_URI, else ./mlruns.db
    experiment: Optional[str] = None  # default: the parent run's experiment, else "enat"
    run_name: Optional[str] = None  # default: "sample-" + the output folder's name
    parent_run_id: Optional[str] = None  # the training run: this job becomes its child run
    run_id: Optional[str] = None  # log into this existing run instead (params prefixed "sample.")
    step: Optional[int] = None  # metric step (default: the checkpoint's training step, else 0)
    system_metrics: bool = False  # MLflow system metrics (CPU / GPU / memory) of the driver


@dataclass(frozen=True)
class SampleJobConfig:
    """`python -m jobs.sample --config x.yaml [section.field=value ...]`."""

    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    text: TextConfig = field(default_factory=TextConfig)  # text models: the caption encoder
    sampler: SamplerSection = field(default_factory=SamplerSection)
    plan: PlanSection = field(default_factory=PlanSection)
    inception: InceptionSection = field(default_factory=InceptionSection)
    fid: FIDSection = field(default_factory=FIDSection)
    output: OutputSection = field(default_factory=OutputSection)
    compute: ComputeSection = field(default_factory=ComputeSection)
    mlflow: TrackingSection = field(default_factory=TrackingSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.model.checkpoint:
            raise ConfigError("model.checkpoint: required (URL/path of the ENAT weights)")
        if not self.output.uri:
            raise ConfigError("output.uri: required (output folder URL)")
        if self.inception.weights and not 1 <= self.fid.is_splits <= self.plan.num_samples:
            raise ConfigError(f"fid.is_splits: must lie in [1, plan.num_samples={self.plan.num_samples}], got "
                              f"{self.fid.is_splits}")
        if self.mlflow.run_id and self.mlflow.parent_run_id:
            raise ConfigError("mlflow.run_id and mlflow.parent_run_id: give one (log into a run, or open a "
                              "child run of it)")


@dataclass(frozen=True)
class FidStatsJobConfig:
    """`python -m jobs.fid_stats --config x.yaml`: reference mu / sigma from real images."""

    source: RealImagesConfig = field(default_factory=RealImagesConfig)
    inception: InceptionSection = field(default_factory=InceptionSection)
    output: str = location("")  # output folder URL: fid_stats.npz (mu, sigma), manifest.json, _parts/
    overwrite: bool = False
    compute: ComputeSection = field(default_factory=ComputeSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def __post_init__(self) -> None:
        if not self.source.root:
            raise ConfigError("source.root: required (folder or shards of real images)")
        if not self.output:
            raise ConfigError("output: required (output folder URL)")
        if not self.inception.weights:
            raise ConfigError("inception.weights: required (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")


# Named presets (enat-facts §6, §9, §10); URLs are placeholders to override.
SAMPLE_PRESETS: dict[str, dict[str, Any]] = {
    # ImageNet 256, FID-50K: 50 per class, cfg 2.5, mask_temp 1.5, sample_temp 6, eval batch 125.
    "imagenet-256": {"model": {"preset": "enat-l"}, "sampler": {"preset": "imagenet-256"},
                     "plan": {"num_samples": 50_000, "labels": "balanced", "batch_size": 125}},
    # ImageNet 512: cfg 3.5, sample_temp 4, batch 25; the paper reports 50K (the README command uses 5K).
    "imagenet-512": {"model": {"preset": "enat-l-512"}, "sampler": {"preset": "imagenet-512"},
                     "plan": {"num_samples": 50_000, "labels": "balanced", "batch_size": 25}},
    # MS-COCO 256, FID-30K with val2014 captions (U-ViT protocol); no sampler settings are published.
    "coco-256": {"model": {"preset": "enat-b-coco"}, "sampler": {"preset": "imagenet-256"},
                 "text": {"kind": "clip", "length": 77},
                 "plan": {"num_samples": 30_000, "batch_size": 125}},
}


# ----------------------------------------------------------------------------------------------------
# The plan (driver): labels / captions, units, seeds, fingerprints
# ----------------------------------------------------------------------------------------------------


def unit_seed(seed: int, unit: int) -> int:
    """RNG seed of work unit ``unit``: a pure function of (seed, unit), in [0, 2**63)."""
    a, b = np.random.SeedSequence([seed, unit, 0x5A4D]).generate_state(2, np.uint32)
    return int((int(a) << 31) ^ int(b)) & (2**63 - 1)


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


def model_config(section: ModelSection, storage_cfg: storage.StorageLike = None) -> tuple[enat.ENATConfig, dict]:
    """The architecture (preset + overrides, or `config.json` beside the checkpoint) and what that
    config.json says besides (e.g. the training ``step``; {} without one). Raises ``ConfigError``."""
    extra: dict = {}
    if section.preset:
        base = enat.ENATConfig.preset(section.preset)
    else:
        url = storage.join(section.checkpoint.rsplit("/", 1)[0], "config.json") if "/" in section.checkpoint \
            else "config.json"
        fs, path = storage.filesystem(url, storage_cfg)
        if not storage.exists(fs, path):
            raise ConfigError(f"model.preset: not set and {storage.redact(url)} does not exist; name the "
                              f"architecture (e.g. model.preset=enat-l for the official ENAT-L release)")
        doc = json.loads(fs.cat_file(path))
        if "model" not in doc:
            raise ConfigError(f"model.preset: {storage.redact(url)} has no 'model' section; set model.preset")
        extra = {k: v for k, v in doc.items() if k != "model"}
        try:
            base = enat.ENATConfig(**doc["model"])
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model: {storage.redact(url)}: {e}") from None
    over = {f.name: getattr(section, f.name) for f in dataclasses.fields(section)
            if f.name not in ("checkpoint", "preset") and getattr(section, f.name) is not None}
    try:
        return dataclasses.replace(base, **over), extra
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model: {e}") from None


def file_identity(url: Optional[str], storage_cfg: storage.StorageLike = None) -> Optional[dict]:
    """{uri (redacted), size, etag / mtime} of a file without reading it; None for no URL. Raises
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


def read_url(url: str, storage_cfg: storage.StorageLike = None) -> bytes:
    fs, path = storage.filesystem(url, storage_cfg)
    return fs.cat_file(path)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(obj: Any) -> str:
    return _sha(json.dumps(obj, sort_keys=True, default=str).encode())


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
    mcfg, extra = model_config(cfg.model, cfg.storage)
    p = cfg.plan
    n = p.num_samples
    labels = captions = None
    if mcfg.text_conditioned:
        if not p.captions:
            raise ConfigError("plan.captions: required for a text-conditioned model (COCO captions JSON, a JSON "
                              "list or a .txt of prompts)")
        captions = caption_plan(read_prompts(read_url(p.captions, cfg.storage), p.captions), n, p.seed)
    elif p.labels == "balanced":
        labels = balanced_labels(n, mcfg.num_classes)
    else:
        labels = uniform_labels(n, mcfg.num_classes, p.seed)
    grid = grid_indices(n, cfg.output.grid) if cfg.output.grid else []
    tok = cfg.tokenizer
    identity = {
        "format_version": FORMAT_VERSION, "num_samples": n, "labels": None if captions else p.labels,
        "captions": _fingerprint(captions) if captions else None, "seed": p.seed, "unit_size": p.unit_size,
        "batch_size": p.batch_size, "grid": grid,
        "model": {"config": mcfg.to_dict(), "checkpoint": file_identity(cfg.model.checkpoint, cfg.storage)},
        "sampler": enat.SamplerConfig.to_dict(cfg.sampler.resolve()),
        "tokenizer": {"kind": tok.kind, "preset": tok.preset, "seed": tok.seed,
                      "weights": file_identity(tok.weights, cfg.storage)},
        "text": dataclasses.asdict(cfg.text) | {"weights": file_identity(cfg.text.weights, cfg.storage)}
        if mcfg.text_conditioned else None,
        "inception": {"weights": file_identity(cfg.inception.weights, cfg.storage), "uint8": cfg.inception.uint8,
                      "dtype": cfg.inception.dtype},
        "is_splits": cfg.fid.is_splits, "is_protocol": cfg.fid.is_protocol, "decode_dtype": cfg.compute.decode_dtype,
        "output": {"png": cfg.output.png, "npz": cfg.output.npz, "features": cfg.output.features,
                   "png_compress_level": cfg.output.png_compress_level},
    }
    fp = _fingerprint(identity)
    units = make_units(n, p.unit_size, p.seed, labels, captions, grid)
    return SamplePlan(units, fp, n, mcfg, cfg.sampler.resolve(), extra, identity)


# ----------------------------------------------------------------------------------------------------
# Models in the actor
# ----------------------------------------------------------------------------------------------------


def pick_device(compute: ComputeSection) -> torch.device:
    want_cuda = compute.device == "cuda" or (compute.device == "auto" and compute.actor_num_gpus > 0
                                             and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("compute.device=cuda but this actor sees no CUDA device")
    return torch.device("cuda" if want_cuda else "cpu")


def build_inception(section: InceptionSection, storage_cfg: storage.StorageLike = None,
                    device: Optional[torch.device] = None) -> tuple[Optional[FIDInception], Optional[str]]:
    """(FIDInception loaded strictly from pytorch-fid's weights, their sha256), or (None, None) when
    ``section.weights`` is null (FID unavailable)."""
    if not section.weights:
        return None, None
    data = read_url(section.weights, storage_cfg)
    net = FIDInception.from_pytorch_fid(io.BytesIO(data), uint8_protocol=section.uint8,
                                        autocast_dtype=_TORCH_DTYPES[section.dtype])
    return net.to(device or "cpu"), _sha(data)


def load_model(cfg: SampleJobConfig, mcfg: enat.ENATConfig) -> tuple[enat.ENAT, str]:
    """(ENAT in eval mode from ``model.checkpoint``, sha256 of the checkpoint bytes)."""
    data = read_url(cfg.model.checkpoint, cfg.storage)
    try:
        model = enat.ENAT.from_official(io.BytesIO(data), mcfg)
    except ValueError as e:
        raise ValueError(f"model.checkpoint {storage.redact(cfg.model.checkpoint)}: {e}") from None
    return model.eval(), _sha(data)


def _device_dtype(dtype: Optional[torch.dtype], device: torch.device, field: str) -> Optional[torch.dtype]:
    """`dtype` for autocast on `device`; float16 on a CPU without oneDNN fp16 kernels runs float32 instead.

    There torch runs fp16 convolutions through its reference kernels, ~20x slower than float32 (measured
    on the CI machine for the VQGAN decoder); the GPU configs ask for fp16 (the official eval decodes
    under fp16 autocast) and still run when a CPU actor picks them up.
    """
    if dtype == torch.float16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_fp16_supported():
        print(f"[sample] {field}=float16: this CPU has no fp16 kernels; running float32 instead", flush=True)
        return None
    return dtype


def _decode(tok: Any, codes: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """codes (B, h, w) → float32 images (B, 3, H, W) in [0, 1], the decoder under autocast(dtype)."""
    if dtype is None:
        return tok.decode(codes)
    if "dtype" in inspect.signature(tok.decode).parameters:  # VQGAN: its own autocast
        return tok.decode(codes, dtype=dtype)
    with torch.autocast(codes.device.type, dtype=dtype):  # e.g. PatchVQ
        return tok.decode(codes).float()


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [0, 1] → uint8 [B, H, W, 3] as torchvision's save_image rounds (x·255 + 0.5,
    clamped, truncated — U-ViT's sample2dir / DiT's sample_ddp write PNGs this way)."""
    return images.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def png_bytes(image: np.ndarray, compress_level: int = 1) -> bytes:
    """uint8 (H, W, 3) → PNG bytes (lossless; deterministic for a given zlib)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def stats_npz_bytes(feats: FeatureStats, is_stats: Optional[ISStats]) -> bytes:
    """A unit's statistics file: FeatureStats keys n / sum / outer, ISStats keys is_* (float64)."""
    sd = {k: v.numpy() for k, v in feats.state_dict().items()}
    if is_stats is not None:
        sd.update({f"is_{k}": v.numpy() for k, v in is_stats.state_dict().items()})
    return npz_bytes(**sd)


def stats_from_npz(data: bytes) -> tuple[FeatureStats, Optional[ISStats]]:
    """Inverse of :func:`stats_npz_bytes`."""
    with np.load(io.BytesIO(data), allow_pickle=False) as f:
        sd = {k: f[k] for k in f.files}
    feats = FeatureStats.from_state_dict({k: sd[k] for k in ("n", "sum", "outer")})
    is_sd = {k[3:]: sd[k] for k in sd if k.startswith("is_")}
    return feats, ISStats.from_state_dict(is_sd) if is_sd else None


def tar_bytes(entries: Iterable[dict[str, Any]]) -> bytes:
    """webdataset entries → reproducible tar bytes (mtime 0, fixed owner)."""
    import webdataset as wds

    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False, mtime=0, user="enat", group="enat") as tw:
        for e in entries:
            tw.write(e)
    return buf.getvalue()


def sample_key(index: int) -> str:
    """webdataset key of global sample ``index`` (no dots)."""
    return f"{index:07d}"


class UnitRunner:
    """Runs work units on one device: generate → decode → Inception → write → commit.

    Holds the loaded models; the Ray actor (:class:`SampleActor`) builds one from the job config, the
    throughput benchmark builds one from in-memory random models. ``inception=None`` skips the
    statistics (FID unavailable).
    """

    def __init__(self, model: enat.ENAT, tokenizer: Any, inception: Optional[FIDInception],
                 sampler: enat.SamplerConfig, out_url: str, *, storage_cfg: storage.StorageLike = None,
                 batch_size: int = 125, is_total: int = 0, is_splits: int = 10,
                 is_shuffle_seed: Optional[int] = IS_SHUFFLE_SEED, text_encoder: Any = None,
                 output: OutputSection = OutputSection(), decode_dtype: Dtype = "float32", png_threads: int = 4,
                 identity: Optional[dict] = None, throttle_s: float = 0.0) -> None:
        self.model, self.tok, self.inception, self.sampler = model, tokenizer, inception, sampler
        self.device = model.mlm_layer.bias.device
        self.text_encoder = text_encoder
        self.batch_size, self.is_total, self.is_splits = batch_size, is_total, is_splits
        self.is_shuffle_seed = is_shuffle_seed
        self.output, self.decode_dtype = output, _device_dtype(_TORCH_DTYPES[decode_dtype], self.device,
                                                              "compute.decode_dtype")
        self.identity = identity or {}
        self.throttle_s = throttle_s
        self.pool = cf.ThreadPoolExecutor(png_threads, thread_name_prefix="png")
        self.fs, out = storage.filesystem(out_url, storage_cfg)
        self.out = out.rstrip("/")
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
        # the commit record is written last: its presence means every file of the unit is complete
        storage.put_atomic(self.fs, f"{self.out}/{PARTS_DIR}/{unit.unit:06d}.json", json.dumps(record).encode())
        if self.throttle_s:
            time.sleep(self.throttle_s)
        return record

    def _compute(self, unit: Unit, secs: collections.Counter, arrays: list, features: list,
                 pngs: list) -> tuple[Optional[FeatureStats], Optional[ISStats]]:
        gen = self.generator(unit)
        feats = FeatureStats.empty(2048, self.device) if self.inception is not None else None
        is_stats = (ISStats.empty(self.is_total, self.is_splits, device=self.device,
                                  shuffle_seed=self.is_shuffle_seed)
                    if self.inception is not None and self.is_total else None)
        for s in range(0, unit.count, self.batch_size):
            e = min(s + self.batch_size, unit.count)
            t0 = time.perf_counter()
            cond = self._cond(unit, s, e)
            tokens = enat.generate(self.model, cond, self.sampler, generator=gen)  # (b, L)
            self._sync()
            t1 = time.perf_counter()
            images = _decode(self.tok, tokens.view(-1, self.grid, self.grid), self.decode_dtype)  # (b, 3, H, W)
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
            u8 = _to_uint8(images)  # (b, H, W, 3)
            arrays.append(u8)
            if self.output.png:  # encoded by the pool while the next batch generates
                pngs.extend(self.pool.submit(png_bytes, a, self.output.png_compress_level) for a in u8)
            secs.update(generate=t1 - t0, decode=t2 - t1, inception=t3 - t2, write=time.perf_counter() - t3)
        return feats, is_stats

    def _put(self, rel: str, data: bytes, files: dict) -> None:
        storage.put_atomic(self.fs, f"{self.out}/{rel}", data)
        files[rel] = {"bytes": len(data), "sha256": _sha(data)}

    def _write(self, unit: Unit, fingerprint: str, u8: np.ndarray, pngs: list[bytes],
               feats: Optional[FeatureStats], is_stats: Optional[ISStats], features: list[np.ndarray]) -> dict:
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


class SampleActor:
    """Ray Data actor: loads the models once from the job config, then runs one unit per row."""

    def __init__(self, cfg: dict) -> None:
        self.cfg: SampleJobConfig = load_config(SampleJobConfig, cfg)
        c = self.cfg.compute
        device = pick_device(c)
        if device.type == "cpu":  # one intra-op thread per reserved CPU; scale with more actors
            torch.set_num_threads(max(1, int(c.actor_num_cpus)))
        from pipeline.tokenize import build_tokenizer

        mcfg, _ = model_config(self.cfg.model, self.cfg.storage)
        model, ckpt_sha = load_model(self.cfg, mcfg)
        tok, tok_id = build_tokenizer(self.cfg.tokenizer, self.cfg.storage)
        if int(tok.codebook_size) != mcfg.codebook_size:
            raise ConfigError(f"tokenizer: codebook_size {tok.codebook_size} does not match the model's "
                              f"{mcfg.codebook_size} (model.checkpoint {storage.redact(self.cfg.model.checkpoint)})")
        inception, inc_sha = build_inception(self.cfg.inception, self.cfg.storage, device)
        text = None
        if mcfg.text_conditioned:
            from pipeline.text import build_text_encoder

            text = build_text_encoder(self.cfg.text, device=str(device), storage_cfg=self.cfg.storage)
            if text.dim != mcfg.text_dim or text.length != mcfg.text_len:
                raise ConfigError(f"text: the encoder gives ({text.length}, {text.dim}) features, the model "
                                  f"expects ({mcfg.text_len}, {mcfg.text_dim})")
        identity = {"checkpoint_sha256": ckpt_sha, "tokenizer_sha256": tok_id["weights_sha256"],
                    "inception_sha256": inc_sha, "text_sha256": text.identity()["weights_sha256"] if text else None}
        self.runner = UnitRunner(model.to(device), tok.to(device), inception, self.cfg.sampler.resolve(),
                                 self.cfg.output.uri, storage_cfg=self.cfg.storage,
                                 batch_size=self.cfg.plan.batch_size, is_total=self.cfg.plan.num_samples,
                                 is_splits=self.cfg.fid.is_splits, is_shuffle_seed=self.cfg.fid.is_shuffle_seed,
                                 text_encoder=text, output=self.cfg.output,
                                 decode_dtype=c.decode_dtype, png_threads=c.png_threads, identity=identity,
                                 throttle_s=c.throttle_s)

    def __call__(self, row: dict) -> dict:
        rec = self.runner.run(Unit.from_row(row), row["fingerprint"])
        return {"unit": rec["unit"], "samples": rec["samples"], **{f"{k}_s": v for k, v in rec["seconds"].items()}}


# ----------------------------------------------------------------------------------------------------
# Driver: committed units, execution, exact merge
# ----------------------------------------------------------------------------------------------------


def committed(fs: Any, out: str) -> dict[int, dict]:
    """Commit records under ``{out}/_parts`` by unit id (fetched concurrently)."""
    paths = storage.list_files(fs, f"{out}/{PARTS_DIR}", suffix=".json")
    if not paths:
        return {}
    blobs = fs.cat(paths, on_error="raise") if len(paths) > 1 else {paths[0]: fs.cat_file(paths[0])}
    records = {}
    for p in paths:
        rec = json.loads(blobs[p])
        records[int(rec["unit"])] = rec
    return records


def execute(rows: list[dict], actor: type, ctor_args: tuple, compute: ComputeSection, total: int,
            what: str, log: Callable[[str], None]) -> dict[str, Any]:
    """Run ``rows`` through an actor pool on the current Ray cluster; progress and rate on the driver."""
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    pool = ray.data.ActorPoolStrategy(size=compute.actors, max_concurrent_calls_per_actor=compute.units_in_flight,
                                      enable_true_multi_threading=compute.units_in_flight > 1)
    ds = ds.map(actor, fn_constructor_args=ctor_args, compute=pool, num_cpus=compute.actor_num_cpus,
                num_gpus=compute.actor_num_gpus or None)
    bar = None
    if compute.progress:
        from tqdm import tqdm

        bar = tqdm(total=total or None, unit="img", desc=what, dynamic_ncols=True, file=sys.stderr)
    done, t0 = 0, time.perf_counter()
    t_first = first_n = None
    secs: collections.Counter = collections.Counter()
    try:
        for r in ds.iter_rows():
            done += int(r["samples"])
            secs.update({k[:-2]: float(v) for k, v in r.items() if k.endswith("_s")})
            if t_first is None:
                t_first, first_n = time.perf_counter(), done
            if bar is not None:
                bar.update(int(r["samples"]))
                bar.set_postfix(unit=r["unit"])
    finally:
        if bar is not None:
            bar.close()
    t_end = time.perf_counter()
    steady = (done - first_n) / (t_end - t_first) if t_first is not None and done > first_n and t_end > t_first \
        else None
    log(f"[{what}] {len(rows)} units, {done} images in {t_end - t0:.1f} s")
    return {"run_s": round(t_end - t0, 3), "first_unit_s": None if t_first is None else round(t_first - t0, 3),
            "steady_per_s": None if steady is None else round(steady, 3),
            "actor_seconds": {k: round(v, 3) for k, v in secs.items()}}


def merge_stats(partials: Iterable[tuple[FeatureStats, Optional[ISStats]]]
                ) -> tuple[Optional[FeatureStats], Optional[ISStats]]:
    """Sum unit statistics in the given order (exact: elementwise float64 sums; a fixed order makes
    the result bitwise reproducible). Returns (None, None) for no partials."""
    feats = is_stats = None
    for f, s in partials:
        if feats is None:
            feats = FeatureStats(f.n, f.sum.clone(), f.outer.clone())
        else:
            if f.dim != feats.dim:
                raise ValueError(f"merge_stats: feature dimensions differ ({feats.dim} vs {f.dim})")
            feats.n += f.n
            feats.sum += f.sum
            feats.outer += f.outer
        if s is not None:
            is_stats = s if is_stats is None else is_stats.merge(s)
    return feats, is_stats


def _prefetch(fs: Any, paths: Sequence[str], window: int = 4,
              read: Optional[Callable[[str], Any]] = None) -> Iterator[tuple[str, Any]]:
    """``read(path)`` (default: the bytes) of ``paths`` in order, up to ``window`` reads in flight
    (bounded memory; reads and hashing overlap across threads)."""
    read = read or fs.cat_file
    with cf.ThreadPoolExecutor(window) as ex:
        pending: collections.deque = collections.deque()
        it = iter(paths)
        for p in it:
            pending.append((p, ex.submit(read, p)))
            if len(pending) >= window:
                break
        while pending:
            p, fut = pending.popleft()
            nxt = next(it, None)
            if nxt is not None:
                pending.append((nxt, ex.submit(read, nxt)))
            yield p, fut.result()


def read_unit_stats(fs: Any, out: str, records: Sequence[dict]) -> Iterator[tuple[FeatureStats, Optional[ISStats]]]:
    """The statistics of ``records`` in order, each checked against its recorded sha256."""
    def read(p: str) -> tuple[bytes, str]:
        data = fs.cat_file(p)
        return data, _sha(data)  # hashlib releases the GIL: the reader threads hash in parallel

    paths = [f"{out}/stats/{r['unit']:06d}.npz" for r in records]
    for rec, (p, (data, sha)) in zip(records, _prefetch(fs, paths, read=read)):
        want = rec["files"][f"stats/{rec['unit']:06d}.npz"]["sha256"]
        if sha != want:
            raise ValueError(f"{storage.redact(storage.to_url(fs, p))}: sha256 differs from its commit record "
                             f"(overwritten by another job?); delete the unit's _parts record and rerun")
        yield stats_from_npz(data)


def fid_from_stats(mu: np.ndarray, sigma: np.ndarray, ref_mu: np.ndarray, ref_sigma: np.ndarray,
                   method: str = "eigvals") -> float:
    """FID of (mu, sigma) against the reference with enat.frechet_distance's numerics."""
    return frechet_distance(mu, sigma, ref_mu, ref_sigma, method=method)


class _Unseekable(io.RawIOBase):
    """Write-only wrapper with tell() but no seek: zipfile then streams (data descriptors, no rewinds),
    which object-store writers need."""

    def __init__(self, f: Any) -> None:
        self.f, self.pos = f, 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        n = self.f.write(b)
        n = len(b) if n is None else n
        self.pos += n
        return n

    def tell(self) -> int:
        return self.pos

    def seekable(self) -> bool:
        return False

    def seek(self, *a: Any) -> int:
        raise OSError("not seekable")

    def flush(self) -> None:
        self.f.flush()


def write_adm_npz(fs: Any, out: str, records: Sequence[dict], num_samples: int) -> str:
    """Concatenate the units' npz files into one ``samples_{N}x{H}x{W}x3.npz`` (arr_0 uint8 NHWC, arr_1
    labels), streamed (the 50K × 256² file is 9.8 GB); returns its path."""
    h, w = records[0]["resolution"]
    path = f"{out}/samples_{num_samples}x{h}x{w}x3.npz"
    labels = []
    with storage.open_atomic(fs, path) as raw:
        with zipfile.ZipFile(_Unseekable(raw), "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(
                    f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                        "shape": (num_samples, h, w, 3)})
                for rec, (_, data) in zip(records, _prefetch(fs, [f"{out}/npz/{r['unit']:06d}.npz"
                                                                   for r in records], window=2)):
                    with np.load(io.BytesIO(data), allow_pickle=False) as z:
                        arr = z["arr_0"]
                        labels.append(z["arr_1"])
                    if arr.shape != (rec["count"], h, w, 3) or arr.dtype != np.uint8:
                        raise ValueError(f"npz/{rec['unit']:06d}.npz: arr_0 {arr.dtype} {arr.shape}, expected "
                                         f"uint8 {(rec['count'], h, w, 3)}")
                    f.write(np.ascontiguousarray(arr).tobytes())
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.concatenate(labels))
            zf.writestr("arr_1.npy", buf.getvalue())
    return path


def _read_grid(fs: Any, out: str, indices: Sequence[int]) -> Optional[np.ndarray]:
    from PIL import Image

    paths = [f"{out}/grid/{sample_key(i)}.png" for i in indices]
    if not paths:
        return None
    return np.stack([np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for _, data in _prefetch(fs, paths)])


# ----------------------------------------------------------------------------------------------------
# The sample job
# ----------------------------------------------------------------------------------------------------


def _check_plan_file(fs: Any, out: str, plan: SamplePlan, overwrite: bool, uri: str) -> Optional[dict]:
    path = f"{out}/plan.json"
    if not storage.exists(fs, path):
        return None
    old = json.loads(fs.cat_file(path))
    if old.get("fingerprint") != plan.fingerprint and not overwrite:
        changed = sorted(k for k in set(old.get("identity", {})) | set(plan.identity)
                         if old.get("identity", {}).get(k) != plan.identity.get(k))
        raise ConfigError(f"output.uri: {storage.redact(uri)} holds samples of another plan (differs in: "
                          f"{', '.join(changed) or 'format'}); choose a new output.uri or set output.overwrite=true")
    return old


def _start_tracking(cfg: SampleJobConfig, plan: SamplePlan, old_plan: Optional[dict]) -> Any:
    from pipeline import tracking

    m = cfg.mlflow
    tags = {"job": "sample", "output_uri": cfg.output.uri, "checkpoint": cfg.model.checkpoint,
            "plan_fingerprint": plan.fingerprint}
    if m.run_id:  # another job's run (e.g. the training run): namespaced tags, its status left alone
        return tracking.start_run(m.tracking_uri, run_id=m.run_id, tags={f"sample.{k}": v for k, v in tags.items()},
                                  owns=False)
    prev = (old_plan or {}).get("mlflow_run_id")
    if prev and old_plan.get("fingerprint") == plan.fingerprint and tracking.run_exists(m.tracking_uri, prev):
        return tracking.start_run(m.tracking_uri, run_id=prev, system_metrics=m.system_metrics)
    name = m.run_name or "sample-" + cfg.output.uri.rstrip("/").rsplit("/", 1)[-1]
    return tracking.start_run(m.tracking_uri, m.experiment, run_name=name, parent_run_id=m.parent_run_id,
                              tags=tags, system_metrics=m.system_metrics)


def run_sample(cfg: SampleJobConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sample job on the current Ray cluster (init it first); returns the results summary.

    Raises ``ConfigError`` for bad settings or an output folder holding another plan, before any sample
    is drawn; ``RuntimeError`` if units are still missing after the run.
    """
    t_job = time.perf_counter()
    plan = build_plan(cfg)
    fs, out = storage.filesystem(cfg.output.uri, cfg.storage)
    out = out.rstrip("/")
    ref = None
    ref_id = None
    if cfg.fid.reference:
        data = read_url(cfg.fid.reference, cfg.storage)
        ref = load_reference_stats(data)
        ref_id = {"uri": storage.redact(cfg.fid.reference), "sha256": _sha(data)}
    old_plan = _check_plan_file(fs, out, plan, cfg.output.overwrite, cfg.output.uri)
    if old_plan is not None and old_plan.get("fingerprint") != plan.fingerprint:  # output.overwrite
        for name in ("manifest.json", "results.json"):  # the old sample set is no longer complete
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f"{out}/{name}")

    run = _start_tracking(cfg, plan, old_plan) if cfg.mlflow.enabled else None
    status = "FAILED"
    try:
        if run is not None:
            prefix = "sample." if cfg.mlflow.run_id else ""
            run.log_params({**config_to_dict(cfg), "resolved_sampler": plan.sampler.to_dict(),
                            "model_config": plan.model_config.to_dict(),
                            "is_protocol": is_protocol(cfg.fid.is_splits, cfg.fid.is_shuffle_seed)}, prefix=prefix)
        storage.put_atomic(fs, f"{out}/plan.json", json.dumps(
            {"format": "enat-samples", "fingerprint": plan.fingerprint, "identity": plan.identity,
             "config": json.loads(storage.redact(json.dumps(config_to_dict(cfg)))),
             "mlflow_run_id": None if run is None or cfg.mlflow.run_id else run.run_id}, indent=2).encode())

        if ref is None and cfg.fid.reference_images is not None and cfg.inception.weights:
            ref_cfg = FidStatsJobConfig(source=cfg.fid.reference_images, inception=cfg.inception,
                                        output=storage.join(cfg.output.uri, "reference"), compute=cfg.compute,
                                        storage=cfg.storage)
            ref_summary = run_fid_stats(ref_cfg, log)
            ref = load_reference_stats(read_url(ref_summary["stats"], cfg.storage))
            ref_id = {"uri": ref_summary["stats"], "sha256": ref_summary["sha256"], "computed": True}

        # what is left to do
        storage.remove_stale_temps(fs, out)
        done = committed(fs, out)
        todo, skipped = [], 0
        for u in plan.units:
            rec = done.get(u.unit)
            if rec is not None and rec["fingerprint"] == u.fingerprint(plan.fingerprint):
                skipped += 1
            elif rec is None or cfg.output.overwrite:
                todo.append(u)
            else:
                raise ConfigError(f"output.uri: unit {u.unit} in {storage.redact(cfg.output.uri)} was made by "
                                  f"another plan; choose a new output.uri or set output.overwrite=true")
        stale = sorted(set(done) - {u.unit for u in plan.units})
        if stale:
            raise ConfigError(f"output.uri: holds unit records {stale[:5]} beyond this plan's {len(plan.units)} "
                              f"units; choose a new output.uri")
        log(f"[sample] {plan.num_samples} samples in {len(plan.units)} units of {cfg.plan.unit_size} "
            f"({skipped} already committed); model {plan.model_config.encoder_depth}+"
            f"{plan.model_config.decoder_depth} blocks, dim {plan.model_config.dim}; sampler {plan.sampler}")
        timing: dict[str, Any] = {}
        if todo:
            rows = [u.row(plan.fingerprint) for u in todo]
            timing = execute(rows, SampleActor, (config_to_dict(cfg),), cfg.compute,
                             sum(u.count for u in todo), "sample", log)

        summary, recs, grid = finalize(cfg, plan, fs, out, ref, ref_id, log)
        summary.update(units=len(plan.units), units_skipped=skipped, units_run=len(todo), **timing)
        summary["job_s"] = round(time.perf_counter() - t_job, 3)
        if timing.get("run_s"):
            summary["samples_per_s"] = round(sum(u.count for u in todo) / timing["run_s"], 3)
        storage.put_atomic(fs, f"{out}/results.json", json.dumps(summary, indent=2).encode())
        if run is not None:
            _log_results(run, cfg, plan, summary, grid)
        # the manifest is written last: readers trust it, not listings
        storage.put_atomic(fs, f"{out}/manifest.json", json.dumps(
            {"format": "enat-samples", "format_version": FORMAT_VERSION, "fingerprint": plan.fingerprint,
             "num_samples": plan.num_samples, "results": summary,
             "units": [{"unit": r["unit"], "start": r["start"], "count": r["count"], "files": r["files"]}
                       for r in recs]}, indent=1).encode())
        status = "FINISHED"
        log(f"[sample] done: {json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)})}")
        return summary
    finally:
        if run is not None:
            run.end(status)


def finalize(cfg: SampleJobConfig, plan: SamplePlan, fs: Any, out: str, ref: Optional[tuple],
             ref_id: Optional[dict], log: Callable[[str], None] = print
             ) -> tuple[dict[str, Any], list[dict], Optional[np.ndarray]]:
    """Check every unit is committed, merge the statistics exactly, compute FID / IS; write fid_stats.npz,
    the ADM npz and grid.png. Returns (summary, the units' commit records in plan order, grid images)."""
    records = committed(fs, out)
    missing = [u.unit for u in plan.units if u.unit not in records]
    if missing:
        raise RuntimeError(f"units {missing[:5]} ({len(missing)} in all) were not committed; rerun the job to "
                           f"finish them")
    recs = [records[u.unit] for u in plan.units]
    # exact counts: every sample of the plan once, the plan's labels
    for u, r in zip(plan.units, recs):
        if r["samples"] != u.count or r["start"] != u.start:
            raise RuntimeError(f"unit {u.unit}: record holds {r['samples']} samples from {r['start']}, the plan "
                               f"{u.count} from {u.start}")
    label_counts: collections.Counter = collections.Counter()
    for r in recs:
        label_counts.update({int(k): v for k, v in r["label_counts"].items()})
    for key in ("checkpoint_sha256", "tokenizer_sha256", "inception_sha256"):
        seen = {r["identity"].get(key) for r in recs}
        if len(seen) > 1:
            raise RuntimeError(f"units were made with different weights ({key}: {len(seen)} values); the "
                               f"weights file changed between runs — rerun into a new output.uri")
    devices = sorted({r["device"] for r in recs})
    n_total = sum(r["samples"] for r in recs)
    summary: dict[str, Any] = {"num_samples": n_total, "label_counts_min": min(label_counts.values(), default=0),
                               "label_counts_max": max(label_counts.values(), default=0),
                               "num_labels": len(label_counts), "devices": devices,
                               "resolution": recs[0]["resolution"], "fid": None, "is": None, "is_std": None,
                               "is_protocol": is_protocol(cfg.fid.is_splits, cfg.fid.is_shuffle_seed),
                               "fid_method": cfg.fid.method, "reference": ref_id,
                               "inception": storage.redact(cfg.inception.weights) if cfg.inception.weights else None}
    summary["seconds"] = {k: round(sum(r["seconds"][k] for r in recs), 3)
                          for k in ("generate", "decode", "inception", "write")}
    if cfg.inception.weights:
        t0 = time.perf_counter()
        feats, is_stats = merge_stats(read_unit_stats(fs, out, recs))
        summary["merge_s"] = round(time.perf_counter() - t0, 3)
        if feats.n != n_total:
            raise RuntimeError(f"merged statistics count {feats.n} samples, the units {n_total}")
        mu, sigma = feats.mean_cov()
        storage.put_atomic(fs, f"{out}/fid_stats.npz", npz_bytes(mu=mu, sigma=sigma))
        if is_stats is not None:
            if int(is_stats.n.sum()) != n_total:
                raise RuntimeError(f"IS partials count {int(is_stats.n.sum())} samples, the units {n_total}")
            if is_stats.protocol != summary["is_protocol"]:
                raise RuntimeError(f"the units' IS partials follow {is_stats.protocol}, the config "
                                   f"{summary['is_protocol']} (fid.is_protocol / fid.is_splits)")
            summary["is"], summary["is_std"] = is_stats.score()
        if ref is not None:
            t0 = time.perf_counter()
            summary["fid"] = fid_from_stats(mu, sigma, ref[0], ref[1], cfg.fid.method)
            summary["fid_s"] = round(time.perf_counter() - t0, 3)
        else:
            summary["fid_unavailable"] = "no reference statistics (set fid.reference or fid.reference_images)"
    else:
        summary["fid_unavailable"] = "no Inception weights (inception.weights is null): FID and IS not computed"
    if summary.get("fid_unavailable"):
        log(f"[sample] FID unavailable: {summary['fid_unavailable']}")
    if cfg.output.adm_npz and cfg.output.npz:
        summary["adm_npz"] = storage.redact(storage.to_url(fs, write_adm_npz(fs, out, recs, n_total)))
    grid = _read_grid(fs, out, plan.identity["grid"])
    if grid is not None:
        from pipeline.tracking import make_grid

        storage.put_atomic(fs, f"{out}/grid.png", png_bytes(make_grid(grid), 6))
    return summary, recs, grid


def _log_results(run: Any, cfg: SampleJobConfig, plan: SamplePlan, summary: dict,
                 grid: Optional[np.ndarray]) -> None:
    step = cfg.mlflow.step if cfg.mlflow.step is not None else int(plan.extra.get("step") or 0)
    metrics = {"fid": summary.get("fid"), "is": summary.get("is"), "is_std": summary.get("is_std"),
               "n_samples": summary["num_samples"], "samples_per_s": summary.get("samples_per_s"),
               "merge_s": summary.get("merge_s")}
    metrics.update({f"seconds_{k}": v for k, v in summary["seconds"].items()})
    run.log_metrics(metrics, step=step)
    tags = {"fid_available": str(summary.get("fid") is not None).lower(), "fid_method": cfg.fid.method,
            "is_protocol": summary["is_protocol"]["name"]}
    if summary.get("fid_unavailable"):
        tags["fid_unavailable"] = summary["fid_unavailable"]
    if summary.get("reference"):
        tags["fid_reference"] = summary["reference"]["uri"]
        tags["fid_reference_sha256"] = summary["reference"]["sha256"]
    prefix = "sample." if cfg.mlflow.run_id else ""
    run.set_tags({f"{prefix}{k}": v for k, v in tags.items()})
    if grid is not None:
        run.log_grid(grid, key="samples", step=step)
    run.log_dict(summary, "sample/results.json")


# ----------------------------------------------------------------------------------------------------
# Reference statistics from real images (the fid-stats job)
# ----------------------------------------------------------------------------------------------------


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
                "fingerprint": _fingerprint(key)}

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


@dataclass(frozen=True)
class AdmNpzLayout:
    """Where the images of an ADM npz lie: `count` images of `shape` (H, W, 3) uint8; `offset`: the
    byte offset of their data in the file when `arr_0.npy` is stored uncompressed (np.savez), else None
    (np.savez_compressed: read through the zip member)."""

    count: int
    shape: tuple[int, int, int]
    data_start: int  # offset of the pixel data inside the arr_0.npy member (after the .npy header)
    offset: Optional[int]


def adm_npz_layout(fs: Any, path: str, name: str, resolution: int) -> AdmNpzLayout:
    """Read and check the layout of an ADM npz (reads the zip directory and the .npy header only, never
    the pixels). Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the fix: a
    statistics-only npz (mu / sigma, no arr_0), arr_0 not uint8 [N, H, W, 3], or H, W != resolution."""
    shown = storage.redact(name)
    storage.invalidate(fs, path)
    if not storage.exists(fs, path):
        raise FileNotFoundError(f"source.root {shown}: does not exist")
    with fs.open(path, "rb") as f:
        try:
            zf = zipfile.ZipFile(f)
        except zipfile.BadZipFile:
            raise ValueError(f"source.root {shown}: not an .npz (zip) file; source.kind=adm_npz reads ADM's "
                             f"reference batches (arr_0: uint8 [N, H, W, 3])") from None
        with zf:
            keys = sorted(n[:-4] if n.endswith(".npy") else n for n in zf.namelist())
            if "arr_0.npy" not in zf.namelist():
                hint = (" — it holds statistics only; as pytorch-fid statistics (U-ViT's fid_stats, our fid-stats "
                        "job) use it as fid.reference, but ADM's mu / sigma are TF-Inception statistics that only "
                        "ADM's evaluator matches (docs/evaluation.md)") if {"mu", "sigma"} & set(keys) else ""
                raise ValueError(f"source.root {shown}: no images (arr_0) in the npz, keys {keys}{hint}")
            info = zf.getinfo("arr_0.npy")
            with zf.open(info) as m:
                shape, fortran, dtype = read_npy_header(m)
                data_start = m.tell()
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            raise ValueError(f"source.root {shown}: arr_0 is {dtype} {tuple(shape)}"
                             f"{' (Fortran order)' if fortran else ''}; an ADM batch holds uint8 [N, H, W, 3] "
                             f"images (NHWC, RGB)")
        if shape[0] == 0:
            raise FileNotFoundError(f"source.root {shown}: arr_0 holds no image")
        if (shape[1], shape[2]) != (resolution, resolution):
            raise ValueError(f"source.root {shown}: arr_0 holds {shape[1]}x{shape[2]} images, source.resolution "
                             f"is {resolution}; set source.resolution={shape[1]} (the images are used as stored)"
                             if shape[1] == shape[2] else
                             f"source.root {shown}: arr_0 holds non-square {shape[1]}x{shape[2]} images; ADM "
                             f"batches are square center crops")
        offset = None
        if info.compress_type == zipfile.ZIP_STORED:
            f.seek(info.header_offset)
            local = f.read(30)  # zip local file header: name / extra lengths at bytes 26..30
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            offset = info.header_offset + 30 + name_len + extra_len + data_start
    return AdmNpzLayout(int(shape[0]), (int(shape[1]), int(shape[2]), 3), data_start, offset)


def read_adm_npz_rows(url: str, start: int, stop: int, resolution: int,
                      storage_cfg: storage.StorageLike = None) -> np.ndarray:
    """uint8 [stop - start, H, W, 3]: images [start, stop) of an ADM npz's arr_0 — one ranged read for an
    uncompressed member (a 10k-image batch is never read whole), a forward read through a compressed one."""
    fs, path = storage.filesystem(url, storage_cfg)
    lay = adm_npz_layout(fs, path, url, resolution)
    if not 0 <= start <= stop <= lay.count:
        raise ValueError(f"{storage.redact(url)}: rows [{start}, {stop}) outside arr_0's {lay.count} images")
    row = int(np.prod(lay.shape))
    with fs.open(path, "rb") as f:
        if lay.offset is not None:
            f.seek(lay.offset + start * row)
            data = f.read((stop - start) * row)
        else:
            with zipfile.ZipFile(f) as zf, zf.open("arr_0.npy") as m:
                m.seek(lay.data_start + start * row)
                data = m.read((stop - start) * row)
    if len(data) != (stop - start) * row:
        raise ValueError(f"{storage.redact(url)}: arr_0 is cut short ({len(data)} of {(stop - start) * row} bytes "
                         f"for rows [{start}, {stop})); the file is truncated — download it again")
    return np.frombuffer(data, dtype=np.uint8).reshape(stop - start, *lay.shape)


def _real_images(urls: Sequence[str], kind: str, extensions: Sequence[str],
                 storage_cfg: storage.StorageLike) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every image of a unit: files, or the image members of a tar."""
    if kind == "webdataset":
        import tarfile

        exts = {e.lower().lstrip(".") for e in extensions}
        with tarfile.open(fileobj=io.BytesIO(read_url(urls[0], storage_cfg)), mode="r|") as tf:
            for ti in tf:
                if ti.isreg() and ti.name.rsplit(".", 1)[-1].lower() in exts:
                    f = tf.extractfile(ti)
                    yield ti.name, f.read() if f is not None else b""
        return
    fs, _ = storage.filesystem(urls[0], storage_cfg)
    paths = [fs._strip_protocol(u) for u in urls]
    got = fs.cat(paths, on_error="return") if len(paths) > 1 else {paths[0]: _cat(fs, paths[0])}
    for u, p in zip(urls, paths):
        v = got.get(p)
        yield u, v if isinstance(v, bytes) else b""


def _cat(fs: Any, path: str) -> Any:
    try:
        return fs.cat_file(path)
    except OSError as e:  # unreadable: recorded as a reject like fs.cat(on_error="return") does
        return e


class RealStatsActor:
    """Ray Data actor: a unit of real images (decoded and center-cropped files, or an ADM npz's rows as
    stored) → Inception → FeatureStats → commit."""

    def __init__(self, cfg: dict) -> None:
        self.cfg: FidStatsJobConfig = load_config(FidStatsJobConfig, cfg)
        c = self.cfg.compute
        self.device = pick_device(c)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(c.actor_num_cpus)))
        self.net, self.sha = build_inception(self.cfg.inception, self.cfg.storage, self.device)
        self.fs, out = storage.filesystem(self.cfg.output, self.cfg.storage)
        self.out = out.rstrip("/")

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
        feats = FeatureStats.empty(2048, self.device)
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
        files: dict[str, dict] = {}
        data = stats_npz_bytes(feats, None)
        storage.put_atomic(self.fs, f"{self.out}/stats/{unit:06d}.npz", data)
        files[f"stats/{unit:06d}.npz"] = {"bytes": len(data), "sha256": _sha(data)}
        rec = {"unit": unit, "fingerprint": row["fingerprint"], "samples": feats.n, "rejects": rejects,
               "files": files, "identity": {"inception_sha256": self.sha},
               "seconds": {"read_decode": round(time.perf_counter() - t0 - t_inc, 4), "inception": round(t_inc, 4)}}
        storage.put_atomic(self.fs, f"{self.out}/{PARTS_DIR}/{unit:06d}.json", json.dumps(rec).encode())
        if self.cfg.compute.throttle_s:
            time.sleep(self.cfg.compute.throttle_s)
        return {"unit": unit, "samples": len(rejects) + feats.n, **{f"{k}_s": v for k, v in rec["seconds"].items()}}


def run_fid_stats(cfg: FidStatsJobConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Reference statistics of real images on the current Ray cluster: ``{output}/fid_stats.npz`` with
    ``mu`` (float64 [2048]) and ``sigma`` (float64 [2048, 2048]), pytorch-fid's format. Resumable like the
    sample job. Returns {stats (URL), sha256, n, rejected, …}."""
    units = list_real_images(cfg.source, cfg.storage)
    fs, out = storage.filesystem(cfg.output, cfg.storage)
    out = out.rstrip("/")
    source = {**dataclasses.asdict(cfg.source), "root": storage.redact(cfg.source.root)}
    if source["crop"] == "adm":  # statistics written before the crop option keep their fingerprint
        del source["crop"]
    identity = {"format_version": FORMAT_VERSION, "source": source,
                "inception": {"weights": file_identity(cfg.inception.weights, cfg.storage),
                              "uint8": cfg.inception.uint8, "dtype": cfg.inception.dtype}}
    if cfg.source.kind == "adm_npz":  # one file: a changed file (size / etag) must not reuse its units
        identity["source_file"] = file_identity(cfg.source.root, cfg.storage)
    fp = _fingerprint(identity)
    rows = [ru.row(u, fp) for u, ru in enumerate(units)]
    storage.remove_stale_temps(fs, out)
    done = committed(fs, out)
    todo = []
    for r in rows:
        rec = done.get(r["unit"])
        if rec is not None and rec["fingerprint"] == r["fingerprint"]:
            continue
        if rec is not None and not cfg.overwrite:
            raise ConfigError(f"output: unit {r['unit']} in {storage.redact(cfg.output)} was made from other images "
                              f"or weights; choose a new output or set overwrite=true")
        todo.append(r)
    log(f"[fid-stats] {len(units)} units of real images ({len(units) - len(todo)} already committed)")
    timing = execute(todo, RealStatsActor, (config_to_dict(cfg),), cfg.compute, 0, "fid-stats", log) if todo else {}
    records = committed(fs, out)
    missing = [r["unit"] for r in rows if r["unit"] not in records]
    if missing:
        raise RuntimeError(f"units {missing[:5]} were not committed; rerun the job to finish them")
    recs = [records[r["unit"]] for r in rows]
    feats, _ = merge_stats(read_unit_stats(fs, out, recs))
    mu, sigma = feats.mean_cov()
    data = npz_bytes(mu=mu, sigma=sigma)
    storage.put_atomic(fs, f"{out}/fid_stats.npz", data)
    rejects = [r for rec in recs for r in rec["rejects"]]
    by_reason = collections.Counter(r["reason"] for r in rejects)
    summary = {"stats": storage.redact(storage.to_url(fs, f"{out}/fid_stats.npz")), "sha256": _sha(data),
               "n": feats.n, "rejected": len(rejects), "rejected_by_reason": dict(sorted(by_reason.items())),
               "units": len(rows), "units_run": len(todo), **timing}
    storage.put_atomic(fs, f"{out}/manifest.json", json.dumps(
        {"format": "enat-fid-stats", "fingerprint": fp, "identity": identity, "results": summary,
         "rejects": rejects, "units": [{"unit": r["unit"], "samples": r["samples"], "files": r["files"]}
                                       for r in recs]}, indent=1).encode())
    log(f"[fid-stats] {feats.n} images → {summary['stats']} ({len(rejects)} rejected {dict(by_reason) or ''})")
    return summary
