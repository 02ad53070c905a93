"""Train ENAT: ``python -m jobs.train --config train.yaml [section.field=value ...]``.

Locally this starts an embedded Ray on 127.0.0.1; under ``ray job submit`` it joins the cluster::

    python -m jobs.train --config infra/configs/train-imagenet256-enat-l.yaml
    ray job submit --working-dir . -- python -m jobs.train --config train.yaml scaling.num_workers=16 scaling.use_gpu=true
    torchrun --nproc-per-node 8 -m jobs.train --config train.yaml launcher=torchrun   # without Ray

Re-running the same command (same ``train.run_name``) resumes from the latest checkpoint, and appends to
the same MLflow run. The config is validated (and the token dataset opened) before any worker starts.
"""
from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from pipeline.config import ConfigError, dump_config, parse_job_args
from pipeline.storage import redact
from pipeline.training import TrainJobConfig, model_config, run_ray, train_loop


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainJobConfig:
    return parse_job_args(TrainJobConfig, argv, "python -m jobs.train", __doc__.split("\n")[0])


def validate(cfg: TrainJobConfig) -> None:
    """Checks that need the data: the dataset exists and the model fits it (before any worker starts)."""
    from pipeline.shards import open_split
    info = open_split(cfg.data.root, cfg.data.split, cfg.storage)
    mcfg = model_config(cfg, info.dataset)
    if not info.dataset.get("num_classes") and not mcfg.text_conditioned:
        raise ConfigError(f"data.root: {redact(cfg.data.root)} has neither class labels nor text features")


def main(argv: Optional[Sequence[str]] = None) -> Any:
    cfg = parse_args(argv)
    print("[train] config:\n" + redact(dump_config(cfg)), flush=True)
    validate(cfg)
    if cfg.launcher == "torchrun":
        from pipeline.config import config_to_dict
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if cfg.scaling.use_gpu else "cpu")
        return train_loop({"config": config_to_dict(cfg)})
    from pipeline.cluster import ray_session
    with ray_session(cfg.ray):
        result = run_ray(cfg)
    if result.error:
        raise SystemExit(f"[train] failed: {result.error}")
    print(f"[train] done; latest checkpoint: {result.checkpoint}", flush=True)
    return result


if __name__ == "__main__":
    main()
