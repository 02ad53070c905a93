"""The ENAT generation loop (official libs/nat_misc.py `NATSchedule.generate`, enat-facts §6).

Per step k = 0..T-1 with ratio r = (k+1)/T:
  guided logits  c + s_k (c - u) with s_k = (k/T) cfg_scale (linear ramp; s_0 = 0), then log_softmax;
  sample each [MASK] position from Categorical(logp / max(sample_temp (1-r), 1e-3));
  confidence = the untempered logp of the sampled token + mask_temp (1-r) Gumbel noise;
  keep floor(L cos(pi/2 r)) lowest-confidence positions masked; visible tokens are never re-masked.
With reuse, each stream (conditional, unconditional) passes its previous step's features on.

Faster but equivalent to the official loop (same tokens given the same random numbers):
  - the two guidance streams run as one batched forward of 2B (same token sets: the ids are shared);
  - the step-0 unconditional pass is skipped for class-conditional models: its guidance weight is 0 and
    no visible token exists whose features a later step could reuse;
  - logits, sampling and confidences are computed for the [MASK] positions only (the official code
    computes all L and then discards the visible ones);
  - the token embedding runs once for both streams (same ids), the condition embedding once per call;
    each attention's q and self-stream kv are one GEMM and the encoder's reused context is normalized
    once per step instead of once per block (`enat.layers.fused_inference`; same values up to GEMM
    summation order, tied to the plain path by tests/test_equiv_sampler.py);
  - the token sets come from the schedule (host-side counts), so there is no host-device sync inside
    the loop and every step has static shapes (`torch.compile` / CUDA graphs apply).
Randomness is drawn with torch on the model's device from the given generator (the official code uses
numpy for the Gumbel noise), so the random streams differ from the official ones; with
`mask_temp=0, sample_temp=0` both are deterministic and produce the same tokens.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor

from .layers import fused_inference
from .model import ENAT, TokenSets

# Temperature floor of the official sampler: `max(samp_temp * (1 - ratio), 1e-3)`.
TEMP_FLOOR = 1e-3


@dataclass(frozen=True)
class SamplerConfig:
    """Sampling settings. Defaults are the paper's ImageNet-256 ones (enat-facts §6)."""

    steps: int = 8
    cfg_scale: float = 2.5
    mask_temp: float = 1.5
    sample_temp: float = 6.0
    reuse: bool = True
    dtype: str = "float32"          # "float32" | "bfloat16" | "float16" (autocast for the network)
    compile: bool = False           # torch.compile the network (off by default; worth it on GPU)
    compile_backend: str = "inductor"  # torch.compile backend ("inductor"; "eager" to check tracing only)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"SamplerConfig.steps must be a positive int, got {self.steps!r}")
        for name in ("cfg_scale", "mask_temp", "sample_temp"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or v < 0 or not math.isfinite(v):
                raise ValueError(f"SamplerConfig.{name} must be a finite number >= 0, got {v!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"SamplerConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @staticmethod
    def preset(name: str) -> "SamplerConfig":
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown sampler preset {name!r}; known: {', '.join(sorted(_PRESETS))}") from None

    def to_dict(self) -> dict:
        return asdict(self)


_DTYPES = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}

# The official README's commands (enat-facts §6); no 4-step or COCO settings are published.
_PRESETS = {
    "imagenet-256": SamplerConfig(steps=8, cfg_scale=2.5, mask_temp=1.5, sample_temp=6.0),
    "imagenet-512": SamplerConfig(steps=8, cfg_scale=3.5, mask_temp=1.5, sample_temp=4.0),
}


def mask_schedule(seq_len: int, steps: int) -> list[int]:
    """Number of [MASK] tokens at the input of each step, plus 0 at the end: [L, n_1, ..., n_T = 0].

    As official: `floor(L * np.cos(pi/2 * (k+1)/T))` (numpy's cos, so the counts are bit-identical).
    """
    counts = [seq_len]
    for k in range(steps):
        ratio = 1.0 * (k + 1) / steps
        counts.append(math.floor(seq_len * np.cos(ratio * math.pi * 0.5)))
    return counts


def check_generator(generator: Optional[torch.Generator], device: torch.device, what: str = "generate") -> None:
    """Raise `ValueError` unless `generator` (if any) lives on `device`: every random draw of the
    sampler is made on the device of the tensor it draws for (a CPU generator cannot drive CUDA draws)."""
    if generator is None:
        return
    g = generator.device
    if g.type != device.type or (g.index is not None and device.index is not None and g.index != device.index):
        raise ValueError(f"{what}: the generator is on {g} but the model is on {device}; build it on the "
                         f"model's device: torch.Generator({str(device)!r}).manual_seed(seed)")


def _categorical(logp: Tensor, temp: float, generator: Optional[torch.Generator]) -> Tensor:
    """One draw per row from Categorical(logits = logp / temp) by inverse CDF: one uniform per row
    instead of a Gumbel per class (half the cost of Gumbel-max on CPU). logp (..., K) -> (...)."""
    p = torch.softmax(logp / temp, dim=-1)
    c = p.cumsum(dim=-1)                                                   # (..., K)
    u = torch.rand(c.shape[:-1] + (1,), generator=generator, device=c.device, dtype=c.dtype) * c[..., -1:]
    return torch.searchsorted(c, u, right=True).squeeze(-1).clamp_(max=c.shape[-1] - 1)


def _gumbel(shape: tuple[int, ...], generator: Optional[torch.Generator], device: torch.device,
            dtype: torch.dtype = torch.float32) -> Tensor:
    """Standard Gumbel noise of `dtype` on `device`: -log(E) with E ~ Exp(1)."""
    e = torch.empty(shape, device=device, dtype=dtype).exponential_(generator=generator)
    return -torch.log(e)


@torch.no_grad()
def generate(model: ENAT, cond: Tensor, config: SamplerConfig = SamplerConfig(),
             generator: Optional[torch.Generator] = None,
             callback: Optional[Callable[[int, Tensor], None]] = None) -> Tensor:
    """Generate token grids.

    model: an ENAT (eval mode is set for the call). cond: LongTensor (B,) class labels (`num_classes`
    is the null class) or, for text models, FloatTensor (B, text_len, text_dim). Returns LongTensor
    (B, seq_len) of codebook ids in [0, codebook_size). Reproducible given `generator`, which must live on
    the model's device (`ValueError` otherwise); all randomness is drawn on that device.
    `callback(step, ids)`, if given, sees the ids after each step (`codebook_size` where still [MASK]).
    """
    check_generator(generator, model.mlm_layer.bias.device)
    if not model.config.disentangled:
        return _generate_uniform(model, cond, config, generator, callback)
    cfg = model.config
    device = model.mlm_layer.bias.device
    cond = cond.to(device)
    B, L, T = cond.shape[0], cfg.seq_len, model.num_text_tokens
    was_training = model.training
    model.eval()
    net = _compiled(model, config.compile_backend) if config.compile else model
    amp = _autocast(device, config.dtype)
    guided = config.cfg_scale > 0
    counts = mask_schedule(L, config.steps)

    # Index sets into the full sequence [text (T); image (L)]; image position p is slot T + p.
    ar = torch.arange(L, device=device) + T
    masked = ar.expand(B, L).contiguous()                      # (B, N_mask) positions still [MASK]
    new = torch.arange(T, device=device).expand(B, T)          # text slots are visible from the start
    old = new[:, :0]
    old_feat: Optional[Tensor] = None                          # (2B or B, N_old, D) reused features
    ids = torch.full((B, L), cfg.mask_id, dtype=torch.long, device=device)
    null = model.null_cond(B, device)
    both = torch.cat([cond, null], dim=0) if guided else cond  # (2B, ...) conditional then unconditional
    # one autocast context for the whole loop: its weight cache casts each weight once per call
    # (entering it per step would re-cast every weight at every step)
    # fused_inference: each attention's q and kv.B as one GEMM, weights concatenated (and cast to the
    # autocast dtype) once per call
    with amp, fused_inference(model, _DTYPES[config.dtype]):
        c_both, text_both = model.embed_cond(both)
        mods_both = [blk.adaLN_modulation(c_both) for blk in model.blocks]
        for k in range(config.steps):
            ids, masked, old, new, old_feat = _step(model, net, k, config, counts, ids, masked, old, new,
                                                    old_feat, text_both, c_both, mods_both, generator, callback)
    if was_training:
        model.train()
    return ids


def _logits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype guidance, log-softmax and sampling run in for network logits of `dtype`."""
    # as official: NATSchedule.generate computes in the network's output dtype (float32, or float64 for
    # a float64 model). differs from official: half-precision logits (bf16 / fp16 autocast) are promoted
    # to float32 before guidance: c + s(c - u) in half precision (bf16 keeps 8 mantissa bits) would
    # round the guided logits and tie or reorder the confidences that decide which tokens are revealed.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _sample(cond_logits: Tensor, uncond_logits: Optional[Tensor], scale: float, ratio: float,
            config: SamplerConfig, generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
    """Guidance, token sampling and confidence for one step (official NATSchedule.generate).

    logits (B, N, K) -> (sampled ids (B, N), confidence (B, N)). Runs in the logits' dtype for float32
    and float64, in float32 for half-precision logits (`_logits_dtype`); autocast is off inside.
    """
    dtype = _logits_dtype(cond_logits.dtype)
    with torch.autocast(cond_logits.device.type, enabled=False):
        logits = cond_logits.to(dtype)
        if uncond_logits is not None:
            logits = logits + scale * (logits - uncond_logits.to(dtype))    # guidance on raw logits
        logp = torch.log_softmax(logits, dim=-1)
        temp = max(config.sample_temp * (1 - ratio), TEMP_FLOOR)
        if temp <= TEMP_FLOOR:
            # at the official 1e-3 floor Categorical(logp / 1e-3) is an argmax (up to probability
            # exp(-gap / 1e-3) for a log-prob gap); we take the argmax exactly.
            sampled = logp.argmax(dim=-1)
        else:
            sampled = _categorical(logp, temp, generator)
        # confidence: the untempered guided log-prob of the sampled token, plus annealed Gumbel noise
        conf = logp.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
        noise_temp = config.mask_temp * (1 - ratio)
        if noise_temp > 0:
            conf = conf + noise_temp * _gumbel(conf.shape, generator, conf.device, conf.dtype)
    return sampled, conf


def _step(model: ENAT, net, k: int, config: SamplerConfig, counts: list[int], ids: Tensor, masked: Tensor,
          old: Tensor, new: Tensor, old_feat: Optional[Tensor], text_both: Optional[Tensor], c_both: Tensor,
          mods_both: list[Tensor], generator: Optional[torch.Generator],
          callback: Optional[Callable[[int, Tensor], None]]):
    """One sampling step: forward the streams, guide, sample, re-mask; returns the next step's state."""
    B, T = ids.shape[0], model.num_text_tokens
    ratio = 1.0 * (k + 1) / config.steps
    s_k = k / config.steps * config.cfg_scale             # official: set to ratio*cfg after each step
    # step 0 of a class model: the unconditional pass has weight 0 and nothing to pass on
    guided = config.cfg_scale > 0
    run_uncond = guided and (k > 0 or T > 0)
    r = 2 if run_uncond else 1
    nb = r * B
    sets = TokenSets(old.repeat(r, 1), new.repeat(r, 1), masked.repeat(r, 1))
    if old_feat is not None and old_feat.shape[0] != nb:
        # step 0 ran the conditional stream only; the unconditional one had no visible token then
        old_feat = old_feat.repeat(nb // old_feat.shape[0], 1, 1)
    # as model.embed_tokens, with the image tokens embedded once for both streams (they share the ids)
    # and the condition embedded once per call
    x = model.x_embedder(ids)                             # (B, L, D)
    x = x.repeat(r, 1, 1) if r > 1 else x
    if text_both is not None:
        x = torch.cat([text_both[:nb].to(x.dtype), x], dim=1)
    vis, x_m = net.run_blocks(x, c_both[:nb], sets, old_feat, [m[:nb] for m in mods_both])
    logits = model.head(x_m)                              # (nb, N_mask, K)

    sampled, conf = _sample(logits[:B], logits[B:] if run_uncond else None, s_k, ratio, config, generator)

    # official: argsort all L ascending (visible = +inf) and re-mask the first floor(L cos(.));
    # i.e. among the [MASK] positions the n_reveal most confident are revealed.
    n_reveal = masked.shape[1] - counts[k + 1]
    order = conf.argsort(dim=-1, descending=True)
    reveal, keep = order[:, :n_reveal], order[:, n_reveal:]
    reveal_pos = masked.gather(1, reveal)                                                # (B, n_reveal)
    ids = ids.scatter(1, reveal_pos - T, sampled.gather(1, reveal))
    masked = masked.gather(1, keep)
    if callback is not None:
        callback(k, ids)
    if config.reuse:
        # what is visible now is reused next step ("old"); only the revealed tokens are encoded
        old, new, old_feat = torch.cat([old, new], dim=1), reveal_pos, vis
    else:
        new = torch.cat([new, reveal_pos], dim=1)
    return ids, masked, old, new, old_feat


def _generate_uniform(model: ENAT, cond: Tensor, config: SamplerConfig,
                      generator: Optional[torch.Generator],
                      callback: Optional[Callable[[int, Tensor], None]]) -> Tensor:
    """Baseline NAT: the same loop with full-sequence forwards (no reuse)."""
    cfg = model.config
    device = model.mlm_layer.bias.device
    cond = cond.to(device)
    B, L = cond.shape[0], cfg.seq_len
    was_training = model.training
    model.eval()
    amp = _autocast(device, config.dtype)
    counts = mask_schedule(L, config.steps)
    guided = config.cfg_scale > 0
    ids = torch.full((B, L), cfg.mask_id, dtype=torch.long, device=device)
    both = torch.cat([cond, model.null_cond(B, device)]) if guided else cond
    for k in range(config.steps):
        ratio = 1.0 * (k + 1) / config.steps
        s_k = k / config.steps * config.cfg_scale
        with amp:
            logits = model(ids.repeat(2 if guided else 1, 1), both).logits
        sampled, conf = _sample(logits[:B], logits[B:] if guided else None, s_k, ratio, config, generator)
        is_mask = ids == cfg.mask_id
        sampled = torch.where(is_mask, sampled, ids)
        conf = conf.masked_fill(~is_mask, math.inf)                        # visible: never re-masked
        remask = conf.argsort(dim=-1)[:, :counts[k + 1]]
        ids = sampled.scatter(1, remask, cfg.mask_id)
        if callback is not None:
            callback(k, ids)
    if was_training:
        model.train()
    return ids


def _autocast(device: torch.device, dtype: str):
    if _DTYPES[dtype] is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=_DTYPES[dtype])


def _compiled(model: ENAT, backend: str = "inductor"):
    """A compiled view of the model's block stack (cached on the model per backend). Every sampling
    step has static shapes, so each step compiles once and CUDA graphs apply on GPU."""
    cache = model.__dict__.setdefault("_compiled_run_blocks", {})
    if backend not in cache:
        cache[backend] = torch.compile(model.run_blocks, backend=backend, dynamic=False)

    class _View:
        run_blocks = staticmethod(cache[backend])
    return _View
