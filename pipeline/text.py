"""Text encoders for caption datasets: captions → float16 features ``(B, T, D)``.

* :class:`CLIPTextEncoder` — the reference: CLIP ViT-L/14's text tower through ``transformers``
  (imported lazily, only when used), as U-ViT's ``FrozenCLIPEmbedder``: tokenize with padding to
  ``max_length=77`` and truncation, take ``last_hidden_state`` → ``(77, 768)`` (enat-facts §10).
  Weights are loaded from a local directory or a URL (a directory on object storage is copied to a
  local temporary directory first); nothing is downloaded from a hub.
* :class:`RandomTextEncoder` — same interface, no downloads: UTF-8 byte tokens
  (BOS, bytes, EOS, pad to T) through a tiny causal transformer whose weights are drawn from a
  seed. Deterministic; for offline tests and demos.

Both expose ``name``, ``dim``, ``length``, ``identity()`` and ``encode(list[str]) -> np.float16``.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from pipeline import storage
from pipeline.commits import state_sha256
from pipeline.config import location


@dataclass(frozen=True)
class TextConfig:
    """Text encoder for caption datasets (COCO) and text models; ignored for class-labelled data."""

    kind: Literal["clip", "random"] = "clip"  # clip: CLIP ViT-L/14 text tower; random: offline stand-in
    # clip: a local directory / URL with a transformers CLIPTextModel + CLIPTokenizer
    # (openai/clip-vit-large-patch14, as U-ViT's FrozenCLIPEmbedder; enat-facts §10)
    weights: Optional[str] = location(None)  # clip only (see above)
    length: int = 77  # tokens per caption (CLIP's context length)
    dim: int = 64  # random encoder width (clip: taken from the model, 768 for ViT-L/14)
    seed: int = 0  # random encoder weights
    batch_size: int = 64  # captions per forward


class TextEncoder(Protocol):
    name: str
    dim: int
    length: int

    def encode(self, captions: Sequence[str]) -> np.ndarray:
        """Captions → float16 ``(len(captions), length, dim)``."""

    def identity(self) -> dict[str, Any]:
        """JSON-friendly description recorded in dataset.json (kind, weights hash, …)."""


class _TinyCausalLM(nn.Module):
    def __init__(self, vocab: int, length: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(length, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.register_buffer("mask", torch.triu(torch.full((length, length), float("-inf")), 1), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos  # (B, T, D)
        return self.norm(self.blocks(x, mask=self.mask, is_causal=True))  # (B, T, D)


class RandomTextEncoder:
    """Deterministic random text encoder with the CLIP encoder's interface (tests, demos)."""

    PAD, BOS, EOS = 0, 257, 258

    def __init__(self, dim: int = 64, length: int = 77, seed: int = 0, heads: int = 4, layers: int = 1):
        if dim % heads:
            raise ValueError(f"RandomTextEncoder: dim {dim} must be a multiple of heads {heads}")
        self.name, self.dim, self.length, self.seed = "random", dim, length, seed
        gen_state = torch.random.get_rng_state()
        try:
            torch.manual_seed(seed)  # weights are a pure function of the seed
            self.model = _TinyCausalLM(259, length, dim, heads, layers).eval().requires_grad_(False)
            with torch.no_grad():
                self.model.pos.normal_(0.0, 0.02)
        finally:
            torch.random.set_rng_state(gen_state)
        self._sha = state_sha256(self.model)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        """Captions → int64 ``(B, length)``: BOS, UTF-8 bytes + 1, EOS, then PAD (truncated to fit)."""
        ids = torch.full((len(captions), self.length), self.PAD, dtype=torch.long)
        for i, c in enumerate(captions):
            body = [b + 1 for b in c.encode("utf-8")][: self.length - 2]
            row = [self.BOS, *body, self.EOS]
            ids[i, : len(row)] = torch.tensor(row)
        return ids

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> np.ndarray:
        if not len(captions):
            return np.zeros((0, self.length, self.dim), np.float16)
        out = self.model(self.tokenize(captions))  # (B, T, D)
        return out.to(torch.float16).numpy()

    def identity(self) -> dict[str, Any]:
        return {"kind": "random", "dim": self.dim, "length": self.length, "seed": self.seed,
                "weights_sha256": self._sha}


