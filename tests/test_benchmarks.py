"""The benchmark scripts keep working: each runs its tiny smoke mode on CPU (figures are not checked —
benchmarks print figures, tests do not time anything)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import service_env

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["vs_official.py", "vqgan_speed.py", "fid_speed.py", "train_throughput.py",
                                    "sample_throughput.py", "tokenize_throughput.py"])
def test_benchmark_smoke(script, tmp_path):
    env = {**os.environ, **service_env(), "DS_ACCELERATOR": "cpu", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.strip(), "a benchmark prints its figures"
