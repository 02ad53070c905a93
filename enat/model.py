"""ENAT: the disentangled masked-token transformer with SC-attention and computation reuse.

Faithful to the official code (LeapLabTHU/ENAT, libs/models.py `DiT`), with the same state-dict layout
so released checkpoints load strictly (see `../shared/reference/enat-facts.md` §7):

- visible tokens go through the NE encoder blocks on their own; [MASK] tokens go through the ND decoder
  blocks, attending to the fully encoded visible tokens through SC-attention (one attention over
  [context; self] keys/values with separate kv weights `kv.A` / `kv.B` and separate adaLN shift/scale for
  the two streams);
- with `prev` (the previous step's state) only the newly revealed tokens are encoded; the previous step's
  visible features, passed through `prev_proj`, are the encoder's context and the decoder's visible set.

Everything is written in terms of index sets gathered from the full sequence (static shapes when every
sample has the same counts, which is what sampling and the official training produce), with a padded
path for unequal counts. Text conditioning (MS-COCO) uses the same path: the projected text features are
tokens that are always visible (see `ENATConfig.text_dim`). The building blocks are in `enat.layers`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple, Optional

import torch
from torch import Tensor, nn

from .checkpoint import Source, load_strict, read_state_dict
from .layers import Block, LabelEmbedding, Mlp, MlmLayer, PrevProj, TokenEmbedding, _lin, fused_enabled, linear


# ----------------------------------------------------------------------------------------------------
# Config and presets
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ENATConfig:
    """Architecture of an ENAT model. Defaults are the official code's (enat-facts §3, §7).

    `disentangled=False` gives the paper's baseline NAT: every block processes visible and [MASK]
    tokens together with plain self-attention (`encoder_depth` blocks, `decoder_depth` must be 0).
    `text_dim` switches class conditioning (adaLN on a label embedding) to text conditioning: the
    [B, text_len, text_dim] features are projected to `dim` and concatenated with the visual tokens as
    always-visible tokens (enat-facts §10: "we concatenate text embeddings with visual tokens"); adaLN
    is conditioned on their mean. The empty-caption features play the null class.
    """

    encoder_depth: int
    decoder_depth: int
    dim: int
    num_heads: int
    codebook_size: int = 1024
    num_classes: int = 1000
    seq_len: int = 256
    mlp_ratio: float = 4.0
    emb_dropout: float = 0.1      # BertEmbeddings dropout (official 0.1)
    class_dropout: float = 0.1    # LabelEmbedder dropout_prob (class labels only; see enat.objective)
    disentangled: bool = True
    text_dim: Optional[int] = None
    text_len: int = 77

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise ValueError(f"ENATConfig: {msg}")
        for name in ("encoder_depth", "decoder_depth", "dim", "num_heads", "codebook_size", "num_classes",
                     "seq_len", "text_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(f"{name} must be an int, got {v!r}")
        if self.encoder_depth < (1 if not self.disentangled else 0) or self.decoder_depth < 0:
            bad(f"depths must be >= 0, got encoder_depth={self.encoder_depth}, decoder_depth={self.decoder_depth}")
        if self.disentangled and self.decoder_depth < 1:
            bad("a disentangled ENAT needs decoder_depth >= 1 (the [MASK] tokens are decoded by it)")
        if not self.disentangled and self.decoder_depth != 0:
            bad("the baseline NAT (disentangled=False) has only shared blocks: set decoder_depth=0")
        if self.dim < 1 or self.num_heads < 1 or self.dim % self.num_heads:
            bad(f"dim ({self.dim}) must be a positive multiple of num_heads ({self.num_heads})")
        if self.codebook_size < 2 or self.num_classes < 1 or self.seq_len < 1:
            bad("codebook_size >= 2, num_classes >= 1, seq_len >= 1 required")
        if math.isqrt(self.seq_len) ** 2 != self.seq_len:
            bad(f"seq_len must be a square token grid (256 at 256 px, 1024 at 512 px), got {self.seq_len}")
        if not 0 <= self.emb_dropout < 1 or not 0 <= self.class_dropout < 1:
            bad("dropout probabilities must be in [0, 1)")
        if self.text_dim is not None and self.text_dim < 1:
            bad(f"text_dim must be positive or None, got {self.text_dim}")

    @property
    def depth(self) -> int:
        return self.encoder_depth + self.decoder_depth

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def grid(self) -> int:
        return math.isqrt(self.seq_len)

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def null_class(self) -> int:
        return self.num_classes

    @property
    def text_conditioned(self) -> bool:
        return self.text_dim is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def preset(name: str) -> "ENATConfig":
        """The paper's configurations by name; `ENATConfig.presets()` lists them."""
        try:
            return _PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown ENAT preset {name!r}; known: {', '.join(sorted(_PRESETS))}") from None

    @staticmethod
    def presets() -> list[str]:
        return sorted(_PRESETS)


