"""What a person sees when they get something wrong: user-caused errors end in one readable line naming the
field (exit 2, no traceback). The readable log of a whole run (the README's `enat demo` in a fresh process:
tokenize, train, sample) is checked in tests/test_demo.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.services import free_port
from tests.helpers import user_env


def _job(args: list[str], tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**user_env(home), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_user_errors_end_in_one_readable_line(tmp_path):
    cases = [
        (["jobs.tokenize", "tokenize.out=x", "source.root=y"], "tokenize.out: renamed to output.uri"),
        (["jobs.cli", "sample", "model.checkpoint=m.pt", "output.uri=o", "plan.labels=random"],
         "plan.labels: must be one of"),
        (["jobs.train", f"data.root={tmp_path}/nothing"], "data.root: "),
        (["jobs.sample", f"model.checkpoint={tmp_path}/w.pt", "output.uri=o", "model.preset=enat-s",
          f"mlflow.tracking_uri=http://127.0.0.1:{free_port()}"], "mlflow.tracking_uri: cannot reach the MLflow server"),
        (["jobs.tokenize", "source.root=s3://images/imagenet", "output.uri=tokens", "tokenizer.kind=vqgan",
          f"storage.endpoint_url=http://127.0.0.1:{free_port()}", "mlflow.enabled=false"],
         "storage.endpoint_url: cannot reach the object store"),
    ]
    for args, message in cases:
        r = _job(args, tmp_path)
        assert r.returncode == 2, (args, r.stdout[-2000:], r.stderr[-3000:])
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        last = r.stderr.strip().splitlines()[-1]
        assert last.startswith(f"enat {args[1] if args[0] == 'jobs.cli' else args[0][5:].replace('_', '-')}: "
                               f"error: ") and message in last, (args, last)
