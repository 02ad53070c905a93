"""The sample job's fast paths tied to their plain paths: the fused FID Inception (batch norm folded into
the convolutions, channels-last) against the modules run as pytorch-fid runs them, and the unit runner's
threaded PNG encoding against serial encoding (the same bytes)."""
from __future__ import annotations

import numpy as np
import torch

import enat
from enat.inception import BasicConv2d, FIDInception
from tests.helpers import fid_recipe_state_dict, random_model, tiny_config

# fp32: folding BN into the weights reorders the rounding of one multiply-add per output; measured ~2e-7
# relative on pool3. 1e-5 leaves room for other oneDNN kernels and would catch any real divergence.
FP32_TOL = 1e-5


def _net(seed: int) -> FIDInception:
    layout = [(k, tuple(v.shape)) for k, v in FIDInception().state_dict().items()]
    return FIDInception.from_pytorch_fid(fid_recipe_state_dict(layout, seed))


def _images(n: int = 2, res: int = 48) -> torch.Tensor:
    return torch.rand(n, 3, res, res, generator=torch.Generator().manual_seed(0))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _both(net: FIDInception, x: torch.Tensor) -> tuple[tuple, tuple]:
    with torch.no_grad():
        net.fused = False
        plain = net(x)
        net.fused = True
        fused = net(x)
    return plain, fused


def test_fused_inception_matches_the_plain_modules_in_fp32():
    net = _net(3)
    assert net.fused and all(m.fused for m in net.modules() if isinstance(m, BasicConv2d))
    x = _images()
    (p0, l0), (p1, l1) = _both(net, x)
    assert net.Conv2d_1a_3x3._folded is not None  # the fused path ran
    assert p1.dtype == l1.dtype == torch.float32 and p1.shape == (2, 2048) and l1.shape == (2, 1008)
    assert rel_err(p1, p0) < FP32_TOL and rel_err(l1, l0) < FP32_TOL
    # the flag reaches every conv and the plain path is the reference one (no folded weights used)
    net.fused = False
    assert not any(m.fused for m in net.modules() if isinstance(m, BasicConv2d))
    assert not FIDInception(fused=False).Mixed_7c.branch_pool.fused


def test_fused_inception_follows_new_or_edited_weights():
    """The folded weights are a cache: loading other weights, or editing a statistic in place, is seen."""
    net, other = _net(3), _net(4)
    x = _images()
    _both(net, x)  # fills the cache
    net.load_state_dict(other.state_dict())
    (p0, _), (p1, _) = _both(net, x)
    with torch.no_grad():
        ref = other.eval()
        ref.fused = False
        want, _ = ref(x)
    assert torch.equal(p0, want) and rel_err(p1, want) < FP32_TOL
    with torch.no_grad():
        net.Mixed_7c.branch_pool.bn.running_var.mul_(4)
        net.Conv2d_1a_3x3.conv.weight.mul_(0.5)
    (q0, _), (q1, _) = _both(net, x)
    assert rel_err(q0, p0) > 1e-3 and rel_err(q1, q0) < FP32_TOL


def test_fused_inception_under_bf16_autocast_stays_within_bf16_rounding():
    net = _net(3)
    x = _images()
    (ref, _), _ = _both(net, x)
    net.autocast_dtype = torch.bfloat16
    (plain, _), (fused, logits) = _both(net, x)
    assert fused.dtype == logits.dtype == torch.float32
    # bf16 keeps 8 bits of mantissa: both paths land ~1e-2 from fp32 (measured ~3-5e-3), not further
    assert rel_err(plain, ref) < 0.05 and rel_err(fused, ref) < 0.05
    assert net.Conv2d_1a_3x3._folded[1].dtype == torch.bfloat16  # weights cast once, cached


def test_threaded_png_encoding_writes_the_same_bytes_as_serial(tmp_path):
    from enat.patch_vq import PatchVQ
    from pipeline import sample

    cfg = tiny_config(codebook_size=32, num_classes=4)
    codebook = torch.rand(32, 3 * 8 * 8, generator=torch.Generator().manual_seed(2))
    unit = sample.make_units(10, 10, 5, np.arange(10) % 4, grid=[1, 7])[0]
    recs = {}
    for threads in (1, 4):
        out = tmp_path / f"t{threads}"
        runner = sample.UnitRunner(random_model(cfg, seed=1, std=0.1), PatchVQ(32, 8, codebook=codebook), None,
                                   enat.SamplerConfig(), str(out), batch_size=4,
                                   output=sample.OutputSection(uri=str(out), grid=2), png_threads=threads)
        recs[threads] = runner.run(unit, "equiv")
    files = recs[1]["files"]
    assert any(k.startswith("images/") for k in files) and any(k.startswith("grid/") for k in files)
    assert recs[4]["files"] == files  # every file: same size, same sha256
    for k in files:
        assert (tmp_path / "t1" / k).read_bytes() == (tmp_path / "t4" / k).read_bytes()
