"""`enat submit` against the session's Ray cluster (its head's dashboard on loopback), through the job API: a
real tokenize job joins the cluster (no embedded Ray of its own) and succeeds; a failing job exits non-zero
with its error in the logs."""
from __future__ import annotations

import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from jobs import submit
from tests.services import HANG_GUARD_S

ROOT = Path(__file__).resolve().parents[1]


def test_submit_success_failure_and_token(ray_cluster, tmp_path, monkeypatch, capsys, make_folder):
    import torch

    from enat.patch_vq import PatchVQ

    data = make_folder(tmp_path / "src", per_class=3, bad=False)
    weights = tmp_path / "patch.pt"
    torch.save(PatchVQ.fit(torch.rand(16, 3, 32, 32), codebook_size=16, patch=8, iters=2, seed=0).state_dict(),
               weights)
    out = tmp_path / "out"
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "source": {"kind": "imagefolder", "root": str(data.root), "splits": ["train"]}, "image": {"resolution": 32},
        "tokenizer": {"kind": "patch", "weights": str(weights)}, "output": {"uri": str(out)},
        "tokenize": {"samples_per_shard": 5, "rows_per_entry": 2, "batch_size": 4},
        "compute": {"cpus_per_worker": 0.5, "decode_cpus": 1.0, "progress": False}, "mlflow": {"enabled": False}}))
    monkeypatch.chdir(ROOT)
    url = f"http://{ray_cluster.dashboard}"
    # the real tokenize entrypoint under `ray job submit`: it joins the head's Ray
    deadline = time.time() + HANG_GUARD_S
    while True:  # the dashboard answers before its job agent is ready ("No available agent")
        try:
            assert submit.main(["--address", url, "--", "tokenize", "--config", str(cfg)]) == 0
            break
        except RuntimeError as e:
            assert "agent" in str(e) and time.time() < deadline, e
            time.sleep(0.5)
    out_text = capsys.readouterr().out
    assert f"python -m jobs.tokenize --config {cfg}" in out_text and "SUCCEEDED" in out_text
    assert "[tokenize] summary" in out_text and "Started a local Ray instance" not in out_text
    # a job that fails (an unknown config field) gives a non-zero exit and its error in the logs
    assert submit.main(["--address", url, "--", "train", "data.root=/nonexistent", "train.stepz=1"]) == 1
    out_text = capsys.readouterr().out
    assert "stepz" in out_text and "FAILED" in out_text
    man = pq.read_table(out / "train" / "manifest.parquet").to_pylist()
    assert sum(m["samples"] for m in man) == len(data.files)
    # token auth: the header comes from RAY_AUTH_TOKEN_PATH
    tok = tmp_path / "token"
    tok.write_text("abc123\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tok))
    assert submit.auth_headers() == {"Authorization": "Bearer abc123"}


def test_submit_needs_an_address_and_a_command(monkeypatch, capsys):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    import pytest

    from jobs import tokenize
    with pytest.raises(SystemExit) as e:  # what `enat submit -- tokenize --help` prints on the cluster
        tokenize.main(["--help"])
    assert e.value.code == 0 and "section.field=value" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="address"):
        submit.main(["--", "train"])
    with pytest.raises(SystemExit, match="one of"):
        submit.main(["--address", "http://127.0.0.1:1", "--", "bogus"])
