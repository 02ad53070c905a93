"""The train job's config: ``python -m jobs.train [--preset NAME] [--config x.yaml] [section.field=value ...]``.

Sections: ``data`` (the token reader), ``model`` (an ENAT preset, sized to the token dataset),
``objective``, ``optim``, ``train`` (run name, batch, steps, EMA, seed), ``deepspeed``, ``compute`` (the
Ray Train workers), ``output`` (checkpoints), ``mlflow``, ``storage``, ``ray`` and ``launcher``. The recipe
defaults are the paper's (enat-facts §5); ``PRESETS`` hold the three recipes of infra/configs without
their storage locations.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Optional

from enat.objective import ObjectiveConfig
from pipeline.config import location
from pipeline.models import ModelSection
from pipeline.readers import ReaderConfig
from pipeline.sections import ComputeSection, MLflowSection, Precision, RayConfig, StorageConfig


@dataclass(frozen=True)
class TrainReaderConfig(ReaderConfig):
    """The token reader with the official training defaults: label/caption drop p_uncond 0.15
    (official CFGDataset) and a random plain/flipped choice per sample and epoch."""

    p_uncond: float = 0.15


@dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup then constant lr (official: betas 0.99/0.99, wd 0.03 on all params)."""

    lr: float = 4e-4  # at global batch 2048 (256 px); 1e-4 at 512 for 512 px
    betas: tuple[float, float] = (0.99, 0.99)
    weight_decay: float = 0.03
    eps: float = 1e-8
    warmup_steps: int = 5000
    grad_clip: float = 0.0  # 0 = no clipping (official: the grad norm is only logged)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: must lie in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")


@dataclass(frozen=True)
class TrainSection:
    run_name: str = "enat"  # the checkpoint folder under output.uri, and the MLflow run's name
    global_batch: int = 2048
    steps: int = 500_000
    ema_rate: float = 0.9999
    seed: int = 1234
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.steps < 1 or self.log_every < 1:
            raise ValueError("global_batch, steps and log_every must be >= 1")
        if not 0 <= self.ema_rate < 1:
            raise ValueError(f"ema_rate: must lie in [0, 1), got {self.ema_rate}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name: must be a non-empty name without '/', got {self.run_name!r}")


@dataclass(frozen=True)
class DeepSpeedSection:
    zero_stage: int = 1  # 1: ENAT-L fits per GPU and the reuse branch needs full EMA weights
    precision: Precision = "bf16"
    micro_batch: Optional[int] = None  # per worker and micro-step; default: global_batch / workers
    extra: Optional[dict] = None  # merged into the generated DeepSpeed JSON (expert knobs)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch: must be >= 1, got {self.micro_batch}")
        if self.precision == "fp16" and self.zero_stage == 0:
            raise ValueError("deepspeed.zero_stage: fp16 needs ZeRO stage >= 1 (the EMA follows DeepSpeed's "
                             "fp32 master weights, which its stage-0 fp16 optimizer does not expose); "
                             "set deepspeed.zero_stage=1")


@dataclass(frozen=True)
class TrainComputeSection(ComputeSection):
    """The Ray Train workers (torchrun: the processes it starts); a worker with gpus_per_worker > 0
    trains on its GPU."""

    max_failures: int = 2  # Ray Train restarts lost workers this many times

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_failures < 0:
            raise ValueError(f"max_failures: must be >= 0, got {self.max_failures}")


@dataclass(frozen=True)
class TrainOutputSection:
    uri: str = location("runs/checkpoints")  # storage URL (s3://..., file://..., a path); run_name is appended
    checkpoint_every: int = 1000  # steps; also one at the end
    keep_last: int = 3  # 0: keep every checkpoint
    # latest: the newest intact checkpoint of the run (a damaged one is named and skipped); none: start over;
    # step_000001000: that one (newer ones are then set aside: their manifest.json is renamed)
    resume_from: str = "latest"

    def __post_init__(self) -> None:
        if self.checkpoint_every < 1 or self.keep_last < 0:
            raise ValueError("checkpoint_every must be >= 1 and keep_last >= 0")
        if self.resume_from not in ("latest", "none") and not re.fullmatch(r"step_\d{9}", self.resume_from):
            raise ValueError(f"resume_from: must be latest, none or a checkpoint name like step_000001000, "
                             f"got {self.resume_from!r}")


@dataclass(frozen=True)
class TrainMLflowSection(MLflowSection):
    """Rank 0's MLflow run (name: ``mlflow.run_name``, default ``train.run_name``)."""

    experiment: Optional[str] = "enat"
    system_metrics: bool = True
    grid_every: int = 0  # steps between sample grids (0: only at the end)
    grid_classes: tuple[int, ...] = tuple(range(8))
    peak_tflops: float = 0.0  # per device; MFU is logged when set (e.g. 989 for H100 bf16 dense)
    grid_captions: int = 8  # text models: captions of the grid (the first of the training stream, fixed)
    # at the end, register the final EMA weights as a version of this MLflow registered model (the weights
    # stay where they are; the version points at them); null: train.run_name. `enat register` does it for
    # any checkpoint.
    register: bool = True
    model_name: Optional[str] = None
    aliases: tuple[str, ...] = ()  # aliases moved to the new version, e.g. [candidate]


