import copy

import pytest
import torch
import torch.nn.functional as F

import enat
from enat.objective import (ObjectiveConfig, drop_labels, ema_update, lsimple, mask_tokens, remask_visible,
                            sample_beta, warmup_constant)
from tests.helpers import random_model, tiny_config


def test_beta_12_3_statistics():
    r = sample_beta(200_000, 12, 3, torch.Generator().manual_seed(0), "cpu")
    assert abs(r.mean().item() - 0.8) < 2e-3
    assert abs(r.var().item() - 12 * 3 / (15 ** 2 * 16)) < 5e-4


def test_mask_tokens_one_ratio_per_batch():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 50, (8, 256), generator=g)
    counts = []
    for _ in range(300):
        ids, labels, ratio = mask_tokens(tokens, 50, generator=g)
        n = (ids == 50).sum(1)
        assert (n == n[0]).all()                               # same count in the batch (official)
        assert 1 <= n[0] <= 255
        assert n[0] == torch.round(256 * ratio[0])            # round(L r)
        assert torch.equal(labels[ids == 50], tokens[ids == 50])
        assert (labels[ids != 50] == -1).all()
        assert torch.equal(ids[ids != 50], tokens[ids != 50])
        counts.append(n[0].item() / 256)
    assert abs(sum(counts) / len(counts) - 0.8) < 0.02
    # positions are a random permutation per sample
    assert not torch.equal(ids[0] == 50, ids[1] == 50)


def test_mask_tokens_per_sample_option():
    g = torch.Generator().manual_seed(0)
    ids, _, ratio = mask_tokens(torch.zeros(16, 64, dtype=torch.long), 9,
                                ObjectiveConfig(per_sample_ratio=True), g)
    n = (ids == 9).sum(1)
    assert len(set(n.tolist())) > 3


def test_mask_clamped_to_at_least_one_and_one_visible():
    g = torch.Generator().manual_seed(0)
    for beta in [(1000.0, 0.001), (0.001, 1000.0)]:
        cfg = ObjectiveConfig(mask_beta=beta)
        ids, _, _ = mask_tokens(torch.zeros(4, 16, dtype=torch.long), 9, cfg, g)
        n = (ids == 9).sum(1)
        assert ((n >= 1) & (n <= 15)).all()


def test_remask_visible_only_masks_visible_tokens():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 9, (6, 32), generator=g)
    for _ in range(50):
        ids, _, _ = mask_tokens(tokens, 9, generator=g)
        more = remask_visible(ids, 9, g)
        assert ((ids == 9) <= (more == 9)).all()                    # strictly more masked
        added = (more == 9).sum(1) - (ids == 9).sum(1)
        assert (added == added[0]).all()
        assert added[0] <= (ids[0] != 9).sum()
        assert added[0] <= 31                                       # official clamp of the count to L-1


def test_loss_equals_full_logits_cross_entropy():
    """Head on masked tokens only == official CE over full logits with ignore_index."""
    cfg = tiny_config()
    m = random_model(cfg).eval()
    tokens = torch.randint(0, cfg.codebook_size, (4, cfg.seq_len))
    y = torch.tensor([1, 2, 3, cfg.null_class])
    loss, _ = lsimple(m, tokens, y, generator=torch.Generator().manual_seed(3), reuse=False)
    ids, labels, _ = mask_tokens(tokens, cfg.mask_id, generator=torch.Generator().manual_seed(3))
    logits = m(ids, y).logits
    ref = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-1, label_smoothing=0.1)
    assert torch.allclose(loss, ref, atol=1e-6)


def test_reuse_branch_uses_ema_features():
    cfg = tiny_config()
    m = random_model(cfg, seed=1)
    ema = random_model(cfg, seed=2)
    tokens = torch.randint(0, cfg.codebook_size, (4, cfg.seq_len))
    y = torch.tensor([1, 2, 3, 4])

    def run(ema_model, reuse):
        return lsimple(m, tokens, y, ema_model, generator=torch.Generator().manual_seed(5), reuse=reuse)[0]
    assert torch.equal(run(ema, False), run(random_model(cfg, seed=9), False))
    assert not torch.allclose(run(ema, True), run(random_model(cfg, seed=9), True))
    assert not torch.allclose(run(ema, True), run(ema, False))


def test_reuse_gradients_do_not_reach_ema():
    cfg = tiny_config()
    m = random_model(cfg, seed=1).train()
    ema = random_model(cfg, seed=2)
    loss, _ = lsimple(m, torch.randint(0, cfg.codebook_size, (4, cfg.seq_len)), torch.tensor([1, 2, 3, 4]), ema,
                      generator=torch.Generator().manual_seed(0), reuse=True)
    loss.backward()
    assert all(p.grad is None for p in ema.parameters())
    assert not ema.training


