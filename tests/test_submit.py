"""`enat submit` against a real local Ray head (ray start --head on loopback), through the job API."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from jobs import submit
from tests.conftest import local_ray_head, service_env

ROOT = Path(__file__).resolve().parents[1]


def test_submit_success_failure_and_token(tmp_path, monkeypatch, capsys):
    env = {**os.environ, **service_env(), "RAY_AUTH_MODE": "disabled",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    monkeypatch.chdir(ROOT)
    with local_ray_head(env) as url:
        assert submit.main(["--address", url, "--", "tokenize", "--help"]) == 0
        out = capsys.readouterr().out
        assert "python -m jobs.tokenize --help" in out and "section.field=value" in out and "SUCCEEDED" in out
        # a job that fails (an unknown config field) gives a non-zero exit and its error in the logs
        assert submit.main(["--address", url, "--", "train", "data.root=/nonexistent", "train.stepz=1"]) == 1
        out = capsys.readouterr().out
        assert "stepz" in out and "FAILED" in out
    # token auth: the header comes from RAY_AUTH_TOKEN_PATH
    tok = tmp_path / "token"
    tok.write_text("abc123\n")
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tok))
    assert submit.auth_headers() == {"Authorization": "Bearer abc123"}


def test_submit_needs_an_address_and_a_command(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    import pytest
    with pytest.raises(SystemExit, match="address"):
        submit.main(["--", "train"])
    with pytest.raises(SystemExit, match="one of"):
        submit.main(["--address", "http://127.0.0.1:1", "--", "bogus"])
