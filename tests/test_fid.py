"""enat.inception and enat.fid against pytorch-fid's own outputs (tests/golden/make_fid_golden.py)
and exact statistics."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import fid_recipe_state_dict
import torch

from enat import fid
from enat.fid import (FeatureStats, ISStats, frechet_distance, inception_score, is_split_index,
                      load_reference_stats)
from enat.inception import FIDInception, quantize_uint8

GOLDEN = Path(__file__).parent / "golden" / "fid_inception_small.pt"




def checksum(sd):
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].numpy().tobytes())
    return h.hexdigest()


def rel_err(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=False)


@pytest.fixture(scope="module")
def golden_sd(golden):
    sd = fid_recipe_state_dict(golden["layout"], golden["seed"])
    assert checksum(sd) == golden["checksum"], "torch's RNG changed: regenerate with make_fid_golden.py"
    return sd


@pytest.fixture(scope="module")
def net(golden_sd):
    torch.set_num_threads(2)
    return FIDInception.from_pytorch_fid(golden_sd)


# ---------------------------------------------------------------------------------------------- network

def test_layout_is_pytorch_fids(golden):
    ours = [(k, tuple(v.shape)) for k, v in FIDInception().state_dict().items()]
    assert sorted(ours) == sorted(golden["layout"])
    assert ("fc.weight", (1008, 2048)) in ours and not any(k.startswith("AuxLogits") for k, _ in ours)


def test_features_and_logits_match_pytorch_fid(net, golden):
    with torch.no_grad():
        pool3, logits = net(golden["images"])
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008) and pool3.dtype == torch.float32
    assert rel_err(pool3, golden["pool3"]) < 1e-4
    # default head: unbiased logits (IS convention) = golden fc output minus its bias
    assert rel_err(logits, golden["logits"] - net.fc.bias) < 1e-4
    net.logits_bias = True
    try:
        assert rel_err(net.logits(pool3), golden["logits"]) < 1e-4
    finally:
        net.logits_bias = False


def test_png_protocol_matches_pytorch_fid_reading_pngs(net, golden):
    images = golden["images"]
    net.uint8_protocol = True
    try:
        with torch.no_grad():
            pool3, _ = net(images)
        quantized = net.preprocess(images)
    finally:
        net.uint8_protocol = False
    assert rel_err(pool3, golden["png_pool3"]) < 1e-4
    # uint8 tensors take the same path as uint8_protocol on floats
    as_uint8 = (quantize_uint8(images) * 255).round().to(torch.uint8)
    assert torch.equal(net.preprocess(as_uint8), quantized)


def test_autocast(net, golden):
    image, ref = golden["images"][:1], golden["pool3"][:1]
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a caller's region: still fp32 by default
            inside, _ = net(image)
        net.autocast_dtype = torch.bfloat16
        try:
            bf16, logits = net(image)
        finally:
            net.autocast_dtype = None
    assert inside.dtype == torch.float32 and rel_err(inside, ref) < 1e-4
    assert bf16.dtype == logits.dtype == torch.float32
    assert 1e-4 < rel_err(bf16, ref) < 0.1


def test_loads_from_path_and_open_file_without_num_batches_tracked(tmp_path, golden_sd):
    sd = {k: v for k, v in golden_sd.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "pt_inception.pth"
    torch.save(sd, path)
    a = FIDInception.from_pytorch_fid(path)
    with open(path, "rb") as f:
        b = FIDInception.from_pytorch_fid(f, logits_bias=True)
    assert torch.equal(a.fc.weight, golden_sd["fc.weight"])
    assert torch.equal(b.Mixed_7c.branch_pool.bn.running_var, golden_sd["Mixed_7c.branch_pool.bn.running_var"])
    assert b.logits_bias and not a.training and not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training


def test_bad_weights_name_the_key(golden_sd):
    sd = dict(golden_sd)
    sd["Mixed_6b.branch7x7_2.conv.weightt"] = sd.pop("Mixed_6b.branch7x7_2.conv.weight")
    sd["fc.weight"] = sd["fc.weight"][:1000]
    with pytest.raises(ValueError) as e:
        FIDInception.from_pytorch_fid(sd)
    msg = str(e.value)
    assert "unexpected keys (1): Mixed_6b.branch7x7_2.conv.weightt\n" in msg
    assert "missing keys (1): Mixed_6b.branch7x7_2.conv.weight\n" in msg
    assert "fc.weight: checkpoint (1000, 2048) vs model (1008, 2048)" in msg


def test_bad_image_shape():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        FIDInception().preprocess(torch.rand(3, 32, 32))


def test_quantize_uint8():
    x = torch.tensor([-0.1, 0.0, 0.5 / 255, 0.49 / 255, 0.5, 1.0, 1.2])
    q = quantize_uint8(x)
    assert torch.equal(q * 255, torch.tensor([0.0, 0.0, 1.0, 0.0, 128.0, 255.0, 255.0]))


# --------------------------------------------------------------------------------------- Fréchet distance

def test_frechet_distance_matches_pytorch_fid(golden):
    from scipy import linalg

    for case in golden["fd_cases"]:
        args = [case[k].numpy() for k in ("mu1", "sigma1", "mu2", "sigma2")]
        got = frechet_distance(*args)
        tol = 1e-6 if case["name"] == "rank_deficient" else 1e-9
        assert got == pytest.approx(case["fd"], rel=tol, abs=1e-9), case["name"]
        # a direct scipy computation of the same formula
        m1, s1, m2, s2 = args
        direct = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
        assert got == pytest.approx(direct, rel=tol, abs=1e-9), case["name"]
        # torch inputs take the same path
        assert frechet_distance(*[case[k] for k in ("mu1", "sigma1", "mu2", "sigma2")]) == got


def test_eigvals_method_agrees_on_well_conditioned_stats(golden):
    for case in golden["fd_cases"]:
        if case["name"] == "rank_deficient":
            continue
        got = frechet_distance(case["mu1"], case["sigma1"], case["mu2"], case["sigma2"], method="eigvals")
        assert got == pytest.approx(case["fd"], rel=1e-7, abs=1e-8), case["name"]


def test_frechet_distance_eps_retry_and_imaginary_check(monkeypatch):
    mu, sigma = np.zeros(4), np.eye(4)
    calls = []

    def fake(a):
        calls.append(a.copy())
        return np.full_like(a, np.nan) if len(calls) == 1 else np.eye(4)

    monkeypatch.setattr(fid, "_sqrtm", fake)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0)
    assert np.allclose(calls[1], (1 + 1e-6) ** 2 * np.eye(4))

    monkeypatch.setattr(fid, "_sqrtm", lambda a: np.eye(4) * (1 + 0.1j))
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(mu, sigma, mu, sigma)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError, match="mean vectors"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(4), method="eigvals")
    with pytest.raises(ValueError, match="method"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(3), method="svd")


# ------------------------------------------------------------------------------------------- statistics

def test_feature_stats_merge_equals_single_pass(tmp_path):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1000, 64)) * rng.uniform(0.1, 3, 64) + rng.uniform(0, 2, 64)).astype(np.float32)
    chunks = np.split(x, [7, 300, 301, 650])
    parts = [FeatureStats.empty(64).update(torch.from_numpy(c) if i % 2 else c) for i, c in enumerate(chunks)]
    merged = parts[3] + parts[0] + parts[4] + parts[2] + parts[1]
    mu, sigma = merged.mean_cov()
    ref_mu, ref_sigma = np.mean(x.astype(np.float64), 0), np.cov(x.astype(np.float64), rowvar=False)
    assert merged.n == 1000 and mu.dtype == sigma.dtype == np.float64
    assert np.abs(mu - ref_mu).max() < 1e-10 and np.abs(sigma - ref_sigma).max() < 1e-10

    merged.to_npz(tmp_path / "s.npz")
    buf = io.BytesIO()
    merged.to_npz(buf)
    for back in (FeatureStats.from_npz(tmp_path / "s.npz"), FeatureStats.from_npz(buf.getvalue()),
                 FeatureStats.from_state_dict(merged.state_dict())):
        assert back.n == 1000 and torch.equal(back.outer, merged.outer) and torch.equal(back.sum, merged.sum)


def test_feature_stats_errors():
    s = FeatureStats.empty(8)
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        s.update(torch.zeros(2, 7))
    with pytest.raises(ValueError, match="at least 2"):
        s.update(torch.zeros(1, 8)).mean_cov()
    with pytest.raises(ValueError, match="non-finite"):
        s.update(torch.full((1, 8), float("nan"))).mean_cov()
    with pytest.raises(ValueError, match="dimensions differ"):
        s + FeatureStats.empty(9)


def test_load_reference_stats(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3, dtype=np.float32)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    for src in (tmp_path / "ref.npz", str(tmp_path / "ref.npz"), open(tmp_path / "ref.npz", "rb"),
                (tmp_path / "ref.npz").read_bytes()):
        m, s = load_reference_stats(src)
        assert s.dtype == np.float64 and np.array_equal(m, mu) and np.array_equal(s, sigma)
    np.savez(tmp_path / "bad.npz", m=mu, s=sigma)
    with pytest.raises(ValueError, match=r"bad.npz: expected keys 'mu' and 'sigma', found \['m', 's'\]"):
        load_reference_stats(tmp_path / "bad.npz")


def _adm_inception_score(logits: np.ndarray, split_size: int) -> float:
    """ADM's compute_inception_score formula (numpy, array order), for the divisible case."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