class CLIPTextEncoder:
    """CLIP text tower via ``transformers`` (lazy import), as U-ViT's ``FrozenCLIPEmbedder``.

    ``source``: a local directory or URL holding ``config.json``, the weights and the tokenizer
    files (``save_pretrained`` output of ``openai/clip-vit-large-patch14``). Raises ``ImportError``
    with the fix if ``transformers`` is missing.
    """

    def __init__(self, source: str, length: int = 77, device: str = "cpu",
                 storage_cfg: storage.StorageLike = None):
        try:
            from transformers import CLIPTextModel, CLIPTokenizer
        except ImportError as e:
            raise ImportError("text.kind=clip needs the 'transformers' package "
                              "(pip install transformers), or use text.kind=random offline") from e
        self._tmp = None
        local = self._localize(source, storage_cfg)
        self.name, self.length, self.device = "clip", length, torch.device(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(local)
        self.model = CLIPTextModel.from_pretrained(local).eval().requires_grad_(False).to(self.device)
        self.dim = int(self.model.config.hidden_size)
        self.source = storage.redact(source)
        self._sha = state_sha256(self.model)

    def _localize(self, source: str, storage_cfg: storage.StorageLike) -> str:
        fs, path = storage.filesystem(source, storage_cfg)
        if storage.is_local(fs):
            return path
        self._tmp = tempfile.TemporaryDirectory(prefix="clip-text-")
        for p in fs.find(path):
            rel = p[len(path.rstrip("/")):].lstrip("/")
            dst = os.path.join(self._tmp.name, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            fs.get_file(p, dst)
        return self._tmp.name

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> np.ndarray:
        if not len(captions):
            return np.zeros((0, self.length, self.dim), np.float16)
        # as U-ViT: libs/clip.py FrozenCLIPEmbedder (truncation, padding="max_length", 77)
        batch = self.tokenizer(list(captions), truncation=True, max_length=self.length, return_length=True,
                               return_overflowing_tokens=False, padding="max_length", return_tensors="pt")
        tokens = batch["input_ids"].to(self.device)
        z = self.model(input_ids=tokens).last_hidden_state  # (B, 77, 768)
        return z.to(torch.float16).cpu().numpy()

    def identity(self) -> dict[str, Any]:
        return {"kind": "clip", "source": self.source, "dim": self.dim, "length": self.length,
                "weights_sha256": self._sha}


def build_text_encoder(cfg: TextConfig, device: str = "cpu",
                       storage_cfg: storage.StorageLike = None) -> TextEncoder:
    """``TextConfig`` → encoder. Raises ``ValueError`` for clip without weights."""
    if cfg.kind == "random":
        return RandomTextEncoder(dim=cfg.dim, length=cfg.length, seed=cfg.seed)
    if cfg.kind == "clip":
        if not cfg.weights:
            raise ValueError("text.weights: required for text.kind=clip (local dir or URL of the "
                             "CLIP ViT-L/14 text model); use text.kind=random offline")
        return CLIPTextEncoder(cfg.weights, length=cfg.length, device=device, storage_cfg=storage_cfg)
    raise ValueError(f"text.kind: unknown text encoder {cfg.kind!r}; known: clip, random")


def encode_in_batches(encoder: TextEncoder, captions: Sequence[str], batch_size: int) -> np.ndarray:
    """Encode any number of captions, ``batch_size`` at a time → float16 ``(N, T, D)``."""
    parts = [encoder.encode(captions[i:i + batch_size]) for i in range(0, len(captions), batch_size)]
    if not parts:
        return np.zeros((0, encoder.length, encoder.dim), np.float16)
    return np.concatenate(parts)


def empty_context(encoder: TextEncoder) -> np.ndarray:
    """The empty caption's features ``(T, D)`` float16, used for guidance and caption dropping."""
    return encoder.encode([""])[0]