# enat-facts §3 (paper Table 7, Sec. 5; official `--enc_dec`, `--embed_dim`, `--num_heads`).
_PRESETS: dict[str, ENATConfig] = {
    "enat-s": ENATConfig(15, 1, 366, 6),                       # head_dim 61, as printed
    "enat-b": ENATConfig(15, 1, 768, 8),                       # 219,646,721 params
    "enat-l": ENATConfig(22, 2, 1024, 16),                     # 574,298,113 params
    "enat-s-512": ENATConfig(15, 1, 366, 6, seq_len=1024),
    "enat-b-512": ENATConfig(15, 1, 768, 8, seq_len=1024),
    "enat-l-512": ENATConfig(22, 2, 1024, 16, seq_len=1024),   # 575,084,545 params
    # Ablations (enat-facts §2 Tables 1, 2): baseline NAT and the disentangled splits without reuse.
    "nat-baseline": ENATConfig(8, 0, 288, 6, disentangled=False),
    "disentangled-8-8": ENATConfig(8, 8, 288, 6),
    "disentangled-12-4": ENATConfig(12, 4, 318, 6),
    # MS-COCO: the paper's ENAT-B has 116M parameters but its shape is not published (enat-facts §3,
    # §10, §11 item 11). Our choice: ENAT-B's width and heads (768, 8) and its encoder-heavy split at
    # half the depth (7 encoder + 1 decoder blocks), with CLIP ViT-L/14 text features (77 x 768)
    # projected to 768 and concatenated as always-visible tokens (U-ViT's COCO conditioning):
    # 115,542,785 parameters (-0.4% from 116M; the unused prev_embedder counted, as the paper does).
    "enat-b-coco": ENATConfig(7, 1, 768, 8, text_dim=768, text_len=77),
}


class ENATState(NamedTuple):
    """What a forward returns for the next step to reuse (official `prev_dict`)."""
    feat: Tensor      # (B, S, D) features before the final norm; S = text_len + seq_len with text
    masking: Tensor   # (B, seq_len) bool, True where the input was [MASK]


class ENATOutput(NamedTuple):
    logits: Tensor    # (B, seq_len, codebook_size), or (B, N_mask, codebook_size) with masked_only=True
    state: ENATState
    # with masked_only=True: the image position of each logits row (B, N_mask), -1 for padding rows
    masked_index: Optional[Tensor] = None


class TokenSets(NamedTuple):
    """Index sets into the full sequence (text slots first, then image positions).

    old: previously visible (features come from `prev`), new: visible now and encoded now, masked:
    decoded now. Each is (B, n) long; the *_valid masks are None when every entry is real (the
    equal-count case) or (B, n) bool for the padded path.
    """
    old: Tensor
    new: Tensor
    masked: Tensor
    old_valid: Optional[Tensor] = None
    new_valid: Optional[Tensor] = None
    masked_valid: Optional[Tensor] = None


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

