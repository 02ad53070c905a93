"""ENAT's building blocks and the process-wide CPU GEMM switch.

The modules of the official code (LeapLabTHU/ENAT, libs/models.py), with its state-dict names: the DiT
block with adaLN-Zero and SC-attention (`Block`, `SCAttention`, `MultiwayKV`), the reuse projection
(`PrevProj`), the token and label embeddings and the MLM head; `enat.model.ENAT` assembles them. Every
linear layer goes through `linear`, which runs CPU float32 inference GEMMs through oneDNN unless
`set_cpu_gemm("default")` switched that off for the whole process. `fused_inference(model)` (used by the
sampler) fuses each attention's q and self-stream kv projections into one GEMM for the call's duration.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------------
# Modules (names mirror the official state dict)
# ----------------------------------------------------------------------------------------------------

def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation; x (B, N, D), shift/scale (B, D)."""
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))


# CPU inference GEMMs through oneDNN instead of the default BLAS: on CPUs where the bundled MKL takes a
# slow code path (measured 2x on an AMD EPYC, docs/benchmarks.md) this doubles fp32 matmul throughput,
# and it fuses the GELU into the matmul. Same math (fp32 accumulation, different summation order);
# used only for float32 CPU tensors without autograd and outside autocast. `set_cpu_gemm("default")`
# turns it off.
_ONEDNN = bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
_CPU_GEMM = {"backend": "onednn" if _ONEDNN else "default"}