@pytest.mark.parametrize("total,splits", [(200, 10), (103, 10), (37, 3)])
def test_inception_score_merged_equals_single_pass(total, splits):
    g = torch.Generator().manual_seed(total)
    logits = torch.randn(total, 1008, generator=g) * 3
    # the contiguous protocol (ADM's when splits divide N); tests/test_is_protocol.py covers the default
    ref_mean, ref_std = inception_score(logits, splits, shuffle_seed=None)

    # shards in any order, given by global index; one shard scattered (non-contiguous indices)
    perm = torch.randperm(total, generator=g)
    parts = []
    for idx in torch.tensor_split(perm, 4):
        parts.append(ISStats.empty(total, splits, shuffle_seed=None).update(logits[idx], idx))
    contiguous = ISStats.empty(total, splits, shuffle_seed=None).update(logits[:5], 0).update(logits[5:], 5)
    merged = parts[2] + parts[0] + parts[3] + parts[1]
    for stats in (merged, contiguous, ISStats.from_state_dict(merged.state_dict())):
        mean, std = stats.score()
        assert mean == pytest.approx(ref_mean, rel=1e-12) and std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)
    if total % splits == 0:
        assert ref_mean == pytest.approx(_adm_inception_score(logits.double().numpy(), total // splits), rel=1e-12)


def test_is_split_index_matches_slicing():
    for total in (10, 11, 50, 99, 50000):
        for splits in (1, 3, 7, 10):
            idx = torch.arange(total)
            expected = torch.cat([torch.full(((k + 1) * total // splits - k * total // splits,), k)
                                  for k in range(splits)])
            assert torch.equal(is_split_index(idx, total, splits, shuffle_seed=None), expected), (total, splits)
    assert torch.equal(is_split_index(torch.tensor([0, 4999, 5000, 49999]), 50000, 10, shuffle_seed=None),
                       torch.tensor([0, 0, 1, 9]))


def test_is_stats_errors():
    s = ISStats.empty(20, splits=4, num_classes=5)
    with pytest.raises(ValueError, match=r"outside \[0, 20\)"):
        s.update(torch.zeros(2, 5), 19)
    with pytest.raises(ValueError, match="empty splits"):
        s.update(torch.zeros(5, 5), 0).score()
    with pytest.raises(ValueError, match="differ"):
        s + ISStats.empty(20, splits=5, num_classes=5)
