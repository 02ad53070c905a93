"""Output bytes pinned across refactors: the sha256 of a tokenize shard set, of one sample unit's files
and of the merged statistics, from fixed inputs and seeds, recorded before the `pipeline/` redesign
(issue 12) and required unchanged after it.

The inputs are generated here (PNG images from a seeded numpy stream, a PatchVQ with a seeded codebook,
a small random ENAT and a random-weight FID Inception of the real architecture), so nothing depends on
files outside the test. Float results depend on the CPU's kernels: the pins hold for the CPU capability
and torch version they were recorded with (``PLATFORM``); on another one the test says so and skips.
Re-record (only when an output format changes on purpose) with ``ENAT_RECORD_PINS=1``: it prints the
new table.
"""
from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import fid_recipe_state_dict, random_model, tiny_config

# stats and fid_stats re-recorded 2026-11-29: the Inception runs conv+BN folded (enat.inception fused path,
# features within ~3e-7 relative of the plain path, tests/test_equiv_sample_job.py); the other pins unchanged
PLATFORM = {"torch": "2.13.0", "cpu": "AVX512"}
PINS = {
    "tokens/train/train-000000.tar": "3da2c42151426e738fa46f30eb532b4bf1ef8c930257cc0592b290750ddd3e65",
    "tokens/train/train-000001.tar": "3aad1b1be7d4bb5b7c82899332d40c93bec802e299b15b39f3eb9618872731c6",
    "tokens/train/train-000002.tar": "a51d87386261895e30feeb017c7c4b31806e1e857432b522c3e4244dc1944938",
    "samples/images/000000.tar": "d1b70b336dfa5bc99ca7aeb500c8e0cb1c848882f762a9ac546b12e72cc94dad",
    "samples/npz/000000.npz": "554c128a362a00dd0299cef43fe88fb0ccdebd3f3ecd8c198765f01a6f692135",
    "samples/stats/000000.npz": "9d04235c06e6bfe720b3b9a610124f7a3c97f91cccbe7f540d5aee5468bdeee6",
    "samples/stats/000001.npz": "1bc3830bc79598700eeb2b4bfbcc4683ad5ac0afe4799dae51003e9a86168d59",
    "samples/fid_stats.npz": "f8817d6092dcacb93dafa97f784bd54c830db42b3db15a0ca21ee4a60e6d3937",
    "samples/grid.png": "348d677497415c2243fdde00161a942897197c7505bfcdf25c1f59fa1bc75a38",
    "real/fid_stats.npz": "44a8a198da4ccf6b39deb691120a45a424c095b3c9c14d90ee4995ef653e0c65",
}


def _platform() -> dict:
    return {"torch": torch.__version__.split("+")[0], "cpu": torch.backends.cpu.get_cpu_capability()}


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _images(root: Path) -> None:
    rng = np.random.default_rng(12)
    for c in ("n01", "n02"):
        for i in range(5):
            w, h = (int(x) for x in rng.integers(36, 60, 2))
            small = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
            (root / "train" / c).mkdir(parents=True, exist_ok=True)
            Image.fromarray(small).resize((w, h), Image.BILINEAR).save(root / "train" / c / f"{c}_{i}.png")


def _run(module: str, cfg: dict, tmp_path: Path) -> dict:
    import importlib

    path = tmp_path / f"{module}-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return importlib.import_module(f"jobs.{module}").main(["--config", str(path)])


@pytest.fixture(scope="module")
def outputs(ray_local, tmp_path_factory) -> dict[str, str]:
    from enat import FIDInception
    from enat.patch_vq import PatchVQ

    d = tmp_path_factory.mktemp("pinned")
    _images(d / "images")
    tok = PatchVQ(32, 8, codebook=torch.rand(32, 3 * 8 * 8, generator=torch.Generator().manual_seed(5)))
    torch.save(tok.state_dict(), d / "patch_vq.pt")
    torch.save(random_model(tiny_config(codebook_size=32, num_classes=2), seed=4).state_dict(), d / "enat.pt")
    layout = [(k, tuple(v.shape)) for k, v in FIDInception().state_dict().items()]
    torch.save(fid_recipe_state_dict(layout, 6), d / "inception.pt")
    tokens = d / "tokens"
    _run("tokenize", {
        "source": {"kind": "imagefolder", "root": str(d / "images"), "splits": ["train"]},
        "image": {"resolution": 32}, "tokenizer": {"kind": "patch", "weights": str(d / "patch_vq.pt")},
        "tokenize": {"samples_per_shard": 4, "rows_per_entry": 3, "batch_size": 4},
        "output": {"uri": str(tokens)}, "compute": {"progress": False}, "mlflow": {"enabled": False}}, d)
    samples = d / "samples"
    _run("sample", {
        "model": {"checkpoint": str(d / "enat.pt"), "preset": "enat-s", "encoder_depth": 2, "decoder_depth": 1,
                  "dim": 32, "num_heads": 4, "seq_len": 16, "codebook_size": 32, "num_classes": 2},
        "tokenizer": {"kind": "patch", "weights": str(d / "patch_vq.pt")},
        "plan": {"num_samples": 10, "unit_size": 6, "batch_size": 4, "seed": 3},
        "inception": {"weights": str(d / "inception.pt")}, "fid": {"is_splits": 2},
        "output": {"uri": str(samples), "grid": 4},
        "compute": {"workers": 1, "progress": False}, "mlflow": {"enabled": False}}, d)
    real = d / "real"
    _run("fid_stats", {
        "source": {"kind": "folder", "root": str(d / "images"), "resolution": 32, "unit_size": 4, "batch_size": 3},
        "inception": {"weights": str(d / "inception.pt")}, "output": {"uri": str(real)},
        "compute": {"workers": 1, "progress": False}}, d)
    got = {f"tokens/train/{p.name}": _sha(p) for p in sorted((tokens / "train").glob("*.tar"))}
    for rel in ("images/000000.tar", "npz/000000.npz", "stats/000000.npz", "stats/000001.npz", "fid_stats.npz",
                "grid.png"):
        got[f"samples/{rel}"] = _sha(samples / rel)
    got["real/fid_stats.npz"] = _sha(real / "fid_stats.npz")
    return got


def test_outputs_are_byte_identical_to_the_pins(outputs):
    if os.environ.get("ENAT_RECORD_PINS"):
        print(f"\nPLATFORM = {_platform()!r}\nPINS = {{")
        for k, v in outputs.items():
            print(f"    {k!r}: {v!r},")
        print("}")
        pytest.skip("recorded (ENAT_RECORD_PINS=1): paste the table above into this file")
    if _platform() != PLATFORM:
        pytest.skip(f"pins recorded on {PLATFORM}; this is {_platform()}: float kernels differ")
    assert set(outputs) == set(PINS), "the set of pinned files changed"
    changed = {k: v for k, v in outputs.items() if PINS[k] != v}
    assert not changed, f"output bytes changed: {sorted(changed)}"
