"""Reference FID statistics from real images: ``python -m jobs.fid_stats --config x.yaml [overrides]``.

Writes ``{output}/fid_stats.npz`` with ``mu`` [2048] and ``sigma`` [2048, 2048] (pytorch-fid's
``--save-stats`` format, what ``fid.reference`` of the sample job reads), computed with the FID Inception
on center crops (ADM / the official preprocessing) of every image in a folder (recursively) or in
webdataset tars::

    python -m jobs.fid_stats source.root=s3://data/coco/val2014 source.resolution=256 \\
        inception.weights=s3://weights/pt_inception-2015-12-05-6726825d.pth output=s3://stats/coco256-val
    ray job submit --working-dir . -- python -m jobs.fid_stats --config stats.yaml compute.actors=8 \\
        compute.actor_num_gpus=1

Undecodable files are skipped, counted and listed in ``{output}/manifest.json``. A rerun resumes.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Optional, Sequence

from pipeline.config import dump_config, parse_job_args
from pipeline.sampling import FidStatsJobConfig, run_fid_stats
from pipeline.storage import redact


def parse_args(argv: Optional[Sequence[str]] = None) -> FidStatsJobConfig:
    return parse_job_args(FidStatsJobConfig, argv, "python -m jobs.fid_stats", __doc__.split("\n")[0])


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the job; returns {stats (URL of fid_stats.npz), sha256, n, rejected, …}."""
    cfg = parse_args(argv)
    print("[fid-stats] config:\n" + redact(dump_config(cfg)), flush=True)
    from pipeline.cluster import ray_session

    with ray_session(cfg.ray):
        summary = run_fid_stats(cfg, log=lambda m: print(m, flush=True))
    print("[fid-stats] results: " + redact(json.dumps(summary)), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
