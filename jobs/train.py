"""Train ENAT: ``python -m jobs.train [--preset NAME] [--config train.yaml] [section.field=value ...]``.

Locally this starts an embedded Ray on 127.0.0.1; under ``ray job submit`` it joins the cluster::

    python -m jobs.train --config infra/configs/train-imagenet256-enat-l.yaml
    python -m jobs.train --preset imagenet-256 data.root=s3://tokens/imagenet256 output.uri=s3://ckpt
    ray job submit --working-dir . -- python -m jobs.train --config train.yaml compute.workers=16 \
        compute.gpus_per_worker=1
    torchrun --nproc-per-node 8 -m jobs.train --config train.yaml launcher=torchrun compute.gpus_per_worker=1

torchrun runs without Ray. Presets (the paper's recipes, without storage locations): imagenet-256,
imagenet-512, coco-256.
Checkpoints go to ``output.uri``/``train.run_name``/``step_*``. Re-running the same command (same
``train.run_name``) resumes from the latest checkpoint, and appends to the same MLflow run. The config is
validated (and the token dataset opened, once: the workers get what the driver read) before any worker starts.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

from pipeline.config import ConfigError, dump_config, parse_job_args
from pipeline.models import model_config
from pipeline.shards import SplitInfo, open_split
from pipeline.cluster import preflight, ray_session, user_error
from pipeline.storage import redact
from pipeline.train import TrainJobConfig, run_ray, train_loop, uses_gpu


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainJobConfig:
    return parse_job_args(TrainJobConfig, argv, "python -m jobs.train", __doc__.split("\n")[0])


def validate(cfg: TrainJobConfig) -> SplitInfo:
    """Checks that need the data, before any worker starts: the dataset exists and the model fits it.
    -> the split (dataset.json and manifest), handed to the workers."""
    try:
        split = open_split(cfg.data.root, cfg.data.split, cfg.storage)
    except FileNotFoundError as e:
        raise ConfigError(f"data.root: {e}; point it at a token dataset written by enat tokenize") from None
    mcfg = model_config(cfg.model, dataset=split.dataset)
    if not split.dataset.get("num_classes") and not mcfg.text_conditioned:
        raise ConfigError(f"data.root: {redact(cfg.data.root)} has neither class labels nor text features")
    return split


def main(argv: Optional[Sequence[str]] = None) -> Any:
    cfg = parse_args(argv)
    print("[train] config:\n" + redact(dump_config(cfg)), flush=True)
    split = validate(cfg)
    preflight(cfg)
    if cfg.launcher == "torchrun":
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if uses_gpu(cfg) else "cpu")
        return train_loop({"config": cfg, "split": split})
    with ray_session(cfg.ray, dashboard=True):  # Ray Train queries actor states through it
        result = run_ray(cfg, split)
    if result.error:
        raise SystemExit(f"enat train: error: {user_error(result.error) or result.error}")
    print(f"[train] done; latest checkpoint: {redact(result.checkpoint or 'none')}", flush=True)
    return result


if __name__ == "__main__":
    from pipeline.cluster import cli

    sys.exit(cli(main, sys.argv[1:], "train"))
