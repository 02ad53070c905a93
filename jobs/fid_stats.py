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

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from pipeline.config import dump_config, load_config
from pipeline.sampling import FidStatsJobConfig, run_fid_stats
from pipeline.storage import redact


def parse_args(argv: Optional[Sequence[str]] = None) -> FidStatsJobConfig:
    p = argparse.ArgumentParser(prog="python -m jobs.fid_stats", description=__doc__.split("\n")[0],
                                epilog="Every field of the config can be overridden as section.field=value.")
    p.add_argument("--config", help="YAML file holding a FidStatsJobConfig")
    p.add_argument("overrides", nargs="*", help="section.field=value (a leading -- is accepted)")
    args, extra = p.parse_known_args(argv)
    unknown = [a for a in extra if not (a.startswith("--") and "=" in a)]
    if unknown:
        p.error(f"unrecognized arguments: {' '.join(unknown)}")
    base: dict[str, Any] = {}
    if args.config:
        import yaml

        with open(args.config, encoding="utf-8") as f:
            base = yaml.safe_load(f) or {}
    return load_config(FidStatsJobConfig, base, list(args.overrides) + extra)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Run the job; returns {stats (URL of fid_stats.npz), sha256, n, rejected, …}."""
    cfg = parse_args(argv)
    print("[fid-stats] config:\n" + redact(dump_config(cfg)), flush=True)
    from pipeline.tokenize import init_ray

    started = init_ray(cfg.ray)
    try:
        summary = run_fid_stats(cfg, log=lambda m: print(m, flush=True))
    finally:
        if started:
            import ray

            ray.shutdown()
    print("[fid-stats] results: " + redact(json.dumps(summary)), flush=True)
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
