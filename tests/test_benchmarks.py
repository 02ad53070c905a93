"""The benchmark scripts keep working: each runs its tiny smoke mode on CPU (figures are not checked —
benchmarks print figures, tests do not time anything)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import HANG_GUARD_S, child_env

ROOT = Path(__file__).resolve().parents[1]


# vs_official.py, vqgan_speed.py, fid_speed.py, train_throughput.py (with the job's DeepSpeed engine) and
# sample_throughput.py (with the merge) run in their smoke sizes inside gpu_check.sh --smoke below
@pytest.mark.parametrize("script", ["tokenize_throughput.py"])
def test_benchmark_smoke(script, tmp_path):
    env = {**child_env(), "DS_ACCELERATOR": "cpu", "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--tiny"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert r.stdout.strip(), "a benchmark prints its figures"


SECTIONS = ["gpu tests", "sampling vs official", "VQGAN", "FID Inception", "training step",
            "sample job rates + FID-50K time model"]


@pytest.mark.long
def test_gpu_check_smoke_writes_every_section(tmp_path):
    """benchmarks/gpu_check.sh --smoke: the one prepared GPU script, dry-run on the CPU with tiny sizes; it
    writes the markdown block for docs/benchmarks.md with every stage's section and status."""
    env = {**child_env(), "OUT": str(tmp_path), "DS_ACCELERATOR": "cpu", "PYTHON": sys.executable,
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/m.db"}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=HANG_GUARD_S)
    fig = tmp_path / "gpu_figures.md"
    assert fig.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    text = fig.read_text()
    assert r.returncode == 0, text[-4000:] + r.stdout[-2000:]
    assert text.startswith("### GPU figures:") and "device cpu" in text and "Smoke run" in text
    for name in SECTIONS:
        assert f"#### {name}: ok" in text, (name, text[-3000:])
    assert "img/s" in text and "1 passed" in text          # figures and the test summary were captured
