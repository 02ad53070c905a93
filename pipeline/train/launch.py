"""How training is launched: Ray Train (``run_ray``) or a plain launcher (torchrun / ``deepspeed``).

One train loop (:func:`pipeline.train.loop.train_loop`) serves both; what differs is a small context
object: :class:`RayContext` (ranks from Ray Train's context, metrics told to ``ray.train.report``) and
:class:`LocalContext` (ranks from the environment). Both keep checkpoints in the run's
:class:`~pipeline.train.checkpoints.CheckpointStore` on ``output.uri``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from pipeline import storage
from pipeline.cluster import keep_freed_memory
from pipeline.shards import SplitInfo
from pipeline.train.checkpoints import CheckpointStore
from pipeline.train.config import TrainJobConfig, uses_gpu


class RayContext:
    """Ranks through Ray Train's context; checkpoints in this run's :class:`CheckpointStore`, with Ray told the
    metrics only (see pipeline.train.checkpoints for why Ray keeps no checkpoint of its own)."""

    def __init__(self, cfg: TrainJobConfig) -> None:
        import ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.store = checkpoint_store(cfg)
        self.resume_from = cfg.output.resume_from

    def restore(self) -> Optional[str]:
        """A local directory holding the checkpoint to resume from, or None."""
        return self.store.restore(self.rank, self.resume_from)

    def report(self, metrics: dict, ckpt_dir: Optional[str], name: Optional[str]) -> None:
        import ray.train
        if ckpt_dir is not None:
            self.store.save(ckpt_dir, name, self.rank, metrics["step"])
        ray.train.report({**metrics, **({"checkpoint": name} if name else {})})


class LocalContext:
    """torchrun / deepspeed launcher: ranks from the environment, checkpoints in the same store."""

    def __init__(self, cfg: TrainJobConfig) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.store = checkpoint_store(cfg)
        self.resume_from = cfg.output.resume_from

    def restore(self) -> Optional[str]:
        return self.store.restore(self.rank, self.resume_from)

    def report(self, metrics: dict, ckpt_dir: Optional[str], name: Optional[str]) -> None:
        if ckpt_dir is not None:
            self.store.save(ckpt_dir, name, self.rank, metrics["step"])


def checkpoint_store(cfg: TrainJobConfig) -> CheckpointStore:
    """The checkpoints of this run: ``output.uri``/``train.run_name``."""
    return CheckpointStore(storage.join(cfg.output.uri, cfg.train.run_name), cfg.storage, cfg.output.keep_last)


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


@dataclass
class TrainResult:
    """What a Ray Train run left: the URL of its newest committed checkpoint and Ray's final metrics."""

    checkpoint: Optional[str]
    metrics: Optional[dict]
    error: Optional[BaseException] = None


def _end_on_user_error():
    """A Ray Train callback (runs in the controller) that ends the run at once when a worker failed with a
    deterministic error (a damaged shard or checkpoint, a bad value: pipeline.cluster.user_error knows it):
    the same input would fail the same way on every one of ``compute.max_failures`` restarts. An error
    raised here ends the controller's run without a retry (Ray's failure policy retries only worker-group
    errors); lost workers and nodes are still restarted."""
    from ray.train.v2.api.callback import UserCallback

    from pipeline.cluster import user_error
    from pipeline.errors import UserError

    class EndOnUserError(UserCallback):
        def after_exception(self, run_context, worker_exceptions):
            for rank in sorted(worker_exceptions):
                message = user_error(worker_exceptions[rank])
                if message is not None:
                    _quiet_controller_log()
                    raise UserError(message)

    return EndOnUserError()


def _quiet_controller_log() -> None:
    """In the controller: drop its "Error in control loop iteration" record (a traceback through Ray's
    internals) for the UserError raised above; the driver prints the error's one line."""
    import logging

    from pipeline.errors import UserError

    class NotUserError(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not (record.exc_info and isinstance(record.exc_info[1], UserError))

    log = logging.getLogger("ray.train.v2._internal.execution.controller.controller")
    if not any(isinstance(f, NotUserError) for f in log.filters):
        log.addFilter(NotUserError())


def run_ray(cfg: TrainJobConfig, split: SplitInfo) -> TrainResult:
    """Run training under Ray Train. ``split`` is the token split the driver opened (its dataset.json and
    manifest travel to the workers). Resumes from the newest intact checkpoint of the same run name in
    storage, restarts lost workers (``compute.max_failures``) and ends at once on a deterministic error."""
    from ray.train import FailureConfig, LoggingConfig, RunConfig, ScalingConfig
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
                             callbacks=[_end_on_user_error()],
                             worker_runtime_env={"env_vars": env},
                             # Ray Train's own lines (worker group start, checkpoint reports): its logs only
                             logging_config=LoggingConfig(log_level="INFO" if cfg.ray.verbose else "WARNING")),
    )
    result = trainer.fit()
    return TrainResult(checkpoint_store(cfg).latest(), result.metrics, result.error)
