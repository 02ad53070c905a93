"""The sampler's inference fusions (`enat.layers.fused_inference`) against the plain path.

Fast path: each attention's q and self-stream kv as one GEMM on the concatenated weight, the encoder's
reused context normalized once per step, the token embedding shared by both guidance streams. Plain path:
the same model with `set_fused(False)` (separate GEMMs, per-block LayerNorm), which is also what runs
with autograd on. fp32 logits agree to 2e-5 (relative to the logits' scale): only the GEMM kernel's
summation order may differ between one GEMM of N = 3D and two of D and 2D. Sampled tokens on a fixed seed
are required to be identical in fp32.
"""
from __future__ import annotations

import pytest
import torch

import enat
from enat.layers import SCAttention, fused_inference, set_fused
from tests.helpers import random_model, tiny_config


@pytest.fixture
def plain():
    """Run a block with the fusions off, restoring them afterwards."""
    class _Plain:
        def __enter__(self):
            set_fused(False)

        def __exit__(self, *exc):
            set_fused(True)
    return _Plain()


def _models():
    # head_dim 61 as in ENAT-S (an odd head size), and a text model (always-visible text tokens)
    yield "class", random_model(tiny_config(encoder_depth=3, dim=122, num_heads=2, seq_len=64,
                                            codebook_size=64), seed=1, std=0.1), torch.arange(4) % 10
    cfg = tiny_config(encoder_depth=3, dim=48, num_heads=4, seq_len=36, text_dim=8, text_len=3)
    yield "text", random_model(cfg, seed=2, std=0.1), torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", ["class", "text"])
def test_logits_with_reuse_match_the_plain_path(case, plain):
    _, m, cond = next(c for c in _models() if c[0] == case)
    cfg = m.config
    g = torch.Generator().manual_seed(5)
    B, L = cond.shape[0], cfg.seq_len
    ids0 = torch.randint(0, cfg.codebook_size, (B, L), generator=g)
    # step 1: half the tokens masked; step 2 (reusing step 1's state): a quarter masked
    perm = torch.rand(B, L, generator=g).argsort(1)
    mask1 = torch.zeros(B, L, dtype=torch.bool).scatter(1, perm[:, : L // 2], True)
    mask2 = torch.zeros(B, L, dtype=torch.bool).scatter(1, perm[:, : L // 4], True)
    ids1, ids2 = ids0.masked_fill(mask1, cfg.mask_id), ids0.masked_fill(mask2, cfg.mask_id)

    def run(fused: bool):
        with torch.no_grad(), fused_inference(m):
            if fused:
                assert all(a._qkv is not None for a in m.modules() if isinstance(a, SCAttention))
            o1 = m(ids1, cond)
            o2 = m(ids2, cond, prev=o1.state)
        return o1.logits, o2.logits

    fast = run(True)
    with plain:
        ref = run(False)
    with torch.enable_grad():                       # the training path (no fusions with autograd)
        o1 = m(ids1, cond)
        train = (o1.logits, m(ids2, cond, prev=o1.state).logits)
    for f, r, t in zip(fast, ref, train):
        scale = r.abs().max().item()
        torch.testing.assert_close(f, r, rtol=0, atol=2e-5 * scale)
        torch.testing.assert_close(t.detach(), r, rtol=0, atol=2e-5 * scale)
    assert all(a._qkv is None for a in m.modules() if isinstance(a, SCAttention))   # cleared after the call


@pytest.mark.parametrize("case", ["class", "text"])
@pytest.mark.parametrize("reuse", [True, False])
def test_sampled_tokens_identical_to_the_plain_path_fp32(case, reuse, plain):
    _, m, cond = next(c for c in _models() if c[0] == case)
    sc = enat.SamplerConfig(steps=6, reuse=reuse)     # the paper's temperatures: random draws on
    fast = enat.generate(m, cond, sc, generator=torch.Generator().manual_seed(0))
    with plain:
        ref = enat.generate(m, cond, sc, generator=torch.Generator().manual_seed(0))
    assert torch.equal(fast, ref)


def test_bf16_fused_weights_are_cast_once(plain):
    """Under bf16 autocast the fused weight is held in bf16 for the call; tokens stay those of the plain
    bf16 path (same kernels: the fused GEMM reads the same bf16 values)."""
    _, m, cond = next(_models())
    sc = enat.SamplerConfig(steps=4, dtype="bfloat16")
    with fused_inference(m, torch.bfloat16):
        seen = {a._qkv[0].dtype for a in m.modules() if isinstance(a, SCAttention)}
    assert seen == {torch.bfloat16}
    fast = enat.generate(m, cond, sc, generator=torch.Generator().manual_seed(0))
    with plain:
        ref = enat.generate(m, cond, sc, generator=torch.Generator().manual_seed(0))
    assert (fast == ref).float().mean() >= 0.95