def _recipe(run_name: str, data: dict, model: str, lr: float, global_batch: int, steps: int, workers: int,
            mlflow: dict) -> dict[str, Any]:
    """A preset: the paper's recipe (enat-facts §5) as infra/configs writes it, without storage locations."""
    return {"data": data, "model": {"preset": model},
            "optim": {"lr": lr, "betas": [0.99, 0.99], "weight_decay": 0.03, "warmup_steps": 5000},
            "train": {"run_name": run_name, "global_batch": global_batch, "steps": steps, "ema_rate": 0.9999},
            "deepspeed": {"zero_stage": 1, "precision": "bf16"},
            "compute": {"workers": workers, "gpus_per_worker": 1, "cpus_per_worker": 8},
            "output": {"checkpoint_every": 5000, "keep_last": 3}, "mlflow": mlflow}


_IMAGENET = {"kind": "memory", "split": "train", "p_uncond": 0.15, "flip": "random"}


@dataclass(frozen=True)
class TrainJobConfig:
    """`python -m jobs.train [--preset NAME] [--config x.yaml] [section.field=value ...]`."""

    data: TrainReaderConfig = field(default_factory=TrainReaderConfig)
    model: ModelSection = field(default_factory=lambda: ModelSection(preset="enat-l"))
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    compute: TrainComputeSection = field(default_factory=TrainComputeSection)
    output: TrainOutputSection = field(default_factory=TrainOutputSection)
    mlflow: TrainMLflowSection = field(default_factory=TrainMLflowSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    launcher: Literal["ray", "torchrun"] = "ray"

    PRESETS: ClassVar[dict[str, dict]] = {
        # ENAT-L, 256 px: 16 GPUs x 128 = global batch 2048, lr 4e-4, 500k steps
        "imagenet-256": _recipe("enat-l-256", _IMAGENET, "enat-l", 4e-4, 2048, 500_000, 16,
                                {"experiment": "enat/imagenet256", "grid_every": 5000}),
        # ENAT-L, 512 px: lr 1e-4 at global batch 512, 500k steps
        "imagenet-512": _recipe("enat-l-512", _IMAGENET, "enat-l-512", 1e-4, 512, 500_000, 16,
                                {"experiment": "enat/imagenet512", "grid_every": 5000}),
        # ENAT-B text-to-image on MS-COCO, 150k steps; captions streamed, dropped with p_uncond 0.1 (U-ViT)
        "coco-256": _recipe("enat-b-coco", {"kind": "stream", "split": "train2014", "p_uncond": 0.1,
                                            "flip": "random", "resampled": True, "batches_per_epoch": 1000,
                                            "num_workers": 4},
                            "enat-b-coco", 4e-4, 1024, 150_000, 8, {"experiment": "enat/coco256"}),
    }
    RENAMED: ClassVar[dict[str, str]] = {
        "scaling.num_workers": "compute.workers",
        "scaling.use_gpu": "compute.gpus_per_worker",
        "scaling.cpus_per_worker": "compute.cpus_per_worker",
        "scaling.max_failures": "compute.max_failures",
        "checkpoint.uri": "output.uri",
        "checkpoint.every": "output.checkpoint_every",
        "checkpoint.keep_last": "output.keep_last",
    }

    def __post_init__(self) -> None:
        if not self.data.root:
            raise ValueError("data.root: the token dataset URL (written by `enat tokenize`) is required")
        if not self.model.preset:
            raise ValueError("model.preset: required (an ENAT preset such as enat-l)")
        micro, accum = batch_split(self)
        if micro * accum * self.compute.workers != self.train.global_batch:
            raise ValueError(
                f"train.global_batch: {self.train.global_batch} is not micro_batch ({micro}) x gradient "
                f"accumulation ({accum}) x workers ({self.compute.workers}); pick a global batch "
                "divisible by the worker count, or set deepspeed.micro_batch to a divisor")


def batch_split(cfg: TrainJobConfig) -> tuple[int, int]:
    """-> (micro batch per worker, gradient accumulation steps) that make up the global batch."""
    per_worker = cfg.train.global_batch // cfg.compute.workers
    micro = cfg.deepspeed.micro_batch or per_worker
    return micro, max(1, per_worker // micro)


def uses_gpu(cfg: TrainJobConfig) -> bool:
    """Whether the workers train on a GPU: compute.device=cuda, or auto with compute.gpus_per_worker > 0."""
    return cfg.compute.device == "cuda" or (cfg.compute.device == "auto" and cfg.compute.gpus_per_worker > 0)