def test_deterministic_under_seed():
    cfg = tiny_config()
    out = []
    for _ in range(2):
        torch.manual_seed(0)   # embedding dropout uses the global RNG
        m = random_model(cfg, seed=1).train()
        ema = copy.deepcopy(m).eval()
        g = torch.Generator().manual_seed(11)
        losses = []
        for _ in range(4):
            loss, _ = lsimple(m, torch.randint(0, cfg.codebook_size, (4, cfg.seq_len), generator=g),
                              torch.tensor([1, 2, 3, 4]), ema, generator=g)
            losses.append(loss.item())
        out.append(losses)
    assert out[0] == out[1]


def test_label_drop_rate_train_only():
    cfg = tiny_config()
    m = random_model(cfg)
    y = torch.zeros(100_000, dtype=torch.long)
    dropped = drop_labels(m, y, 0.1, torch.Generator().manual_seed(0))
    assert abs((dropped == cfg.null_class).float().mean().item() - 0.1) < 0.005
    assert set(dropped.unique().tolist()) == {0, cfg.null_class}


def test_ema_update_formula():
    a, b = torch.nn.Linear(3, 3), torch.nn.Linear(3, 3)
    expect = {n: 0.9 * p.detach().clone() + 0.1 * dict(b.named_parameters())[n].detach()
              for n, p in a.named_parameters()}
    ema_update(a, b, 0.9)
    for n, p in a.named_parameters():
        assert torch.allclose(p, expect[n])


def _lrs(sched_step, warmup: int, n: int, lr_lambda) -> list[float]:
    """The lr each of n updates runs at, with `sched_step(sched, k)` called after update k (0-based)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    out = []
    for k in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched_step(sched, k)
    return out


def test_warmup_matches_the_official_schedule():
    """Official train.py: LambdaLR(min(step / 5000, 1)), `lr_scheduler.step(train_state.step)` after
    optimizer.step with the pre-increment step. Ours is stepped plainly (as DeepSpeed does)."""
    import warnings
    W = 5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # LambdaLR.step(epoch) is deprecated, but official
        official = _lrs(lambda s, k: s.step(k), W, 12, lambda step: min(step / W, 1))
    ours = _lrs(lambda s, k: s.step(), W, 12, warmup_constant(W))
    assert official[:3] == [0.0, 0.0, 4e-4 / W]                      # the first two updates at lr 0
    assert ours == pytest.approx(official, abs=1e-15)
    assert warmup_constant(0)(0) == 1.0


def test_text_captions_are_dropped_once_by_the_reader_only():
    """U-ViT drops the caption once (p_uncond 0.1 in the dataset); for text models the objective must
    not drop again. Class labels keep the official second drop (LabelEmbedder, train mode)."""
    def seen_conds(cfg, cond):
        m = random_model(cfg).train()
        if cfg.text_conditioned:
            m.set_null_text(torch.zeros(cfg.text_len, cfg.text_dim))
        got = []
        m.register_forward_pre_hook(lambda mod, args, kw: got.append(args[1]), with_kwargs=True)
        tokens = torch.randint(0, cfg.codebook_size, (cond.shape[0], cfg.seq_len))
        lsimple(m, tokens, cond, config=ObjectiveConfig(class_dropout=0.1),
                generator=torch.Generator().manual_seed(0), reuse=False)
        return m, got[-1]
    tcfg = tiny_config(text_dim=6, text_len=3)
    text = torch.rand(400, 3, 6) + 1                                  # no caption is the empty one
    m, seen = seen_conds(tcfg, text)
    assert torch.equal(seen, text)                                    # not one caption dropped here
    m, seen = seen_conds(tiny_config(), torch.zeros(400, dtype=torch.long))
    rate = (seen == m.config.null_class).float().mean().item()
    assert 0.06 < rate < 0.14, rate                                   # the embedder's 10%


def test_generator_on_another_device_is_named():
    cfg = tiny_config()
    m = random_model(cfg)
    tokens = torch.randint(0, cfg.codebook_size, (2, cfg.seq_len), device="meta")
    with pytest.raises(ValueError, match="generator is on cpu but the tokens are on meta"):
        lsimple(m, tokens, torch.tensor([1, 2]), generator=torch.Generator())


def test_tiny_model_learns():
    cfg = tiny_config(seq_len=16, codebook_size=8, num_classes=4)
    torch.manual_seed(0)
    m = enat.ENAT(cfg).train()
    ema = copy.deepcopy(m).eval()
    opt = torch.optim.AdamW(m.parameters(), lr=2e-3)
    # each class is a fixed token pattern
    patterns = torch.randint(0, 8, (4, 16), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    first, last = [], []
    for it in range(150):
        y = torch.randint(0, 4, (32,), generator=g)
        loss, _ = lsimple(m, patterns[y], y, ema, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema_update(ema, m, 0.9)
        (first if it < 10 else last if it >= 140 else []).append(loss.item())
    assert sum(last) / len(last) < 0.6 * sum(first) / len(first)


@pytest.mark.parametrize("bad", [dict(mask_beta=(0, 3)), dict(reuse_prob=1.5), dict(label_smoothing=-0.1)])
def test_objective_config_validation(bad):
    with pytest.raises(ValueError, match="ObjectiveConfig"):
        ObjectiveConfig(**bad)