def set_cpu_gemm(backend: str) -> None:
    """'onednn' (default where available) or 'default' (torch's BLAS) for CPU float32 inference."""
    if backend not in ("onednn", "default"):
        raise ValueError(f"cpu gemm backend must be 'onednn' or 'default', got {backend!r}")
    if backend == "onednn" and not _ONEDNN:
        raise ValueError("this torch build has no oneDNN (mkldnn) linear kernels")
    _CPU_GEMM["backend"] = backend


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, gelu: Optional[str] = None) -> Tensor:
    """F.linear (+ GELU: gelu='tanh' or 'none' for the exact one), via oneDNN on CPU inference."""
    if (_CPU_GEMM["backend"] == "onednn" and x.device.type == "cpu" and x.dtype == torch.float32
            and weight.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu" if gelu else "none", [], gelu or "")
    y = F.linear(x, weight, bias)
    return y if gelu is None else F.gelu(y, approximate=gelu)


# Inference-only fusions (the sampler's): `fused_inference` sets them up for one call; `set_fused(False)`
# turns them off for the whole process (the plain path the equivalence tests compare against).
_FUSED = {"on": True}


def set_fused(on: bool) -> None:
    """Allow (default) or forbid the inference-only fusions of `fused_inference`."""
    _FUSED["on"] = bool(on)


def fused_enabled() -> bool:
    """True when the inference fusions apply: allowed, and no autograd (they are never used in training)."""
    return _FUSED["on"] and not torch.is_grad_enabled()


@contextmanager
def fused_inference(model: nn.Module, dtype: Optional[torch.dtype] = None) -> Iterator[None]:
    """For the duration of the block: every SCAttention computes q and its self-stream kv (`kv.B`) with one
    GEMM against the concatenated weight [q; kv.B] (both read the same input), built once here in `dtype`
    (the autocast dtype, so bf16 weights are cast once per call, not per GEMM; default the weights' own).
    Each output element is the same dot product as with the two separate GEMMs (fp32 accumulation; the
    kernel's summation order may differ, ~1e-7 relative). Used only under `fused_enabled()`."""
    attns = [m for m in model.modules() if isinstance(m, SCAttention)]
    if not _FUSED["on"]:
        yield
        return
    try:
        with torch.no_grad():
            for a in attns:
                dt = dtype or a.q.weight.dtype
                a._qkv = (torch.cat([a.q.weight, a.kv.B.weight]).to(dt), torch.cat([a.q.bias, a.kv.B.bias]).to(dt))
        yield
    finally:
        for a in attns:
            a._qkv = None


def _lin(layer: nn.Linear, x: Tensor, gelu: Optional[str] = None) -> Tensor:
    return linear(x, layer.weight, layer.bias, gelu)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return _lin(self.fc2, _lin(self.fc1, x, gelu="tanh"))


class PrevProj(nn.Module):
    """Reuse projection f(.): pre-LN residual MLP applied to the previous step's visible features."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


class MultiwayKV(nn.Module):
    """Separate kv projections for the context stream (`A`) and the self stream (`B`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.A = nn.Linear(dim, 2 * dim)
        self.B = nn.Linear(dim, 2 * dim)


class SCAttention(nn.Module):
    """SC-attention: queries from the self stream, one softmax over [context; self] keys/values."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = MultiwayKV(dim)
        self.proj = nn.Linear(dim, dim)
        self.impl = "sdpa"   # "sdpa" (flash / fused kernels) or "math" (the official explicit softmax)
        self._qkv: Optional[tuple[Tensor, Tensor]] = None   # fused [q; kv.B] weight, bias (fused_inference)

    def forward(self, x: Tensor, ctx: Optional[Tensor], key_valid: Optional[Tensor]) -> Tensor:
        # x: (B, N, D) modulated self stream; ctx: (B, Nc, D) modulated context stream or None;
        # key_valid: (B, Nc + N) bool or None (None = every key is real)
        B, N, D = x.shape
        H = self.num_heads
        if self._qkv is not None and fused_enabled():
            qkv = linear(x, *self._qkv)                                   # (B, N, 3D): [q | kv.B]
            q, kv = qkv[..., :D], qkv[..., D:]
        else:
            q, kv = _lin(self.q, x), _lin(self.kv.B, x)
        if ctx is not None:
            kv = torch.cat([_lin(self.kv.A, ctx), kv], dim=1)           # (B, Nc + N, 2D)
        Nk = kv.shape[1]
        q = q.view(B, N, H, D // H).transpose(1, 2)                       # (B, H, N, hd)
        k, v = kv.view(B, Nk, 2, H, D // H).permute(2, 0, 3, 1, 4)       # 2 x (B, H, Nk, hd)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        if self.impl == "math":
            attn = (q @ k.transpose(-2, -1)) * (D // H) ** -0.5
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf"))
            out = attn.softmax(dim=-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return _lin(self.proj, out.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """DiT block with adaLN-Zero and SC-attention (official `DiTBlock`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm1_ = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SCAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 8 * dim))

    def forward(self, x: Tensor, mod: Tensor, ctx: Optional[Tensor] = None,
                key_valid: Optional[Tensor] = None, ctx_normed: bool = False) -> Tensor:
        # x: (B, N, D) tokens being updated; mod: (B, 8D) = adaLN_modulation(c); ctx: (B, Nc, D) or None;
        # ctx_normed: ctx is already norm1_(ctx) (norm1_ has no parameters, so a caller running several
        # blocks on the same context normalizes it once: the same values)
        (shift_msa, scale_msa, shift_ctx, scale_ctx, gate_msa,
         shift_mlp, scale_mlp, gate_mlp) = mod.chunk(8, dim=1)
        x_mod = modulate(self.norm1(x), shift_msa, scale_msa)
        ctx_mod = None
        if ctx is not None:
            ctx_mod = modulate(ctx if ctx_normed else self.norm1_(ctx), shift_ctx, scale_ctx)
        # x + gate * f(x) as one fused op
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(x_mod, ctx_mod, key_valid))
        return torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))


class TokenEmbedding(nn.Module):
    """Official `BertEmbeddings`: word + learned absolute position, LayerNorm(eps 1e-6), dropout."""

    def __init__(self, vocab: int, dim: int, seq_len: int, dropout: float):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, dim)
        self.position_embeddings = nn.Embedding(seq_len, dim)
        self.LayerNorm = nn.LayerNorm(dim, eps=1e-6)
        self.dropout = nn.Dropout(dropout)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.word_embeddings(ids) + self.position_embeddings.weight[: ids.shape[1]]
        return self.dropout(self.LayerNorm(x))


class LabelEmbedding(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)   # + the null class


class MlmLayer(nn.Module):
    """Head: fc -> GELU -> LN, then logits against the (detached) word embeddings + bias."""

    def __init__(self, dim: int, vocab: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, 1, vocab))
        self.fc = nn.Linear(dim, dim)
        self.ln = nn.LayerNorm(dim)
