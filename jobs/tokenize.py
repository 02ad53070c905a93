"""Tokenize a dataset into webdataset token shards: ``python -m jobs.tokenize --config x.yaml [overrides]``.

Locally this starts an embedded Ray on 127.0.0.1; under ``ray job submit`` (RAY_ADDRESS set) it
joins the cluster::

    python -m jobs.tokenize --config tokenize.yaml tokenize.batch_size=64
    python -m jobs.tokenize --preset imagenet-256 source.root=s3://data/imagenet output.uri=s3://tok/in256 \\
        tokenizer.weights=s3://weights/vqgan_jax_strongaug.ckpt compute.workers=8 compute.gpus_per_worker=1
    ray job submit --working-dir . -- python -m jobs.tokenize --config tokenize.yaml

Rerunning the same command resumes: committed shards are skipped. The resolved config is printed
first and recorded in ``{output.uri}/dataset.json``.
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from pipeline.cluster import run_job
from pipeline.config import parse_job_args
from pipeline.tokenize import TokenizeJobConfig, run_tokenize


def parse_args(argv: Optional[Sequence[str]] = None) -> TokenizeJobConfig:
    return parse_job_args(TokenizeJobConfig, argv, "python -m jobs.tokenize", __doc__.split("\n")[0])


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the job; returns the summary (read / written / converted / rejected per split)."""
    return run_job(parse_args(argv), "tokenize", run_tokenize)


if __name__ == "__main__":
    from pipeline.cluster import cli

    sys.exit(cli(main, sys.argv[1:], "tokenize"))
