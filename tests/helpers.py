"""Small shared builders for the tests (tiny random models of the real architecture)."""
from __future__ import annotations

import torch

import enat


def tiny_config(**kw) -> enat.ENATConfig:
    base = dict(encoder_depth=2, decoder_depth=1, dim=32, num_heads=4, seq_len=16, codebook_size=24,
                num_classes=10)
    base.update(kw)
    return enat.ENATConfig(**base)


def random_model(config: enat.ENATConfig, seed: int = 0, std: float = 0.2) -> enat.ENAT:
    """A model with *every* parameter random (the official init zeroes adaLN, which hides paths)."""
    torch.manual_seed(seed)
    m = enat.ENAT(config)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * std)
    return m.eval()
