"""Reference FID statistics from real images: ``python -m jobs.fid_stats --config x.yaml [overrides]``.

Writes ``{output.uri}/fid_stats.npz`` with ``mu`` [2048] and ``sigma`` [2048, 2048] (pytorch-fid's
``--save-stats`` format, what ``fid.reference`` of the sample job reads), computed with the FID Inception
on center crops (ADM / the official preprocessing) of every image in a folder (recursively) or in
webdataset tars, or on the images of an ADM reference batch (``source.kind=adm_npz``)::

    python -m jobs.fid_stats source.root=s3://data/coco/val2014 source.resolution=256 \\
        inception.weights=s3://weights/pt_inception-2015-12-05-6726825d.pth output.uri=s3://stats/coco256-val
    ray job submit --working-dir . -- python -m jobs.fid_stats --config stats.yaml compute.workers=8 \\
        compute.gpus_per_worker=1

Undecodable files are skipped, counted and listed in ``{output.uri}/manifest.json``. A rerun resumes
(``output.overwrite=true`` redoes units made from other images or weights).
"""
from __future__ import annotations

import sys
from typing import Any, Optional, Sequence

from pipeline.cluster import run_job
from pipeline.config import parse_job_args
from pipeline.sample import FidStatsJobConfig, run_fid_stats


def parse_args(argv: Optional[Sequence[str]] = None) -> FidStatsJobConfig:
    return parse_job_args(FidStatsJobConfig, argv, "python -m jobs.fid_stats", __doc__.split("\n")[0])


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the job; returns {stats (URL of fid_stats.npz), sha256, n, rejected, …}."""
    return run_job(parse_args(argv), "fid-stats", run_fid_stats)


if __name__ == "__main__":
    from pipeline.cluster import cli

    sys.exit(cli(main, sys.argv[1:], "fid-stats"))
