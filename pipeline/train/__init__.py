"""The train job: ENAT with DeepSpeed under Ray Train (or torchrun), tracked in MLflow.

    config.py   TrainJobConfig: its sections, PRESETS (the paper's recipes) and RENAMED (old keys)
    launch.py   Ray Train (run_ray) or a plain launcher: the RayContext / LocalContext a worker runs under
    loop.py     train_loop: the steps every worker runs
    engine.py   the worker's state: DeepSpeed engine, EMA from the fp32 masters, RNG streams, checkpoints
    monitor.py  rank 0's MLflow run, step metrics and sample grid
"""
from pipeline.train.config import TrainJobConfig, batch_split, uses_gpu
from pipeline.train.engine import (TrainState, deepspeed_config, engine_ema_update, generators, rank_seed,
                                   rng_state, set_rng_state)
from pipeline.train.launch import LocalContext, RayContext, run_ray
from pipeline.train.loop import train_loop, with_position

__all__ = ["TrainJobConfig", "batch_split", "uses_gpu", "TrainState", "deepspeed_config", "engine_ema_update",
           "generators", "rank_seed", "rng_state", "set_rng_state", "LocalContext", "RayContext", "run_ray",
           "train_loop", "with_position"]
