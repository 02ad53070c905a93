"""The Inception Score protocol (issue 10 item 6): torch-fidelity's default — samples permuted by
`np.random.RandomState(2020).permutation(N)`, then 10 contiguous slices [k·N//10, (k+1)·N//10) of the
permuted order (torch_fidelity/metric_isc.py `isc_features_to_metric`, defaults.py `isc_splits=10,
samples_shuffle=True, rng_seed=2020`) — from all logits at once and from unit partials merged in any order.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import enat
from enat.fid import ISStats, inception_score, is_split_index


def torch_fidelity_isc(logits: np.ndarray, splits: int = 10, seed: int = 2020) -> tuple[float, float]:
    """An independent numpy reading of torch-fidelity's `isc_features_to_metric` with its defaults."""
    n = logits.shape[0]
    x = logits[np.random.RandomState(seed).permutation(n)].astype(np.float64)
    x = x - x.max(1, keepdims=True)
    log_p = x - np.log(np.exp(x).sum(1, keepdims=True))
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        pc, lc = p[i * n // splits:(i + 1) * n // splits], log_p[i * n // splits:(i + 1) * n // splits]
        q = pc.mean(0, keepdims=True)
        scores.append(np.exp((pc * (lc - np.log(q))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def class_ordered_logits(classes: int, per_class: int, num_logits: int = 64, seed: int = 0) -> torch.Tensor:
    """Confident logits of a class-ordered plan (as official: labels np.arange(C).repeat(per_class))."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(classes).repeat_interleave(per_class)
    logits = torch.randn(classes * per_class, num_logits, generator=g)
    logits[torch.arange(labels.numel()), labels] += 12.0  # each sample recognised as its class
    return logits


def test_class_ordered_plan_is_capped_by_contiguous_splits_not_by_the_default():
    # 20 classes x 50 in class order: contiguous splits of 100 see 2 classes each → IS ≈ 2 (the cap that
    # made the paper's ~300 unreachable at 1000 classes); shuffled splits see all 20 classes
    logits = class_ordered_logits(20, 50)
    capped, _ = inception_score(logits, 10, shuffle_seed=None)
    assert capped < 2.01
    mean, std = enat.inception_score(logits)  # the top-level default: torch-fidelity's protocol
    assert mean > 15
    assert (mean, std) == pytest.approx(torch_fidelity_isc(logits.numpy()), rel=1e-10)


@pytest.mark.parametrize("total,splits", [(1000, 10), (103, 10), (37, 3)])
def test_default_equals_numpy_torch_fidelity(total, splits):
    logits = torch.randn(total, 1008, generator=torch.Generator().manual_seed(total)) * 3
    mean, std = inception_score(logits, splits)
    ref_mean, ref_std = torch_fidelity_isc(logits.numpy(), splits)
    assert mean == pytest.approx(ref_mean, rel=1e-12) and std == pytest.approx(ref_std, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("shuffle_seed", [2020, None])
def test_unit_partials_merged_in_any_order_equal_all_at_once(shuffle_seed):
    total, unit = 1000, 130  # uneven units, the last one short
    logits = class_ordered_logits(20, 50, num_logits=1008, seed=1)
    ref = inception_score(logits, 10, shuffle_seed=shuffle_seed)
    units = [ISStats.empty(total, shuffle_seed=shuffle_seed).update(logits[s:s + unit], s)
             for s in range(0, total, unit)]
    rng = np.random.default_rng(0)
    for _ in range(3):  # shuffled merge orders, and a state-dict round trip (the unit files)
        order = rng.permutation(len(units))
        merged = units[order[0]]
        for i in order[1:]:
            merged = merged + ISStats.from_state_dict(units[i].state_dict())
        assert merged.protocol == enat.fid.is_protocol(10, shuffle_seed)
        assert merged.score() == pytest.approx(ref, rel=1e-10)
    # the split of global index i depends on (i, N, seed) only: every slice of the permuted order
    pos = np.empty(total, np.int64)
    pos[np.random.RandomState(2020).permutation(total)] = np.arange(total)
    assert torch.equal(is_split_index(torch.arange(total), total, 10), torch.from_numpy(pos * 10 // total))


def test_protocol_is_part_of_the_state():
    a = ISStats.empty(40, 4, num_classes=5)
    assert a.shuffle_seed == 2020 and ISStats.from_state_dict(a.state_dict()).shuffle_seed == 2020
    c = ISStats.empty(40, 4, num_classes=5, shuffle_seed=None)
    assert ISStats.from_state_dict(c.state_dict()).shuffle_seed is None
    # partials written before the key existed were accumulated over contiguous splits
    old = {k: v for k, v in c.state_dict().items() if k != "shuffle_seed"}
    assert ISStats.from_state_dict(old).shuffle_seed is None
    with pytest.raises(ValueError, match="shuffle_seed"):
        a + c