class ENAT(nn.Module):
    """ENAT (or the baseline NAT) for class- or text-conditional token generation.

    `model(ids, cond, prev=None) -> ENATOutput(logits, state)`:
      ids:  LongTensor (B, seq_len), `codebook_size` is [MASK];
      cond: LongTensor (B,) class labels with `num_classes` as the null class, or for text models
            FloatTensor (B, text_len, text_dim) text-encoder features (the empty caption is the null);
      prev: the `state` of this stream's previous step (reuse), or None. Masks may only shrink
            between steps (a token visible in `prev` stays visible).
    """

    def __init__(self, config: ENATConfig):
        super().__init__()
        self.config = config
        D = config.dim
        self.x_embedder = TokenEmbedding(config.codebook_size + 1, D, config.seq_len, config.emb_dropout)
        if config.text_conditioned:
            self.text_proj = nn.Linear(config.text_dim, D)
            self.register_buffer("null_text", torch.zeros(config.text_len, config.text_dim))
        else:
            self.y_embedder = LabelEmbedding(config.num_classes, D)
        # as official: `prev_embedder` is defined but never called; kept so released checkpoints load
        # strictly and parameter counts equal the paper's (enat-facts §3).
        self.prev_embedder = Mlp(D, 4 * D)
        self.prev_proj = PrevProj(D)
        self.blocks = nn.ModuleList(Block(D, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.norm = nn.LayerNorm(D)
        self.mlm_layer = MlmLayer(D, config.codebook_size + 1)
        self.initialize_weights()

    # -- construction ---------------------------------------------------------------------------------

    def initialize_weights(self) -> None:
        """Official init: xavier-uniform Linear weights, zero biases, N(0, 0.02) embeddings, adaLN zero."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.x_embedder.word_embeddings.weight, std=0.02)
        nn.init.normal_(self.x_embedder.position_embeddings.weight, std=0.02)
        if not self.config.text_conditioned:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for b in self.blocks:
            nn.init.zeros_(b.adaLN_modulation[1].weight)
            nn.init.zeros_(b.adaLN_modulation[1].bias)

    @classmethod
    def from_official(cls, source: Source, config: ENATConfig | str) -> "ENAT":
        """Load a checkpoint in the official key layout (e.g. the released ENAT-L `nnet_ema.pth`).

        `source`: a state dict, a local path, bytes or an open binary file. Wrapper keys (`model`,
        `state_dict`, ...) and a DDP `module.` prefix are accepted. Raises ValueError naming missing /
        unexpected keys and shape mismatches.
        """
        if isinstance(config, str):
            config = ENATConfig.preset(config)
        model = cls(config)
        sd = read_state_dict(source)
        # as official utils.TrainState.load: drop `position_ids` buffers of older transformers layouts
        load_strict(model, sd, what=f"ENAT checkpoint for {config}", ignore=("position_ids",))
        model.eval()
        return model

    def set_attention(self, impl: str) -> "ENAT":
        """'sdpa' (default: fused / flash kernels) or 'math' (the official explicit softmax)."""
        if impl not in ("sdpa", "math"):
            raise ValueError(f"attention impl must be 'sdpa' or 'math', got {impl!r}")
        for b in self.blocks:
            b.attn.impl = impl
        return self

    def set_null_text(self, features: Tensor) -> None:
        """Store the empty-caption features (text_len, text_dim) used as the null condition."""
        if not self.config.text_conditioned:
            raise ValueError("set_null_text: this is a class-conditional model")
        self.null_text.copy_(features.reshape(self.null_text.shape))

    # -- conditioning ----------------------------------------------------------------------------------

    def null_cond(self, batch: int, device: torch.device | None = None) -> Tensor:
        """The unconditional condition for `batch` samples (null class or empty caption)."""
        device = device or self.mlm_layer.bias.device
        if self.config.text_conditioned:
            return self.null_text.to(device).expand(batch, -1, -1)
        return torch.full((batch,), self.config.null_class, dtype=torch.long, device=device)

    def embed_cond(self, cond: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """-> (c (B, D) for adaLN, text tokens (B, T, D) or None)."""
        cfg = self.config
        if cfg.text_conditioned:
            if cond.dim() != 3 or cond.shape[1:] != (cfg.text_len, cfg.text_dim):
                raise ValueError(f"text-conditional ENAT expects cond of shape (B, {cfg.text_len}, "
                                 f"{cfg.text_dim}), got {tuple(cond.shape)}")
            t = self.text_proj(cond.to(self.text_proj.weight.dtype))
            return t.mean(dim=1), t
        if cond.dim() != 1 or cond.dtype not in (torch.long, torch.int, torch.int32, torch.int16):
            raise ValueError(f"class-conditional ENAT expects cond as a LongTensor (B,), got "
                             f"{cond.dtype} {tuple(cond.shape)}")
        return self.y_embedder.embedding_table(cond.long()), None

    @property
    def num_text_tokens(self) -> int:
        return self.config.text_len if self.config.text_conditioned else 0

    # -- forward ---------------------------------------------------------------------------------------

    def forward(self, ids: Tensor, cond: Tensor, prev: Optional[ENATState] = None,
                masked_only: bool = False) -> ENATOutput:
        """See the class docstring. `masked_only=True` computes the head for the [MASK] positions only
        (what training needs: the loss ignores visible positions) and returns their positions."""
        cfg = self.config
        if ids.dim() != 2 or ids.shape[1] != cfg.seq_len:
            raise ValueError(f"ids must be (B, {cfg.seq_len}), got {tuple(ids.shape)}")
        masking = ids == cfg.mask_id                                       # (B, L)
        if not cfg.disentangled:
            if prev is not None:
                raise ValueError("the baseline NAT (disentangled=False) has no reuse path")
            return self._forward_uniform(ids, cond, masking)
        sets = self.token_sets(masking, None if prev is None else prev.masking)
        feat, x_m = self.forward_sets(ids, cond, sets, prev)
        if masked_only:
            pos = sets.masked - self.num_text_tokens
            if sets.masked_valid is not None:
                pos = torch.where(sets.masked_valid, pos, -1)
            return ENATOutput(self.head(x_m), ENATState(feat, masking), pos)
        logits = self.head(feat[:, self.num_text_tokens:])
        return ENATOutput(logits, ENATState(feat, masking))

    def token_sets(self, masking: Tensor, prev_masking: Optional[Tensor]) -> TokenSets:
        """Index sets from the current (and previous) [MASK] pattern; syncs to read the counts.

        The sampler builds the same sets without a host sync from the schedule (enat.sampler).
        """
        B, L = masking.shape
        T = self.num_text_tokens
        # class key per position: 0 = old visible, 1 = new visible, 2 = masked; text slots are old
        # visible when reusing (their features come from prev) and new otherwise.
        key = masking.to(torch.int8) * 2
        if prev_masking is None:
            key = key + (~masking).to(torch.int8)
        else:
            if torch.any(masking & ~prev_masking):
                raise ValueError("prev: a token visible at the previous step is [MASK] now; masks may "
                                 "only shrink between steps")
            key = key + (~masking & prev_masking).to(torch.int8)
        text_key = 0 if prev_masking is not None else 1
        key = torch.cat([key.new_full((B, T), text_key), key], dim=1)     # (B, S)
        counts = torch.stack([(key == k).sum(1) for k in range(3)], dim=1)  # (B, 3)
        order = torch.argsort(key, dim=1, stable=True)                   # old, new, masked; position order
        if bool((counts == counts[:1]).all()):
            n_old, n_new, _ = (int(v) for v in counts[0].tolist())
            return TokenSets(order[:, :n_old], order[:, n_old:n_old + n_new], order[:, n_old + n_new:])
        # unequal counts: pad every set to its largest count; padded slots are masked out as keys
        # and dropped at the scatter (differs from official, which requires equal counts).
        starts = torch.cumsum(counts, dim=1) - counts
        sets, valids = [], []
        for k in range(3):
            n = int(counts[:, k].max())
            ar = torch.arange(n, device=key.device)
            pos = (starts[:, k:k + 1] + ar).clamp(max=key.shape[1] - 1)
            sets.append(order.gather(1, pos))
            valids.append(ar < counts[:, k:k + 1])
        return TokenSets(*sets, *valids)

    def embed_tokens(self, ids: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        """-> (x (B, S, D) the embedded full sequence [text; image], c (B, D))."""
        c, text = self.embed_cond(cond)
        x = self.x_embedder(ids)                                           # (B, L, D)
        if text is not None:
            x = torch.cat([text.to(x.dtype), x], dim=1)                    # (B, T + L, D)
        return x, c

    def forward_sets(self, ids: Tensor, cond: Tensor, sets: TokenSets, prev: Optional[ENATState],
                     ) -> tuple[Tensor, Tensor]:
        """Encoder + decoder over given index sets -> (feat (B, S, D), decoded [MASK] features (B, Nm, D))."""
        x, c = self.embed_tokens(ids, cond)
        old_feat = None
        if prev is not None:
            old_feat = _gather(prev.feat, sets.old)                  # may be empty; still goes through prev_proj
        elif sets.old.shape[1]:
            raise ValueError("token sets with previously visible tokens need `prev`")
        vis, x_m = self.run_blocks(x, c, sets, old_feat)
        # restore positions; padded entries go to a dummy slot S that is cut off
        B, S, D = x.shape
        all_idx = torch.cat([sets.old, sets.new, sets.masked], dim=1)
        all_valid = _cat_valid(_cat_valid(sets.old_valid, sets.new_valid, sets.old, sets.new),
                               sets.masked_valid, torch.cat([sets.old, sets.new], 1), sets.masked)
        if all_valid is not None:
            all_idx = torch.where(all_valid, all_idx, S)
        feat = x.new_zeros(B, S + (all_valid is not None), D)
        feat = feat.scatter(1, all_idx.unsqueeze(-1).expand(-1, -1, D), torch.cat([vis, x_m], dim=1))
        return feat[:, :S], x_m

    def run_blocks(self, x: Tensor, c: Tensor, sets: TokenSets, old_feat: Optional[Tensor],
                   mods: Optional[list[Tensor]] = None) -> tuple[Tensor, Tensor]:
        """The encoder and decoder stacks.

        x: (B, S, D) embedded sequence; c: (B, D); old_feat: (B, N_old, D) the previous step's features
        at `sets.old` (before `prev_proj`), or None; mods: each block's adaLN output (B, 8D) if
        precomputed (they are constant over the steps of one sampling run).
        Returns (visible features (B, N_old + N_new, D) in `[sets.old, sets.new]` order, decoded [MASK]
        features (B, N_mask, D)), both before the final norm.
        """
        NE = self.config.encoder_depth
        if sets.old.shape[1] and (old_feat is None or old_feat.shape[1] != sets.old.shape[1]):
            raise ValueError("run_blocks: old_feat must hold the features of every entry of sets.old")
        if mods is None:
            mods = [b.adaLN_modulation(c) for b in self.blocks]
        # Empty sets still run through their layers (zero-size ops): the autograd graph then has the
        # same structure whatever the token counts, which distributed gradient reduction relies on
        # (DeepSpeed reduces gradients in the order they become ready).
        ctx = None
        if old_feat is not None:
            # the stop-gradient on reused features (official: prev_dict['feat'].detach()). The features
            # enter in this model's compute dtype: in training they come from the float32 EMA while
            # this model may hold bf16/fp16 weights (DeepSpeed), and under autocast the trailing cast
            # brings prev_proj's promoted output back to the stream's dtype.
            ctx = self.prev_proj(old_feat.detach().to(x.dtype)).to(x.dtype)         # (B, N_old, D)
        enc_valid = _cat_valid(sets.old_valid, sets.new_valid, sets.old, sets.new)
        x_new = _gather(x, sets.new)                                                  # (B, N_new, D)
        # inference: every encoder block normalizes the same context with the same parameter-free
        # LayerNorm (norm1_), so it is normalized once here (same values; training keeps the per-block op)
        ctx_n, normed = ctx, False
        if ctx is not None and NE and fused_enabled():
            ctx_n, normed = self.blocks[0].norm1_(ctx), True
        for blk, mod in zip(self.blocks[:NE], mods[:NE]):
            x_new = blk(x_new, mod, ctx_n, enc_valid if ctx is not None else sets.new_valid, ctx_normed=normed)
        # the fully encoded visible set: reused (projected) old features and the new encoder outputs
        vis = x_new if ctx is None else torch.cat([ctx, x_new], dim=1)
        vis_valid = enc_valid if ctx is not None else sets.new_valid
        x_m = _gather(x, sets.masked)                                                 # (B, N_mask, D)
        key_valid = _cat_valid(vis_valid, sets.masked_valid, vis[..., 0], sets.masked)
        for blk, mod in zip(self.blocks[NE:], mods[NE:]):
            x_m = blk(x_m, mod, vis, key_valid)
        return vis, x_m

    def head(self, h: Tensor) -> Tensor:
        """Final norm + MLM head: features (..., D) before the final norm -> logits (..., codebook_size)."""
        m = self.mlm_layer
        h = m.ln(_lin(m.fc, self.norm(h), gelu="none"))
        K = self.config.codebook_size
        # tied, detached word embeddings (official: word_embeddings.weight.data.detach()); only the
        # first K rows are used, which equals computing all K+1 logits and slicing them (official).
        w = self.x_embedder.word_embeddings.weight.detach()[:K]
        return linear(h, w.to(h.dtype), m.bias[0, 0, :K].to(h.dtype))

    def _forward_uniform(self, ids: Tensor, cond: Tensor, masking: Tensor) -> ENATOutput:
        """Baseline NAT: all tokens through every block with plain self-attention (no reuse)."""
        x, c = self.embed_tokens(ids, cond)
        for blk in self.blocks:
            x = blk(x, blk.adaLN_modulation(c))
        return ENATOutput(self.head(x[:, self.num_text_tokens:]), ENATState(x, masking))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    """t (B, S, D), idx (B, n) -> (B, n, D)."""
    return t.gather(1, idx.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def _cat_valid(a: Optional[Tensor], b: Optional[Tensor], a_idx: Tensor, b_idx: Tensor) -> Optional[Tensor]:
    """Concatenate two validity masks, where None means 'all valid'."""
    if a is None and b is None:
        return None
    if a is None:
        a = torch.ones_like(a_idx, dtype=torch.bool)
    if b is None:
        b = torch.ones_like(b_idx, dtype=torch.bool)
    return torch.cat([a, b], dim=1)
