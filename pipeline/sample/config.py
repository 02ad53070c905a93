"""The sample job's config: ``python -m jobs.sample --config x.yaml [section.field=value ...]``.

Sections: ``model`` (the checkpoint and its architecture), ``tokenizer`` (the decoder), ``text`` (text
models' caption encoder), ``sampler``, ``plan`` (what to sample), ``inception``, ``fid``, ``output``,
``compute``, ``mlflow``, ``storage``, ``ray``. :data:`SampleJobConfig.PRESETS` holds the paper's
protocols; :data:`SampleJobConfig.RENAMED` the old spellings of renamed keys.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

import enat
from pipeline.config import RESPELLED, ConfigError, location
from pipeline.models import InceptionSection, ModelSection, TokenizerSection
from pipeline.sections import ComputeSection, MLflowSection, Precision, RayConfig, StorageConfig
from pipeline.text import TextConfig

FORMAT_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "gif", "webp", "bmp")
# precision → the torch spelling that enat.SamplerConfig.dtype and the plan fingerprints use
TORCH_SPELLING = {new: old for old, new in RESPELLED.items()}

# old dotted keys → new ones, shared by the sample and the fid-stats job
COMPUTE_RENAMED = {"compute.actors": "compute.workers", "compute.actor_num_gpus": "compute.gpus_per_worker",
                   "compute.actor_num_cpus": "compute.cpus_per_worker"}


@dataclass(frozen=True)
class SampleModelSection(ModelSection):
    """The ENAT checkpoint and its architecture (a preset with overrides, or config.json beside it)."""

    # URL/path of the weights: an official release (e.g. ENAT-L `nnet_ema.pth`) or the EMA state dict
    # our training exports (`step_*/ema.pt`); both load through `ENAT.from_official`. With preset null the
    # architecture is read from `config.json` beside the checkpoint (our training export).
    checkpoint: str = location("")


@dataclass(frozen=True)
class SamplerSection:
    """Sampler settings: a preset (enat-facts §6) with optional overrides."""

    preset: Literal["imagenet-256", "imagenet-512"] = "imagenet-256"
    steps: Optional[int] = None  # null: the preset's (8)
    cfg_scale: Optional[float] = None  # null: the preset's (2.5 at 256, 3.5 at 512)
    mask_temp: Optional[float] = None  # null: the preset's (1.5)
    sample_temp: Optional[float] = None  # null: the preset's (6 at 256, 4 at 512)
    reuse: bool = True  # SC-attention feature reuse across steps (ENAT; false: the ablation)
    precision: Precision = "fp32"  # autocast for the network (bf16 on GPUs; the official eval is fp16)
    compile: bool = False  # torch.compile the block stack (GPU)

    def resolve(self) -> enat.SamplerConfig:
        """The `enat.SamplerConfig` these settings describe."""
        base = enat.SamplerConfig.preset(self.preset)
        over = {k: getattr(self, k) for k in ("steps", "cfg_scale", "mask_temp", "sample_temp")
                if getattr(self, k) is not None}
        return dataclasses.replace(base, reuse=self.reuse, dtype=TORCH_SPELLING[self.precision],
                                   compile=self.compile, **over)

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
class RealImagesConfig:
    """Real images for reference statistics (the fid-stats job's ``source``, ``fid.reference_images``)."""

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
        return enat.IS_SHUFFLE_SEED if self.is_protocol == "torch-fidelity" else None


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
class SampleComputeSection(ComputeSection):
    """The worker pool, plus the sample workers' PNG encoders and units in flight."""

    png_threads: int = 4  # PNG encoders per worker, overlapped with the next batch's generation
    # units a worker works on at once: with 2, one unit's files are written while the next one computes
    # (the device runs one unit at a time either way); outputs do not depend on it
    units_in_flight: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.png_threads < 1 or self.units_in_flight < 1:
            raise ValueError("png_threads and units_in_flight must be >= 1")


@dataclass(frozen=True)
class SampleMLflowSection(MLflowSection):
    """MLflow (driver only); experiment defaults to the parent run's, run_name to "sample-<output folder>"."""

    parent_run_id: Optional[str] = None  # the training run: this job becomes its child run
    run_id: Optional[str] = None  # log into this existing run instead (params prefixed "sample.")
    step: Optional[int] = None  # metric step (default: the checkpoint's training step, else 0)


@dataclass(frozen=True)
class SampleJobConfig:
    """`python -m jobs.sample --config x.yaml [section.field=value ...]`."""

    # Named presets (enat-facts §6, §9, §10); URLs are to be given.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
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
    RENAMED: ClassVar[dict[str, str]] = {
        **COMPUTE_RENAMED, "compute.decode_dtype": "tokenizer.precision", "sampler.dtype": "sampler.precision",
        "inception.dtype": "inception.precision"}

    model: SampleModelSection = field(default_factory=SampleModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)  # precision: the decoder's autocast
    text: TextConfig = field(default_factory=TextConfig)  # text models: the caption encoder
    sampler: SamplerSection = field(default_factory=SamplerSection)
    plan: PlanSection = field(default_factory=PlanSection)
    inception: InceptionSection = field(default_factory=InceptionSection)
    fid: FIDSection = field(default_factory=FIDSection)
    output: OutputSection = field(default_factory=OutputSection)
    compute: SampleComputeSection = field(default_factory=SampleComputeSection)
    mlflow: SampleMLflowSection = field(default_factory=SampleMLflowSection)
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
