"""Small shared builders for the tests (tiny random models of the real architecture)."""
from __future__ import annotations

import math
import os
import signal
import time

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


def fid_recipe_state_dict(layout, seed: int) -> dict:
    """Seeded, well-scaled random weights for pytorch-fid's Inception layout [(key, shape), ...]: He-normal
    conv / fc weights, BN gamma and running_var in [0.5, 1.5), beta, running_mean and fc bias N(0, 0.1^2),
    so activations stay O(1) through the 94 conv+BN layers. tests/golden/make_fid_golden.py builds the
    golden file from the same function."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in sorted(layout):
        shape = tuple(shape)
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0, dtype=torch.int64)
        elif key.endswith(("running_var", "bn.weight")):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bn.bias", "fc.bias")):
            sd[key] = torch.randn(shape, generator=g) * 0.1
        else:
            sd[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
    return sd


def kill_after_commits(proc, parts, n: int, log_path, what: str, timeout: float = 120) -> int:
    """SIGKILL the job started as `proc` (its own process group: the driver and the Ray it started) once
    `parts` holds n commit records (*.json); returns how many were committed."""
    deadline = time.time() + timeout
    try:
        while len(list(parts.glob("*.json"))) < n:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, f"no {what} committed in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return len(list(parts.glob("*.json")))
