"""How training is launched: Ray Train (``run_ray``) or a plain launcher (torchrun / ``deepspeed``).

One train loop (:func:`pipeline.train.loop.train_loop`) serves both; what differs is a small context
object: :class:`RayContext` (ranks from the train context, checkpoints reported with
``ray.train.report``, resume from ``ray.train.get_checkpoint()``) and :class:`LocalContext` (ranks from
the environment, checkpoints written to ``output.uri`` through fsspec).
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, Optional

import torch

from pipeline import storage
from pipeline.cluster import keep_freed_memory
from pipeline.shards import SplitInfo
from pipeline.train.config import TrainJobConfig, uses_gpu


class RayContext:
    """Ranks and checkpoints through Ray Train."""

    def __init__(self) -> None:
        import ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def restore(self) -> Optional[str]:
        """A local directory holding the latest reported checkpoint, or None."""
        import ray.train
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return ckpt.to_directory()

    def report(self, metrics: dict, ckpt_dir: Optional[str], name: Optional[str]) -> None:
        import ray.train
        from ray.train import Checkpoint
        if ckpt_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir), checkpoint_dir_name=name)


class LocalContext:
    """torchrun / deepspeed launcher: ranks from the environment, checkpoints straight to storage."""

    def __init__(self, cfg: TrainJobConfig) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.cfg = cfg
        self.root = storage.join(cfg.output.uri, cfg.train.run_name)

    def _fs(self):
        return storage.filesystem(self.root, self.cfg.storage)

    def restore(self) -> Optional[str]:
        fs, path = self._fs()
        storage.invalidate(fs, path)
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in (fs.ls(path, detail=False) if fs.exists(path) else [])
                       if p.rstrip("/").rsplit("/", 1)[-1].startswith("step_"))
        complete = [n for n in names if fs.exists(f"{path}/{n}/COMPLETE")]
        if not complete:
            return None
        local = tempfile.mkdtemp(prefix="enat-restore-")
        fs.get(f"{path}/{complete[-1]}/", local + "/", recursive=True)
        return local

    def report(self, metrics: dict, ckpt_dir: Optional[str], name: Optional[str]) -> None:
        if ckpt_dir is None:
            return
        import torch.distributed as dist
        fs, path = self._fs()
        fs.put(ckpt_dir.rstrip("/") + "/", f"{path}/{name}/", recursive=True)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:  # a checkpoint counts only once every rank uploaded its files
            fs.pipe(f"{path}/{name}/COMPLETE", b"")
            keep = self.cfg.output.keep_last
            storage.invalidate(fs, path)
            old = sorted(p for p in fs.ls(path, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("step_"))
            for p in old[:-keep] if keep > 0 else []:
                fs.rm(p, recursive=True)


def init_worker(cfg: TrainJobConfig, local_rank: int) -> torch.device:
    """This worker's device (its GPU when the config asks for one and CUDA is there, else the CPU) and
    the process group (nccl / gloo) DeepSpeed uses."""
    import deepspeed
    import torch.distributed as dist

    if cfg.compute.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("compute.device=cuda but this worker sees no CUDA device")
    use_cuda = uses_gpu(cfg) and torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        # as the other CPU workers (pick_device): the engine's full-model flat buffers (gradient flattening,
        # master copies) are reused instead of page-faulting in on every step
        keep_freed_memory()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    return device


def run_ray(cfg: TrainJobConfig, split: SplitInfo) -> Any:
    """Run training under Ray Train; returns Ray's Result. ``split`` is the token split the driver opened
    (its dataset.json and manifest travel to the workers). Resumes automatically from the latest
    checkpoint of the same run name in storage, and restarts lost workers (``compute.max_failures``)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster import worker_env
    from pipeline.train.loop import train_loop

    fs, path = storage.filesystem(cfg.output.uri, cfg.storage)
    storage_fs = None
    if not storage.is_local(fs):
        import pyarrow.fs as pafs
        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    else:
        path = os.path.abspath(path)
    gpu = uses_gpu(cfg)
    env = worker_env(cfg.ray.verbose)
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
    resources = {"CPU": cfg.compute.cpus_per_worker}
    if cfg.compute.gpus_per_worker > 0:
        resources["GPU"] = cfg.compute.gpus_per_worker
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": cfg, "split": split},  # frozen dataclasses travel as they are
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.compute.workers, use_gpu=cfg.compute.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.compute.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.output.keep_last or None),
                             worker_runtime_env={"env_vars": env},
                             # Ray Train's own lines (worker group start, checkpoint reports): its logs only
                             logging_config=LoggingConfig(log_level="INFO" if cfg.ray.verbose else "WARNING")),
    )
    return trainer.fit()
