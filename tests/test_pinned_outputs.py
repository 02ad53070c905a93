"""Output bytes pinned across refactors and CPUs: the tokenize shard set, one sample unit's files and the
grid from fixed inputs and seeds, by sha256; the float statistics (Inception features) by a tolerance.

The inputs are generated here (PNG images from a seeded numpy stream, a PatchVQ with a seeded codebook, a
small random ENAT and a random-weight FID Inception of the real architecture), so nothing depends on files
outside the test. What is exact on every x86-64 CPU is pinned by hash: the token codes (nearest codebook
entry; these inputs have no near-ties), the sampled token ids (the sampler's draws), and everything made
from ids without float arithmetic that depends on the kernels — PatchVQ's decode is a codebook lookup, the
uint8 conversion and the PNG/tar/npz encoding are exact. The Inception statistics are float32 convolutions
whose last bits differ between AVX2 and AVX-512 kernels, so they are pinned by summaries with a tolerance
(:data:`FLOAT_PINS`). Re-record (only when an output format changes on purpose) with ``ENAT_RECORD_PINS=1``:
it prints the new tables.
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

PINS = {
    "tokens/train/train-000000.tar": "3da2c42151426e738fa46f30eb532b4bf1ef8c930257cc0592b290750ddd3e65",
    "tokens/train/train-000001.tar": "3aad1b1be7d4bb5b7c82899332d40c93bec802e299b15b39f3eb9618872731c6",
    "tokens/train/train-000002.tar": "a51d87386261895e30feeb017c7c4b31806e1e857432b522c3e4244dc1944938",
    "samples/images/000000.tar": "d1b70b336dfa5bc99ca7aeb500c8e0cb1c848882f762a9ac546b12e72cc94dad",
    "samples/npz/000000.npz": "554c128a362a00dd0299cef43fe88fb0ccdebd3f3ecd8c198765f01a6f692135",
    "samples/grid.png": "348d677497415c2243fdde00161a942897197c7505bfcdf25c1f59fa1bc75a38",
}
# (n, Σmu, tr sigma, mu·v, Σ sigma·V) of each statistics file, v and V fixed pseudo-random: float32 Inception
# features differ between CPUs' kernels by ~1e-6 of their scale (tests/test_equiv_sample_job.py bounds the
# fused vs plain path at 3e-7); aggregates over 10 samples × 2048 features stay within that. 1e-4 relative
# leaves ~100x margin, while one sample more, less or different moves each by ~10% (one of 10 samples).
FLOAT_PINS = {
    "samples/stats/000000.npz": [6.0, 31966.3539, 242665.128, -419.154217, -212889.212],
    "samples/stats/000001.npz": [4.0, 21343.2616, 162213.267, -261.948814, -141113.863],
    "samples/fid_stats.npz": [0.0, 5330.96155, 15.1655694, -68.1103031, -1.61154035],
    "real/fid_stats.npz": [0.0, 3252.90185, 136.724669, -39.4562682, -102.79592],
}
FLOAT_RTOL = 1e-4


def _summary(path: Path) -> list[float]:
    """The pinned summary of a statistics npz: merged (mu, sigma) or a unit's sums (n, Σx, Σxxᵀ)."""
    with np.load(path) as z:
        if "mu" in z:
            mu, sigma, n = z["mu"].astype(np.float64), z["sigma"].astype(np.float64), 0.0
        else:
            n = float(z["n"])
            mu, sigma = z["sum"].astype(np.float64), z["outer"].astype(np.float64)
    rng = np.random.default_rng(0)
    v, w = rng.standard_normal(mu.shape), rng.standard_normal(sigma.shape)
    return [n, float(mu.sum()), float(np.trace(sigma)), float(mu @ v), float((sigma * w).sum())]


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
def outputs(ray_cluster, tmp_path_factory) -> dict[str, str]:
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
    for rel in ("images/000000.tar", "npz/000000.npz", "grid.png"):
        got[f"samples/{rel}"] = _sha(samples / rel)
    floats = {f"samples/{rel}": _summary(samples / rel) for rel in ("stats/000000.npz", "stats/000001.npz",
                                                                    "fid_stats.npz")}
    floats["real/fid_stats.npz"] = _summary(real / "fid_stats.npz")
    return got, floats


def test_outputs_are_byte_identical_to_the_pins(outputs):
    got, floats = outputs
    if os.environ.get("ENAT_RECORD_PINS"):
        print("\nPINS = {")
        for k, v in got.items():
            print(f"    {k!r}: {v!r},")
        print("}\nFLOAT_PINS = {")
        for k, v in floats.items():
            print(f"    {k!r}: {[float(f'{x:.9g}') for x in v]!r},")
        print("}")
        pytest.skip("recorded (ENAT_RECORD_PINS=1): paste the tables above into this file")
    assert set(got) == set(PINS), "the set of pinned files changed"
    changed = {k: v for k, v in got.items() if PINS[k] != v}
    assert not changed, f"output bytes changed: {sorted(changed)}"


def test_statistics_match_their_pins_within_float32_tolerance(outputs):
    _, floats = outputs
    assert set(floats) == set(FLOAT_PINS), "the set of pinned statistics changed"
    for k, v in floats.items():
        assert v[0] == FLOAT_PINS[k][0], (k, "sample count")
        np.testing.assert_allclose(v[1:], FLOAT_PINS[k][1:], rtol=FLOAT_RTOL, err_msg=k)
