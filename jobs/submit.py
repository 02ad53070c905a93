"""Submit a job to a Ray cluster: ``enat submit [--address URL] [options] -- <command> [args ...]``.

    enat submit --address http://head:8265 -- train --config infra/configs/train-imagenet256-enat-l.yaml
    enat submit --no-wait -- sample --config infra/configs/sample-imagenet256-enat-l.yaml plan.num_samples=5000

<command> is one of tokenize, train, sample, fid-stats; the entrypoint becomes `python -m jobs.<command> ...`
with this checkout as the working directory (virtual envs, outputs and weights excluded). The address comes
from --address, else RAY_ADDRESS / RAY_API_SERVER_ADDRESS. MLFLOW_TRACKING_URI and AWS endpoint settings
of this shell are forwarded (never credentials: the cluster brings its own). With Ray's token auth (the
default since Ray 2.60) the token is read from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
Follows the logs until the job ends; the exit status is 0 only if it succeeded.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

COMMANDS = {"tokenize": "jobs.tokenize", "train": "jobs.train", "sample": "jobs.sample", "fid-stats": "jobs.fid_stats"}
EXCLUDES = [".venv", ".venv-*", ".git", "runs", "demo-out", "mlruns", "mlartifacts", "*.db", "*.pt", "*.pth",
            "*.ckpt", "*.npz", ".official", "__pycache__", ".pytest_cache"]
FORWARD_ENV = ("MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "DS_ACCELERATOR")


def auth_headers() -> dict[str, str]:
    """`Authorization: Bearer <token>` when a Ray auth token is available."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or str(Path.home() / ".ray" / "auth_token")
        if os.path.exists(path):
            token = Path(path).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def build(args: argparse.Namespace) -> tuple[str, dict, str]:
    """-> (entrypoint, runtime_env, submission_id)."""
    if not args.command or args.command[0] not in COMMANDS:
        raise SystemExit(f"enat submit: give a command after --: one of {', '.join(COMMANDS)}")
    cmd, rest = args.command[0], args.command[1:]
    import shlex
    entrypoint = " ".join(["python", "-m", COMMANDS[cmd], *map(shlex.quote, rest)])
    env = {k: os.environ[k] for k in FORWARD_ENV if os.environ.get(k)}
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env: dict = {"working_dir": args.working_dir, "excludes": EXCLUDES, "env_vars": env}
    if args.runtime_env_json:
        extra = json.loads(args.runtime_env_json)
        runtime_env["env_vars"] = {**env, **extra.pop("env_vars", {})}
        runtime_env.update(extra)
    digest = hashlib.sha1(entrypoint.encode()).hexdigest()[:8]
    sub_id = args.submission_id or f"enat-{cmd}-{digest}-{time.strftime('%Y%m%d-%H%M%S')}"
    return entrypoint, runtime_env, sub_id


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(prog="enat submit", description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", help="Ray dashboard URL (default: RAY_ADDRESS / RAY_API_SERVER_ADDRESS)")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working directory (default: .)")
    p.add_argument("--submission-id", help="job id (default: enat-<command>-<hash>-<time>); a reused id is refused")
    p.add_argument("--runtime-env-json", help="extra runtime_env as JSON (merged; env_vars are added)")
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    args = p.parse_args(argv)
    args.command = command
    address = args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SystemExit("enat submit: no cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS")
    entrypoint, runtime_env, sub_id = build(args)
    from ray.job_submission import JobStatus, JobSubmissionClient
    client = JobSubmissionClient(address, headers=auth_headers() or None)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=sub_id)
    print(f"[submit] {job_id}: {entrypoint}", flush=True)
    if args.no_wait:
        return 0
    done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    shown = 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            print(logs[shown:], end="", flush=True)
            shown = len(logs)
        if status in done:
            break
        time.sleep(1.0)
    print(f"[submit] {job_id}: {status.value}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
