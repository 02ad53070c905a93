"""What a person sees: the demo's tokenize stage and a short training job, run as a user runs them (fresh
processes, the embedded local Ray), print a readable log; user-caused errors end in one line."""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, free_port

SCRIPT = r"""
import sys
from pathlib import Path
import torch
from enat.patch_vq import PatchVQ
from jobs import demo, tokenize, train

out = Path(sys.argv[1])
demo.write_data(out / "data", 30)
imgs, _ = demo.digits(30)
tok = PatchVQ.fit(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, codebook_size=demo.CODEBOOK,
                  patch=demo.PATCH, iters=3, seed=0)
torch.save(tok.state_dict(), out / "tok.pt")
tracking = f"sqlite:///{out}/mlflow.db"
tokenize.main([f"source.root={out / 'data' / 'imagenet'}", "tokenizer.kind=patch", f"tokenizer.weights={out / 'tok.pt'}",
               f"image.resolution={demo.RES}", "tokenize.samples_per_shard=100", f"output.uri={out / 'tokens'}",
               f"mlflow.tracking_uri={tracking}"])
train.main([f"data.root={out / 'tokens'}", "model.preset=enat-s", "model.dim=32", "model.encoder_depth=1",
            "model.decoder_depth=1", "model.num_heads=2", "deepspeed.precision=fp32", "train.global_batch=16",
            "train.steps=3", "train.log_every=1", f"output.uri={out / 'ckpt'}", "output.checkpoint_every=3",
            f"mlflow.tracking_uri={tracking}", "train.run_name=readable"])
"""

# a warning or error line of our code, Python's warnings, Ray's Python loggers or its C++ core (" E 1234 1234]")
PROBLEM = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Warning:| [EWF] \d+ \d+\]|Traceback")


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "MLFLOW_"))}
    env.pop("RAY_ADDRESS", None)
    env.update(HOME=str(home), PYTHONPATH=str(REPO), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               # DeepSpeed's compiled CPU op stays where this machine already built it
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR",
                                                   str(Path.home() / ".cache" / "torch_extensions")))
    return env


def test_tokenize_and_train_print_a_readable_log(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "out")], cwd=tmp_path, env=_env(home),
                       capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    lines = [ln.strip() for ln in log.replace("\r", "\n").splitlines() if ln.strip()]
    problems = [i for i, ln in enumerate(lines) if PROBLEM.search(ln)]
    assert not problems, "\n".join(lines[max(0, problems[0] - 5):problems[0] + 40])
    # the resolved configs are YAML (indented / "key:" lines); every other line is said once or a few times
    prose = [ln for ln in lines if not re.match(r"^(-\s|[\w.]+:(\s|$))", ln) and not ln.startswith("tokenize:")]
    repeated = {ln: n for ln, n in collections.Counter(prose).items() if n > 3}
    assert not repeated, repeated
    assert sum("[train] step 3/3" in ln for ln in lines) == 1              # rank 0's line, once
    assert sum("Ray's own logs:" in ln for ln in lines) == 2               # where Ray's logs are, once per job
    assert len(lines) < 250, len(lines)
    assert not (home / ".ray").exists()                                     # no token file in the user's home


def _job(args: list[str], tmp_path: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**_env(home), "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
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
