import math
from pathlib import Path

import pytest
import torch

import enat
from enat.sampler import mask_schedule
from tests.helpers import random_model, tiny_config

GOLDEN = Path(__file__).with_name("golden") / "enat_small.pt"
DET = dict(mask_temp=0.0, sample_temp=0.0)   # randomness off (the official 1e-3 floor is an argmax)


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=False)


@pytest.mark.parametrize("name", ["small", "odd-head"])
@pytest.mark.parametrize("steps", [8, 4])
@pytest.mark.parametrize("reuse", [True, False])
def test_token_for_token_with_official_sampler(golden, name, steps, reuse):
    case = golden[name]
    m = enat.ENAT.from_official(case["state_dict"], enat.ENATConfig(**case["config"])).double()
    toks = enat.generate(m, case["labels"], enat.SamplerConfig(steps=steps, cfg_scale=2.5, reuse=reuse, **DET))
    assert torch.equal(toks, case["samples"][f"steps{steps}_reuse{int(reuse)}"])


def reference_loop(model, cond, steps, cfg_scale, reuse):
    """The official loop written plainly on the public forward (two streams, full logits, argsort over
    all L); deterministic (temperatures 0)."""
    cfg = model.config
    B, L = cond.shape[0], cfg.seq_len
    ids = torch.full((B, L), cfg.mask_id)
    null = model.null_cond(B)
    cs = us = None
    scale = 0.0
    for k in range(steps):
        ratio = (k + 1) / steps
        c = model(ids, cond, prev=cs if reuse else None)
        u = model(ids, null, prev=us if reuse else None)
        cs, us = c.state, u.state
        logp = torch.log_softmax(c.logits + scale * (c.logits - u.logits), -1)
        is_mask = ids == cfg.mask_id
        sampled = torch.where(is_mask, logp.argmax(-1), ids)
        conf = torch.where(is_mask, logp.gather(-1, sampled[..., None])[..., 0], math.inf)
        n = math.floor(L * math.cos(ratio * math.pi * 0.5))
        remask = torch.zeros_like(is_mask).scatter(1, conf.argsort(-1)[:, :n], True)
        ids = torch.where(remask, cfg.mask_id, sampled)
        scale = ratio * cfg_scale
    return ids


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("text", [False, True])
def test_fast_sampler_equals_plain_loop(reuse, text):
    cfg = tiny_config(text_dim=8, text_len=3) if text else tiny_config()
    m = random_model(cfg, seed=3, std=0.5).double()
    if text:
        m.set_null_text(torch.randn(3, 8, dtype=torch.float64))
        cond = torch.randn(3, 3, 8, dtype=torch.float64)
    else:
        cond = torch.tensor([0, 4, cfg.null_class])
    with torch.no_grad():
        ref = reference_loop(m, cond, 6, 3.0, reuse)
    ours = enat.generate(m, cond, enat.SamplerConfig(steps=6, cfg_scale=3.0, reuse=reuse, **DET))
    assert torch.equal(ours, ref)


def test_reveals_cosine_schedule_counts_and_never_remasks():
    cfg = tiny_config(seq_len=64)
    m = random_model(cfg)
    seen = []
    gen = torch.Generator().manual_seed(0)
    toks = enat.generate(m, torch.tensor([1, 2, 3]), enat.SamplerConfig(steps=8), generator=gen,
                         callback=lambda k, ids: seen.append(ids.clone()))
    counts = mask_schedule(64, 8)
    assert counts == [64] + [math.floor(64 * math.cos(math.pi / 2 * (k + 1) / 8)) for k in range(8)]
    assert len(seen) == 8
    for k, ids in enumerate(seen):
        n_masked = (ids == cfg.mask_id).sum(1)
        assert (n_masked == counts[k + 1]).all(), (k, n_masked)
        if k:
            was_visible = seen[k - 1] != cfg.mask_id
            assert torch.equal(ids[was_visible], seen[k - 1][was_visible])   # never re-masked / changed
    assert torch.equal(toks, seen[-1])
    assert ((toks >= 0) & (toks < cfg.codebook_size)).all()


