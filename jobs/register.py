"""Register any training checkpoint in the MLflow model registry: ``enat register <checkpoint> [options]``.

Training registers its final EMA weights itself (``mlflow.register``); this does the same for any other
checkpoint, e.g. an intermediate one that scored better::

    enat register s3://enat-checkpoints/enat-l-256/step_000400000 --alias candidate
    enat sample --config infra/configs/sample-imagenet256-enat-l.yaml model.checkpoint=models:/enat-l-256@candidate

The checkpoint folder's ``config.json`` (written by the train job) gives the step, the model config, the
training run (the version is logged into it) and its tracking URI. The weights are not copied: the
version points at ``<checkpoint>/ema.pt`` where it is.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from pipeline import storage, tracking
from pipeline.config import ConfigError, absolute_location


def main(argv: Optional[Sequence[str]] = None) -> dict:
    p = argparse.ArgumentParser(prog="enat register", description=__doc__.split("\n")[0])
    p.add_argument("checkpoint", help="a checkpoint folder written by enat train (…/<run>/step_000001000)")
    p.add_argument("--name", help="registered model name (default: the training run name)")
    p.add_argument("--alias", action="append", default=[], help="alias to move to the new version (repeatable)")
    p.add_argument("--tracking-uri", help="default: the one the training run used")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint of the checkpoint's storage")
    args = p.parse_args(argv)
    ckpt = absolute_location(args.checkpoint.rstrip("/"))
    if ckpt.endswith("/ema.pt"):
        ckpt = ckpt[: -len("/ema.pt")]
    store = {"endpoint_url": args.endpoint_url} if args.endpoint_url else None
    try:
        doc = json.loads(storage.read_url(storage.join(ckpt, "config.json"), store))
    except FileNotFoundError:
        raise ConfigError(f"checkpoint: {storage.redact(ckpt)}/config.json does not exist; give a checkpoint "
                          f"folder written by enat train") from None
    train = doc.get("train", {})
    mlflow_cfg = train.get("mlflow", {})
    uri = args.tracking_uri or mlflow_cfg.get("tracking_uri")
    name = args.name or mlflow_cfg.get("model_name") or train.get("train", {}).get("run_name")
    run_id = doc.get("mlflow_run_id")
    if run_id and tracking.run_exists(uri, run_id):
        run = tracking.start_run(uri, run_id=run_id, owns=False)
    else:  # a checkpoint from before run ids were recorded: a run of its own holds the pointer
        run = tracking.start_run(uri, mlflow_cfg.get("experiment") or "enat", run_name=f"register-{name}")
    data = train.get("data", {})
    meta = {"model_config": doc.get("model"), "dataset": {"uri": data.get("root"), "split": data.get("split")}}
    version = run.register_checkpoint(name, storage.join(ckpt, "ema.pt"), int(doc.get("step", 0)), meta,
                                      tuple(args.alias))
    run.end()
    out = {"name": name, "version": version, "uri": f"models:/{name}/{version}", "aliases": args.alias}
    print(json.dumps(out), flush=True)
    return out


if __name__ == "__main__":
    from pipeline.cluster import cli

    sys.exit(cli(main, sys.argv[1:], "register"))
