"""The config sections every job shares, with one vocabulary across jobs.

Every job config has these sections under the same names::

    storage:  how to reach object storage (StorageConfig)
    ray:      how to reach Ray (RayConfig)
    compute:  the worker pool: workers, gpus_per_worker, cpus_per_worker, device, progress
    mlflow:   tracking (MLflowSection; the train and sample jobs extend it)
    output:   where the job writes: output.uri (OutputSection; a job may extend it, always with `uri`)

Precisions are ``fp32`` / ``bf16`` / ``fp16`` everywhere (:data:`Precision`); :func:`torch_dtype` maps
them to torch. Job-specific fields extend these classes in the job's own package.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from pipeline.config import location

Precision = Literal["fp32", "bf16", "fp16"]


def torch_dtype(precision: str) -> Any:
    """``fp32`` → None (no autocast), ``bf16`` / ``fp16`` → the torch dtype."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


@dataclass(frozen=True)
class StorageConfig:
    """How to reach object storage. Credentials come only from the standard AWS environment/config
    files (or the named ``profile``), never from here, so this config can be logged and recorded."""

    endpoint_url: Optional[str] = None  # S3-compatible endpoint (MinIO, moto, R2…); None: AWS_ENDPOINT_URL or AWS
    region: Optional[str] = None  # None: AWS_DEFAULT_REGION / ~/.aws/config
    profile: Optional[str] = None  # a named profile of ~/.aws/credentials
    anon: bool = False  # unsigned requests (public buckets)
    # extra fsspec options per protocol, e.g. {"s3": {"requester_pays": true}}; no secrets here
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # see the comment above

    def __post_init__(self) -> None:
        for proto, opts in self.options.items():
            bad = [k for k in opts if any(s in k.lower() for s in ("secret", "key", "token", "password"))]
            if bad:
                raise ValueError(f"options.{proto}.{bad[0]}: credentials may not be put in the config; "
                                 f"use the AWS environment, ~/.aws/credentials or storage.profile")


@dataclass(frozen=True)
class RayConfig:
    """How the job reaches Ray. Under ``ray job submit`` RAY_ADDRESS is set and these are ignored."""

    address: Optional[str] = None  # None: RAY_ADDRESS, else start an embedded local Ray on 127.0.0.1
    num_cpus: Optional[int] = None  # embedded Ray only
    num_gpus: Optional[int] = None  # embedded Ray only
    object_store_memory: Optional[int] = None  # bytes, embedded Ray only
    verbose: bool = False  # Ray's own log lines on the terminal too (`--verbose`); always in its session logs


@dataclass(frozen=True)
class ComputeSection:
    """The job's worker pool (Ray Data actors, or Ray Train workers)."""

    workers: int = 1  # pool size: one per GPU on a cluster
    gpus_per_worker: float = 0.0  # 1 on a GPU cluster
    cpus_per_worker: float = 1.0  # on CPU: the worker's torch threads
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the worker has a GPU
    progress: bool = True  # tqdm bar on the driver
    throttle_s: float = 0.0  # sleep after each unit of work (fault-injection tests and demos only)

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers: must be >= 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ValueError("gpus_per_worker must be >= 0 and cpus_per_worker > 0")


@dataclass(frozen=True)
class OutputSection:
    """Where a resumable job writes (the sample and train jobs extend or replace it with their own)."""

    uri: str = location("")  # output folder URL (required)
    overwrite: bool = False  # redo units already committed from other inputs or settings


@dataclass(frozen=True)
class MLflowSection:
    """MLflow tracking (driver / rank 0 only)."""

    enabled: bool = True  # false: no MLflow at all (the job's own files still hold everything)
    tracking_uri: Optional[str] = location(None)  # default: $MLFLOW_TRACKING_URI, else ./mlruns.db
    experiment: Optional[str] = None  # default: "enat" (a sampling child run: its parent's experiment)
    run_name: Optional[str] = None  # default: the job's own (train.run_name, "sample-" + output folder)
    system_metrics: bool = False  # MLflow system metrics (CPU / GPU / memory) of the driver / rank 0