def test_paper_schedule_for_256_tokens():
    # enat-facts §6 table: masked at the input of steps 0..7 at L=256, T=8
    assert mask_schedule(256, 8) == [256, 251, 236, 212, 181, 142, 97, 49, 0]


def test_generator_reproducibility():
    m = random_model(tiny_config())
    y = torch.tensor([1, 2, 3, 4])
    a = enat.generate(m, y, generator=torch.Generator().manual_seed(7))
    b = enat.generate(m, y, generator=torch.Generator().manual_seed(7))
    c = enat.generate(m, y, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_guidance_scale_zero_uses_only_conditional_logits():
    cfg = tiny_config()
    m = random_model(cfg, std=0.5).double()
    y = torch.tensor([1, 2, 3])
    sc = enat.SamplerConfig(steps=6, cfg_scale=0.0, **DET)
    a = enat.generate(m, y, sc)
    # the null class row is never read at scale 0
    with torch.no_grad():
        m.y_embedder.embedding_table.weight[cfg.null_class].normal_()
    assert torch.equal(a, enat.generate(m, y, sc))
    # and a scale > 0 does read it (so the check above can fail)
    g1 = enat.generate(m, y, enat.SamplerConfig(steps=6, cfg_scale=4.0, **DET))
    with torch.no_grad():
        m.y_embedder.embedding_table.weight[cfg.null_class].normal_()
    assert not torch.equal(g1, enat.generate(m, y, enat.SamplerConfig(steps=6, cfg_scale=4.0, **DET)))


def test_step0_is_unguided():
    """s_0 = 0: the first step of a guided run equals the first step of an unguided run."""
    m = random_model(tiny_config(), std=0.5).double()
    y = torch.tensor([1, 2, 3])
    first = {}
    for s in (0.0, 5.0):
        enat.generate(m, y, enat.SamplerConfig(steps=4, cfg_scale=s, **DET),
                      callback=lambda k, ids, s=s: first.setdefault(s, ids.clone()) if k == 0 else None)
    assert torch.equal(first[0.0], first[5.0])


def test_bf16_option_within_tolerance():
    cfg = tiny_config(dim=64, num_heads=4)
    m = random_model(cfg, std=0.05)
    ids = torch.randint(0, cfg.codebook_size, (2, cfg.seq_len))
    ids[:, :6] = cfg.mask_id
    y = torch.tensor([1, 2])
    ref = m(ids, y).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m(ids, y).logits.float()
    assert low.dtype == torch.float32
    assert ((low - ref).abs().max() / ref.abs().max()).item() < 3e-2
    toks = enat.generate(m, y, enat.SamplerConfig(dtype="bfloat16"), generator=torch.Generator().manual_seed(0))
    assert toks.shape == (2, cfg.seq_len) and (toks < cfg.codebook_size).all()


def test_baseline_nat_sampler():
    cfg = tiny_config(decoder_depth=0, disentangled=False)
    m = random_model(cfg, std=0.5).double()
    seen = []
    y = torch.tensor([1, 2])
    toks = enat.generate(m, y, enat.SamplerConfig(steps=5, cfg_scale=2.0, **DET),
                         callback=lambda k, ids: seen.append((ids == cfg.mask_id).sum(1)))
    assert [int(c[0]) for c in seen] == mask_schedule(cfg.seq_len, 5)[1:]
    with torch.no_grad():
        ref = reference_loop(m, y, 5, 2.0, reuse=False)
    assert torch.equal(toks, ref)


def test_sampler_presets_and_validation():
    assert enat.SamplerConfig.preset("imagenet-256") == enat.SamplerConfig(8, 2.5, 1.5, 6.0)
    p = enat.SamplerConfig.preset("imagenet-512")
    assert (p.cfg_scale, p.mask_temp, p.sample_temp) == (3.5, 1.5, 4.0)
    with pytest.raises(ValueError, match="steps"):
        enat.SamplerConfig(steps=0)
    with pytest.raises(ValueError, match="cfg_scale"):
        enat.SamplerConfig(cfg_scale=-1)
    with pytest.raises(ValueError, match="dtype"):
        enat.SamplerConfig(dtype="int8")


def test_gumbel_noise_and_categorical_sampling_statistics():
    from enat.sampler import _gumbel
    g = _gumbel((400_000,), torch.Generator().manual_seed(0), torch.device("cpu"))
    assert torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.01 and abs(g.var().item() - math.pi ** 2 / 6) < 0.02
    # the inverse-CDF categorical draws from softmax(logp / t)
    from enat.sampler import _categorical
    logp = torch.log_softmax(torch.tensor([0.0, 1.0, 2.0, -1.0]), 0)
    t = 2.0
    draws = _categorical(logp.expand(200_000, 4), t, torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.softmax(logp / t, 0), atol=5e-3)
    assert draws.min() >= 0 and draws.max() <= 3


def test_compiled_network_path_matches_eager():
    """The torch.compile option traces the block stack (here with the eager backend: tracing and guards
    without code generation, to keep CI fast) and gives the same tokens."""
    cfg = tiny_config()
    m = random_model(cfg, std=0.5)
    y = torch.tensor([1, 2, cfg.null_class])
    ref = enat.generate(m, y, enat.SamplerConfig(steps=4, **DET))
    comp = enat.generate(m, y, enat.SamplerConfig(steps=4, compile=True, compile_backend="eager", **DET))
    assert torch.equal(ref, comp)


def test_float64_model_keeps_float64_logits_token_for_token(golden, shift=1e5):
    """As official, guidance / log-softmax run in the network's dtype: a float64 model reproduces the
    official loop token for token even where float32 could not hold its logits. A constant added to every
    logit (the head's bias) leaves the official float64 loop unchanged — log_softmax removes it — but in
    float32 (spacing 2^-7 at 1e5) it ties and reorders the confidences."""
    case = golden["small"]
    m = enat.ENAT.from_official(case["state_dict"], enat.ENATConfig(**case["config"])).double()
    with torch.no_grad():
        m.mlm_layer.bias += shift
    for steps in (8, 4):
        for reuse in (True, False):
            toks = enat.generate(m, case["labels"], enat.SamplerConfig(steps=steps, cfg_scale=2.5, reuse=reuse, **DET))
            assert torch.equal(toks, case["samples"][f"steps{steps}_reuse{int(reuse)}"]), (steps, reuse)
    with torch.no_grad():
        assert torch.equal(toks, reference_loop(m, case["labels"], 4, 2.5, reuse=False))


def test_sample_step_dtypes():
    """float32 / float64 logits keep their dtype (as official); half-precision ones are promoted to
    float32 (differs from official, documented in enat/sampler.py)."""
    from enat.sampler import _sample

    cfg = enat.SamplerConfig(steps=8)
    for dtype, want in [(torch.float64, torch.float64), (torch.float32, torch.float32),
                        (torch.bfloat16, torch.float32), (torch.float16, torch.float32)]:
        c = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
        ids, conf = _sample(c, c.flip(0), 1.5, 0.5, cfg, torch.Generator().manual_seed(1))
        assert conf.dtype == want and ids.shape == (2, 5), dtype


def test_generator_must_live_on_the_models_device():
    """Every draw is made with a generator on the device of what it draws: a generator on another
    device is refused up front, naming both devices and the fix (the CUDA case runs in the gpu tests)."""
    from types import SimpleNamespace

    from enat.sampler import check_generator

    check_generator(torch.Generator().manual_seed(0), torch.device("cpu"))
    check_generator(None, torch.device("cpu"))
    elsewhere = SimpleNamespace(device=torch.device("cuda", 0))  # a CUDA generator, as far as the check reads
    with pytest.raises(ValueError, match=r"generator is on cuda:0 but the model is on cpu.*torch.Generator\('cpu'\)"):
        check_generator(elsewhere, torch.device("cpu"))
    m = random_model(tiny_config())
    with pytest.raises(ValueError, match="generate: the generator is on cuda:0"):
        enat.generate(m, torch.tensor([1]), generator=elsewhere)
