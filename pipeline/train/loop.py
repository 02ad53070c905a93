"""The train loop every worker runs (under Ray Train or torchrun): reuse training (enat.lsimple) of a
DeepSpeed engine with an EMA model, checkpoints every ``output.checkpoint_every`` steps, exact resume.

Only rank 0 talks to MLflow. The recipe defaults are the paper's (enat-facts §5).
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from typing import Iterator, Optional

import torch

import enat
from pipeline.cluster import user_error
from pipeline.errors import UserError
from pipeline.models import model_config
from pipeline.readers import make_reader
from pipeline.shards import SplitInfo
from pipeline.train import monitor
from pipeline.train.config import TrainJobConfig, batch_split
from pipeline.train.engine import TrainState, engine_ema_update
from pipeline.train.launch import LocalContext, RayContext, init_worker


def train_loop(config: dict) -> None:
    """Per-worker entry (Ray Train's ``train_loop_per_worker``, or called directly under torchrun):
    ``config = {"config": TrainJobConfig, "split": SplitInfo}``, the split as the driver opened it."""
    cfg: TrainJobConfig = config["config"]
    ctx = LocalContext(cfg) if cfg.launcher == "torchrun" else RayContext(cfg)
    try:
        _train(cfg, config["split"], ctx)
    except Exception as e:
        message = user_error(e) if cfg.launcher == "ray" else None
        if message is None:
            raise
        # a deterministic error (a damaged shard or checkpoint, a bad value): one line from this rank, and
        # the run ends at once (launch._end_on_user_error) with that line on the driver. Ray Train would
        # log the whole traceback of every rank; the line says what to fix.
        print(f"[train] rank {ctx.rank}: error: {message}", flush=True)
        _drop_next_traceback_log()
        raise UserError(message) from None


def _drop_next_traceback_log() -> None:
    """Ray Train's worker logs "Error in training function:" and the traceback of what the train function
    raised (ray/train/v2/_internal/util.py); for a deterministic error this rank printed its one line."""
    import logging

    class Once(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if str(record.msg).startswith("Error in training function"):
                log.removeFilter(self)
                return False
            return True

    log = logging.getLogger("ray.train.v2._internal.util")
    log.addFilter(Once())


def _train(cfg: TrainJobConfig, split: SplitInfo, ctx) -> None:
    # 1. device, process group, model config, this rank's reader (its own slice of every global batch)
    device = init_worker(cfg, ctx.local_rank)
    mcfg = model_config(cfg.model, dataset=split.dataset)
    micro, accum = batch_split(cfg)
    reader = make_reader(replace(cfg.data, batch_size=micro), rank=ctx.rank, world_size=ctx.world_size,
                         storage_cfg=cfg.storage, info=split)

    # 2. engine + EMA + RNG streams, restored from the newest intact checkpoint (or output.resume_from); (epoch, batch) is the whole
    #    data position, so the reader resumes exactly
    state = TrainState.build(cfg, mcfg, device, ctx.rank, null_text=reader.empty_context)
    restore_dir = ctx.restore()
    if restore_dir is not None:
        state.restore(restore_dir, accum)
        shutil.rmtree(restore_dir, ignore_errors=True)  # the verified download; the checkpoint stays on storage
        if ctx.rank == 0:
            print(f"[train] resumed from step {state.step} (epoch {state.epoch}, batch {state.epoch_batch})",
                  flush=True)
    reader.load_state_dict({"epoch": state.epoch, "step": state.epoch_batch})

    # 3. rank 0's MLflow run (the same run across restarts), with the token split as its input
    tracker = monitor.start_tracking(cfg, mcfg, state.run_id) if ctx.rank == 0 else None
    if tracker:
        state.run_id = tracker.run_id
        if not tracker.resumed:
            monitor.log_dataset(tracker, cfg, split)
    prompts = None  # text models: the grid's fixed captions, from the first batch

    # 4. the steps
    meter = monitor.Meter(cfg, mcfg, ctx.rank, ctx.world_size, device)
    ckpt_name: Optional[str] = None
    micro_i = 0
    while state.step < cfg.train.steps:
        for batch, position in with_position(reader):
            if tracker and prompts is None and mcfg.text_conditioned:
                prompts = monitor.grid_prompts(cfg, batch)
            metrics = _micro_step(cfg, mcfg, state, batch, device, meter)
            micro_i += 1
            if micro_i % accum:
                continue
            state.step += 1
            state.epoch, state.epoch_batch = position
            engine_ema_update(state.engine, state.ema, cfg.train.ema_rate)
            last = state.step >= cfg.train.steps
            if state.step % cfg.train.log_every == 0 or last:
                meter.log(tracker, state.engine, state.step, state.epoch, metrics)
            if tracker and cfg.mlflow.grid_every and (state.step % cfg.mlflow.grid_every == 0 or last):
                monitor.log_grid(tracker, state.ema, mcfg, cfg, split.dataset, state.step, prompts)
            if state.step % cfg.output.checkpoint_every == 0 or last:
                ckpt_name = state.save(ctx, cfg, mcfg)
            if last:
                break

    # 5. the final grid, the run's pointer to the final EMA checkpoint, its registered model version
    if tracker:
        if not cfg.mlflow.grid_every:
            monitor.log_grid(tracker, state.ema, mcfg, cfg, split.dataset, state.step, prompts)
        monitor.finish(tracker, cfg, mcfg, split, state.step, ckpt_name)


def _micro_step(cfg: TrainJobConfig, mcfg: enat.ENATConfig, state: TrainState, batch: dict,
                device: torch.device, meter: monitor.Meter) -> dict:
    """Forward + backward of one micro-batch (DeepSpeed steps the optimizer at the accumulation boundary)."""
    tokens = batch["tokens"].to(device, non_blocking=True)
    cond = batch["context"].to(device) if mcfg.text_conditioned else batch["label"].to(device)
    loss, metrics = train_step(cfg, state, tokens, cond)
    meter.add(loss, tokens.shape[0])
    return metrics


def train_step(cfg: TrainJobConfig, state: TrainState, tokens: torch.Tensor, cond: torch.Tensor,
               reuse: Optional[bool] = None) -> tuple[torch.Tensor, dict]:
    """One micro-step on the engine: the objective, ``engine.backward``, ``engine.step`` -> (loss, metrics).
    `reuse` forces the reuse branch (benchmarks); None draws the shared coin. The EMA update is the
    caller's, once per optimizer step (``engine_ema_update``)."""
    state.engine.train()
    # differs from official (one coin per process): all ranks take the reuse branch together.
    # DeepSpeed ZeRO reduces gradients in buckets in the order they become ready, so every
    # rank must run the same graph (the official DDP has static buckets).
    coin = bool(torch.rand(1, generator=state.shared_gen).item() < cfg.objective.reuse_prob)
    reuse = coin if reuse is None else reuse
    loss, metrics = enat.lsimple(state.engine, tokens, cond, state.ema, cfg.objective, state.gen, reuse=reuse)
    state.engine.backward(loss)
    state.engine.step()
    return loss, metrics


def with_position(reader) -> Iterator[tuple[dict, tuple[int, int]]]:
    """One epoch of `reader`'s batches, each with the data position after it: (epoch, micro-batch) of
    the next batch, and (epoch + 1, 0) after an epoch's last batch, so a resume from a checkpoint
    taken there starts the next epoch instead of replaying this one (a stream's length is known only
    when it ends: the next batch is fetched before the current one is handed out)."""
    it = iter(reader)
    batch = next(it, None)
    while batch is not None:
        pos = (reader.epoch, reader.step)
        nxt = next(it, None)
        if nxt is None:  # the reader moved on to (epoch + 1, 0)
            pos = (reader.epoch, reader.step)
        yield batch, pos
        batch = nxt
