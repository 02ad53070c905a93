from pathlib import Path

import pytest
import torch

import enat
from enat.model import ENATState
from tests.helpers import random_model, tiny_config

GOLDEN = Path(__file__).with_name("golden") / "enat_small.pt"


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=False)


def _official_model(case) -> enat.ENAT:
    cfg = enat.ENATConfig(**case["config"])
    return enat.ENAT.from_official(case["state_dict"], cfg).double()


@pytest.mark.parametrize("name", ["small", "odd-head"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_logits_match_official_fresh_and_reuse(golden, name, impl):
    case = golden[name]
    m = _official_model(case).set_attention(impl)
    y = case["labels"]
    with torch.no_grad():
        prev = m(case["ids_prev"], y)
        cur = m(case["ids_cur"], y, prev=prev.state)
        allm = m(torch.full_like(case["ids_prev"], m.config.mask_id), y)
        after = m(case["ids_prev"], y, prev=allm.state)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()
    assert rel(prev.logits, case["logits_prev"]) < 1e-10
    assert rel(prev.state.feat, case["feat_prev"]) < 1e-10
    assert rel(cur.logits, case["logits_cur"]) < 1e-10
    assert rel(cur.state.feat, case["feat_cur"]) < 1e-10
    assert rel(allm.logits, case["logits_all"]) < 1e-10
    assert rel(after.logits, case["logits_after_all"]) < 1e-10


def test_reuse_differs_from_fresh(golden):
    """The reuse path really uses prev: logits with prev differ from a fresh forward."""
    case = golden["small"]
    m = _official_model(case)
    with torch.no_grad():
        prev = m(case["ids_prev"], case["labels"])
        fresh = m(case["ids_cur"], case["labels"]).logits
        reused = m(case["ids_cur"], case["labels"], prev=prev.state).logits
    assert (fresh - reused).abs().max() > 1e-3


def test_shapes_and_determinism():
    cfg = tiny_config()
    m = random_model(cfg)
    ids = torch.randint(0, cfg.codebook_size, (3, cfg.seq_len))
    ids[:, :5] = cfg.mask_id
    out = m(ids, torch.tensor([0, 1, cfg.null_class]))
    assert out.logits.shape == (3, cfg.seq_len, cfg.codebook_size)
    assert out.state.feat.shape == (3, cfg.seq_len, cfg.dim)
    assert out.state.masking.sum().item() == 15
    out2 = m(ids, torch.tensor([0, 1, cfg.null_class]))
    assert torch.equal(out.logits, out2.logits)


def test_visible_tokens_do_not_affect_other_samples_and_batch_invariance():
    cfg = tiny_config()
    m = random_model(cfg).double()
    ids = torch.randint(0, cfg.codebook_size, (4, cfg.seq_len))
    ids[:, 3:9] = cfg.mask_id
    y = torch.tensor([1, 2, 3, 4])
    full = m(ids, y).logits
    single = torch.cat([m(ids[i:i + 1], y[i:i + 1]).logits for i in range(4)])
    assert torch.allclose(full, single, atol=1e-12)


def test_unequal_counts_padded_path_matches_per_sample():
    """Samples with different numbers of [MASK] tokens in one batch (padded path) equal per-sample runs."""
    cfg = tiny_config()
    m = random_model(cfg).double()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, cfg.codebook_size, (4, cfg.seq_len), generator=g)
    rank = torch.rand(4, cfg.seq_len, generator=g).argsort(1).argsort(1)
    n_prev = torch.tensor([12, 10, 15, 8])[:, None]
    n_cur = torch.tensor([6, 3, 15, 1])[:, None]
    ids_prev = torch.where(rank < n_prev, cfg.mask_id, x0)
    ids_cur = torch.where(rank < n_cur, cfg.mask_id, x0)
    y = torch.tensor([1, 2, 3, cfg.null_class])
    prev = m(ids_prev, y)
    cur = m(ids_cur, y, prev=prev.state)
    for i in range(4):
        p_i = m(ids_prev[i:i + 1], y[i:i + 1])
        c_i = m(ids_cur[i:i + 1], y[i:i + 1], prev=p_i.state)
        assert torch.allclose(prev.logits[i], p_i.logits[0], atol=1e-10)
        assert torch.allclose(cur.logits[i], c_i.logits[0], atol=1e-10)
        assert torch.allclose(cur.state.feat[i], c_i.state.feat[0], atol=1e-10)


def test_padded_path_backward_is_finite():
    cfg = tiny_config()
    m = random_model(cfg).train()
    x0 = torch.randint(0, cfg.codebook_size, (3, cfg.seq_len))
    ids = x0.clone()
    ids[0, :2] = cfg.mask_id
    ids[1, :] = cfg.mask_id          # a sample with no visible token at all
    ids[2, :10] = cfg.mask_id
    out = m(ids, torch.tensor([1, 2, 3]))
    out.logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_prev_must_only_shrink():
    cfg = tiny_config()
    m = random_model(cfg)
    ids = torch.randint(0, cfg.codebook_size, (2, cfg.seq_len))
    prev = m(ids, torch.tensor([0, 1])).state              # everything visible
    more = ids.clone()
    more[:, 0] = cfg.mask_id
    with pytest.raises(ValueError, match="only shrink"):
        m(more, torch.tensor([0, 1]), prev=prev)


def test_reuse_features_are_detached():
    cfg = tiny_config()
    m = random_model(cfg).train()
    ids = torch.randint(0, cfg.codebook_size, (2, cfg.seq_len))
    ids[:, :10] = cfg.mask_id
    feat = torch.randn(2, cfg.seq_len, cfg.dim, requires_grad=True)
    prev = ENATState(feat, ids == cfg.mask_id)
    ids2 = ids.clone()
    ids2[:, :10] = torch.where(torch.arange(10) < 5, cfg.mask_id, 3)
    m(ids2, torch.tensor([0, 1]), prev=prev).logits.sum().backward()
    assert feat.grad is None


def test_head_is_tied_but_detached():
    cfg = tiny_config()
    m = random_model(cfg).train()
    ids = torch.full((2, cfg.seq_len), cfg.mask_id)
    m(ids, torch.tensor([0, 1])).logits.sum().backward()
    # [MASK] is the only token id in the input, so every other row's gradient could only come from the
    # head; it must be zero because the head uses detached word embeddings (official).
    g = m.x_embedder.word_embeddings.weight.grad
    assert g[: cfg.codebook_size].abs().sum() == 0
    assert g[cfg.mask_id].abs().sum() > 0


def test_presets_parameter_counts():
    expected = {"enat-b": 219_646_721, "enat-l": 574_298_113, "enat-l-512": 575_084_545}
    for name, n in expected.items():
        with torch.device("meta"):
            assert enat.ENAT(enat.ENATConfig.preset(name)).num_parameters() == n, name
    s = enat.ENATConfig.preset("enat-s")
    assert (s.encoder_depth, s.decoder_depth, s.dim, s.num_heads, s.head_dim) == (15, 1, 366, 6, 61)
    with pytest.raises(ValueError, match="unknown ENAT preset"):
        enat.ENATConfig.preset("enat-xxl")


def test_enat_b_coco_has_the_papers_116m_parameters():
    """Table 5: the COCO ENAT-B has 116M parameters (its shape is our choice: see the preset)."""
    cfg = enat.ENATConfig.preset("enat-b-coco")
    assert cfg.text_conditioned and (cfg.text_len, cfg.text_dim, cfg.dim) == (77, 768, 768)
    with torch.device("meta"):
        n = enat.ENAT(cfg).num_parameters()
    assert abs(n - 116e6) <= 0.02 * 116e6, n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_float32_prev_features_feed_a_low_precision_model(dtype):
    """Training reuse: the float32 EMA's features enter a bf16/fp16 (DeepSpeed) model."""
    cfg = tiny_config()
    ema = random_model(cfg, seed=1)
    m = random_model(cfg, seed=2).to(dtype)
    ids = torch.randint(0, cfg.codebook_size, (2, cfg.seq_len))
    prev_ids = ids.clone()
    ids[:, 8:] = cfg.mask_id
    prev_ids[:, 4:] = cfg.mask_id
    y = torch.tensor([1, 2])
    prev = ema(prev_ids, y).state                                   # float32 features
    out = m(ids, y, prev=prev)
    assert out.logits.dtype == dtype and torch.isfinite(out.logits.float()).all()
    cast = m(ids, y, prev=prev._replace(feat=prev.feat.to(dtype)))
    assert torch.equal(out.logits, cast.logits)


def test_enat_s_as_printed_runs():
    cfg = enat.ENATConfig(encoder_depth=15, decoder_depth=1, dim=366, num_heads=6)
    with torch.device("meta"):
        m = enat.ENAT(cfg)
    # enat-facts §7 parameter formula (50.38M for ENAT-S)
    D, V, P, C = 366, 1025, 256, 1001
    expected = 16 * (22 * D * D + 19 * D) + V * D + P * D + 2 * D + C * D + (8 * D * D + 5 * D) \
        + (8 * D * D + 7 * D) + 2 * D + (D * D + 3 * D + V)
    assert m.num_parameters() == expected
    assert round(expected / 1e6, 2) == 50.38
    small = enat.ENATConfig(encoder_depth=1, decoder_depth=1, dim=366, num_heads=6, seq_len=16)
    out = enat.ENAT(small)(torch.full((1, 16), 1024), torch.tensor([5]))
    assert out.logits.shape == (1, 16, 1024)


@pytest.mark.parametrize("bad", [dict(dim=30, num_heads=4), dict(decoder_depth=0), dict(seq_len=15),
                                 dict(dim=0), dict(encoder_depth=-1)])
def test_bad_configs_rejected(bad):
    with pytest.raises(ValueError, match="ENATConfig"):
        tiny_config(**bad)


def test_bad_inputs_rejected():
    m = random_model(tiny_config())
    with pytest.raises(ValueError, match="ids must be"):
        m(torch.zeros(2, 5, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="LongTensor"):
        m(torch.zeros(2, 16, dtype=torch.long), torch.zeros(2, 3))


def test_baseline_nat_uniform_processing():
    cfg = enat.ENATConfig.preset("nat-baseline")
    assert not cfg.disentangled
    small = tiny_config(decoder_depth=0, disentangled=False)
    m = random_model(small).double()
    ids = torch.randint(0, small.codebook_size, (2, small.seq_len))
    ids[:, ::3] = small.mask_id
    out = m(ids, torch.tensor([1, 2]))
    # uniform processing: every token attends to every other, so changing a visible token changes the
    # features of other visible tokens (in the disentangled model it does too, but not through [MASK])
    ids2 = ids.clone()
    ids2[:, 1] = small.mask_id
    out2 = m(ids2, torch.tensor([1, 2]))
    vis = (ids != small.mask_id) & (ids2 != small.mask_id)
    assert (out.state.feat[vis] - out2.state.feat[vis]).abs().max() > 1e-6
    with pytest.raises(ValueError, match="no reuse"):
        m(ids, torch.tensor([1, 2]), prev=out.state)


def test_disentangled_visible_features_ignore_mask_tokens():
    """In ENAT visible tokens are encoded on their own: [MASK] tokens never influence them."""
    cfg = tiny_config()
    m = random_model(cfg).double()
    ids = torch.randint(0, cfg.codebook_size, (1, cfg.seq_len))
    ids[:, 8:] = cfg.mask_id
    a = m(ids, torch.tensor([1])).state.feat[:, :8]
    # moving which *masked* positions exist cannot change visible features; changing the class can
    b = m(ids, torch.tensor([2])).state.feat[:, :8]
    assert (a - b).abs().max() > 1e-6
    ids_b = ids.clone()
    ids_b[:, 15] = 5   # one more visible token changes the visible features (they attend each other)
    c = m(ids_b, torch.tensor([1])).state.feat[:, :8]
    assert (a - c).abs().max() > 1e-9


def test_text_conditioning_shares_the_code_path():
    cfg = tiny_config(text_dim=12, text_len=5)
    m = random_model(cfg).double()
    null = torch.randn(5, 12, dtype=torch.float64)
    m.set_null_text(null)
    text = torch.randn(2, 5, 12, dtype=torch.float64)
    ids = torch.randint(0, cfg.codebook_size, (2, cfg.seq_len))
    ids[:, 4:] = cfg.mask_id
    out = m(ids, text)
    assert out.logits.shape == (2, cfg.seq_len, cfg.codebook_size)
    assert out.state.feat.shape == (2, 5 + cfg.seq_len, cfg.dim)
    # reuse: text tokens come from prev like old visible tokens; equal to the padded per-sample runs
    ids2 = ids.clone()
    ids2[:, 4:8] = 7
    cur = m(ids2, text, prev=out.state)
    fresh = m(ids2, text)
    assert (cur.logits - fresh.logits).abs().max() > 1e-6
    assert torch.equal(m.null_cond(2)[0], null)
    with pytest.raises(ValueError, match="text-conditional"):
        m(ids, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class-conditional"):
        random_model(tiny_config()).set_null_text(null)


def test_graph_structure_independent_of_token_counts():
    """Empty token sets still run through their layers, so the same parameters get gradients whatever
    the counts (distributed gradient reduction needs the same graph on every rank)."""
    cfg = tiny_config()
    m = random_model(cfg).train()

    def grads(ids_prev, ids_cur):
        m.zero_grad(set_to_none=True)
        with torch.no_grad():
            prev = m(ids_prev, torch.tensor([1, 2])).state
        m(ids_cur, torch.tensor([1, 2]), prev=prev).logits.sum().backward()
        return {n for n, p in m.named_parameters() if p.grad is not None}
    x = torch.randint(0, cfg.codebook_size, (2, cfg.seq_len))
    M = cfg.mask_id
    ids = lambda n: torch.where(torch.arange(cfg.seq_len) < n, M, x)   # noqa: E731  first n masked
    both = grads(ids(10), ids(6))          # old and new tokens
    no_old = grads(ids(16), ids(6))        # previous step all [MASK]: no old visible token
    no_new = grads(ids(6), ids(6))         # nothing newly revealed
    assert both == no_old == no_new
    assert any(n.startswith("prev_proj") for n in both)


def test_onednn_cpu_gemm_matches_default_blas():
    from enat.layers import _ONEDNN, set_cpu_gemm
    if not _ONEDNN:
        pytest.skip("torch built without oneDNN")
    cfg = tiny_config(dim=64, num_heads=4)
    m = random_model(cfg, std=0.05)
    ids = torch.randint(0, cfg.codebook_size, (3, cfg.seq_len))
    ids[:, :7] = cfg.mask_id
    y = torch.tensor([1, 2, cfg.null_class])
    try:
        set_cpu_gemm("default")
        with torch.no_grad():
            ref = m(ids, y)
            ref2 = m(ids, y, prev=ref.state)
        set_cpu_gemm("onednn")
        with torch.no_grad():
            out = m(ids, y)
            out2 = m(ids, y, prev=out.state)
    finally:
        set_cpu_gemm("onednn")
    for a, b in ((out.logits, ref.logits), (out2.logits, ref2.logits), (out.state.feat, ref.state.feat)):
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-5
    with pytest.raises(ValueError, match="backend"):
        set_cpu_gemm("mkl")
