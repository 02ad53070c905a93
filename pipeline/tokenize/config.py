"""The tokenize job's config: what to read (``source``), how to crop it (``image``), the VQ tokenizer
(``tokenizer``), the caption encoder (``text``), the graph (``tokenize``), where it writes (``output``) and
the encoder pool (``compute``), plus the shared ``storage`` and ``ray`` sections.

``python -m jobs.tokenize --config tokenize.yaml`` reads a :class:`TokenizeJobConfig`; ``--preset NAME``
starts from one of :attr:`TokenizeJobConfig.PRESETS`; keys of the old layout are rejected naming their
new place (:attr:`TokenizeJobConfig.RENAMED`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from pipeline.config import ConfigError, location
from pipeline.models import TokenizerSection
from pipeline.sections import ComputeSection, MLflowSection, OutputSection, RayConfig, StorageConfig
from pipeline.text import TextConfig


@dataclass(frozen=True)
class SourceConfig:
    """Where the images come from."""

    kind: Literal["imagefolder", "coco"] = "imagefolder"  # dataset layout (see below)
    # imagefolder: root holding <split>/<class>/<image> (ImageNet layout), local path or URL.
    # coco: root holding annotations/captions_<split>.json and <split>/<image>.
    root: str = location("")  # dataset root, local path or URL (required)
    splits: tuple[str, ...] = ("train",)  # split folders to tokenize, e.g. [train, val] or [train2014]
    # as official: dataset.py _list_image_files_recursively keeps only these extensions
    extensions: tuple[str, ...] = ("jpg", "jpeg", "png", "gif")  # other files are recorded as rejects
    limit: Optional[int] = None  # keep only the first N images of each split (smoke runs)
    # imagefolder: a split whose images lie directly in its folder (ImageNet val as distributed:
    # val/ILSVRC2012_val_00000001.JPEG …) takes its labels from a file, per split: the Kaggle
    # LOC_val_solution.csv (ImageId,PredictionString: the first token is the wnid) or the devkit's
    # ILSVRC2012_validation_ground_truth.txt (one 1-based ILSVRC2012_ID per line; needs `synsets`).
    # Paths without a scheme that do not start with "/" are relative to root.
    labels: dict[str, str] = field(default_factory=dict)  # split → label file of a flat split (see above)
    # the devkit's synset list in ILSVRC2012_ID order (NOT the sorted-wnid order of the labels):
    # ILSVRC2012_devkit_t12/data/meta.mat, or a text file with one wnid per line in that order;
    # relative to root like `labels` (so not a driver-resolved location)
    synsets: Optional[str] = None  # needed by a ground_truth.txt label file (see above)
    # center crop: adm = ADM's BOX-halving + BICUBIC crop (official ENAT / ImageNet); uvit = U-ViT's
    # crop to the short side + Lanczos resize (the pipeline of fid_stats_mscoco256_val.npz); auto:
    # uvit for kind=coco, adm otherwise
    crop: Literal["auto", "adm", "uvit"] = "auto"  # see above

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError("splits: at least one split is required")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit: must be ≥ 1 or null, got {self.limit}")
        unknown = sorted(set(self.labels) - set(self.splits))
        if unknown:
            raise ValueError(f"labels.{unknown[0]}: not one of splits {list(self.splits)}")
        if self.labels and self.kind != "imagefolder":
            raise ValueError("labels: label files apply to kind=imagefolder only")


@dataclass(frozen=True)
class ImageConfig:
    """Decode and preprocessing."""

    resolution: int = 256  # the official center crop's output size (256 or 512 in the paper)
    min_side: int = 8  # images whose short side is smaller are rejected as "tiny"
    # larger images are rejected as "decompression-bomb"; default = PIL's own error threshold
    max_pixels: int = 2 * 89_478_485  # more pixels (read from the header) → "decompression-bomb"

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution: must be positive, got {self.resolution}")
        if self.min_side < 1 or self.max_pixels < 1:
            raise ValueError("min_side and max_pixels must be positive")


@dataclass(frozen=True)
class TokenizeSection:
    """The shards: their size, their tar entries, the encoder batch and the flipped rows."""

    samples_per_shard: int = 1000  # images per shard (a shard is the unit of work); ~128 for COCO
    rows_per_entry: int = 1000  # token rows packed into one tar entry (512 B per row at 256 px)
    text_rows_per_entry: int = 8  # images per tar entry when text features are stored (~0.6 MB each)
    batch_size: int = 128  # images per encoder forward (the official script uses 128)
    flips: Literal["train", "all", "none"] = "train"  # store flipped tokens: splits named train*, all, none

    def __post_init__(self) -> None:
        for name in ("samples_per_shard", "rows_per_entry", "text_rows_per_entry", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be ≥ 1, got {getattr(self, name)}")

    def has_flips(self, split: str) -> bool:
        """``flips``: "train" → splits whose name starts with "train" (as official: train only)."""
        return self.flips == "all" or (self.flips == "train" and split.startswith("train"))


@dataclass(frozen=True)
class TokenizeComputeSection(ComputeSection):
    """The encoder actor pool (``workers`` of them) and where decode + crop runs."""

    # where decode + crop runs: "tasks" (a CPU task pool feeding the encoder actors: GPU clusters),
    # "actors" (each encoder actor decodes its own shard: CPU-only encoding, no transfer between
    # processes), "auto" (actors when gpus_per_worker == 0, else tasks)
    decode_on: Literal["auto", "tasks", "actors"] = "auto"
    decode_cpus: float = 1.0  # CPUs per decode task

    def decode_in_worker(self) -> bool:
        """Whether each encoder actor reads and decodes its own shard (see ``decode_on``)."""
        return self.decode_on == "actors" or (self.decode_on == "auto" and not self.gpus_per_worker)


@dataclass(frozen=True)
class TokenizeJobConfig:
    """``python -m jobs.tokenize --config tokenize.yaml``: everything the job needs."""

    source: SourceConfig = field(default_factory=SourceConfig)  # what to read
    image: ImageConfig = field(default_factory=ImageConfig)  # decode + center crop
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)  # the VQ encoder (precision: autocast)
    text: TextConfig = field(default_factory=TextConfig)  # caption encoder (coco only)
    tokenize: TokenizeSection = field(default_factory=TokenizeSection)  # the shards
    # where the shards go: {uri}/{split}/{split}-000000.tar, manifest.parquet, rejects.parquet, dataset.json
    output: OutputSection = field(default_factory=OutputSection)
    compute: TokenizeComputeSection = field(default_factory=TokenizeComputeSection)  # the encoder pool
    storage: StorageConfig = field(default_factory=StorageConfig)  # object-store settings
    ray: RayConfig = field(default_factory=RayConfig)  # how to reach Ray
    mlflow: MLflowSection = field(default_factory=MLflowSection)  # the job's run: counts and lineage

    # Named presets (paper numbers: enat-facts §5, §8, §10). Paths are placeholders to override.
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        # ImageNet-1k 256 px: 1,281,167 train images → 2 token rows each (plain + flip), MAGE VQGAN f16.
        "imagenet-256": {"source": {"kind": "imagefolder", "splits": ["train", "val"]},
                         "image": {"resolution": 256},
                         "tokenizer": {"kind": "vqgan", "preset": "mage-f16"},
                         "tokenize": {"samples_per_shard": 1000, "batch_size": 128}},
        "imagenet-512": {"source": {"kind": "imagefolder", "splits": ["train", "val"]},
                         "image": {"resolution": 512},
                         "tokenizer": {"kind": "vqgan", "preset": "mage-f16"},
                         "tokenize": {"samples_per_shard": 500, "batch_size": 64}},
        # MS-COCO 2014 256 px with CLIP ViT-L/14 text features (U-ViT recipe; enat-facts §10).
        "coco-256": {"source": {"kind": "coco", "splits": ["train2014", "val2014"]},
                     "image": {"resolution": 256},
                     "tokenizer": {"kind": "vqgan", "preset": "mage-f16"},
                     "text": {"kind": "clip", "length": 77},
                     "tokenize": {"samples_per_shard": 128, "batch_size": 128}},
    }
    # the keys of the old layout (before issue 12) → their names in the shared vocabulary
    RENAMED: ClassVar[dict[str, str]] = {
        "tokenize.out": "output.uri",
        "tokenize.overwrite": "output.overwrite",
        "tokenize.encode_actors": "compute.workers",
        "tokenize.actor_num_gpus": "compute.gpus_per_worker",
        "tokenize.actor_num_cpus": "compute.cpus_per_worker",
        "tokenize.decode_num_cpus": "compute.decode_cpus",
        "tokenize.decode_on": "compute.decode_on",
        "tokenize.device": "compute.device",
        "tokenize.precision": "tokenizer.precision",
        "tokenize.progress": "compute.progress",
        "tokenize.throttle_s": "compute.throttle_s",
    }

    def __post_init__(self) -> None:
        if not self.source.root:
            raise ConfigError("source.root: required (local path or URL of the image data)")
        if not self.output.uri:
            raise ConfigError("output.uri: required (output URL)")
