"""Tokenize a dataset into webdataset token shards: ``python -m jobs.tokenize --config x.yaml [overrides]``.

Locally this starts an embedded Ray on 127.0.0.1; under ``ray job submit`` (RAY_ADDRESS set) it
joins the cluster::

    python -m jobs.tokenize --config tokenize.yaml tokenize.batch_size=64
    python -m jobs.tokenize --preset imagenet-256 source.root=s3://data/imagenet tokenize.out=s3://tok/in256 \\
        tokenizer.weights=s3://weights/vqgan_jax_strongaug.ckpt tokenize.encode_actors=8 tokenize.actor_num_gpus=1
    ray job submit --working-dir . -- python -m jobs.tokenize --config tokenize.yaml

Rerunning the same command resumes: committed shards are skipped. The resolved config is printed
first and recorded in ``{out}/dataset.json``.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional, Sequence

from pipeline.config import TOKENIZE_PRESETS, TokenizeJobConfig, dump_config, parse_job_args
from pipeline.storage import redact
from pipeline.tokenize import run_tokenize


def parse_args(argv: Optional[Sequence[str]] = None) -> TokenizeJobConfig:
    return parse_job_args(TokenizeJobConfig, argv, "python -m jobs.tokenize", __doc__.split("\n")[0], TOKENIZE_PRESETS)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the job; returns the summary (read / written / converted / rejected per split)."""
    cfg = parse_args(argv)
    print("[tokenize] config:\n" + redact(dump_config(cfg)), flush=True)
    from pipeline.cluster import ray_session

    with ray_session(cfg.ray):
        summary = run_tokenize(cfg, log=lambda m: print(m, flush=True))
    print("[tokenize] summary: " + redact(json.dumps(summary)), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
