"""The ENAT training objective (official train.py `LSimple` + libs/nat_misc.py `NATSchedule.sample`).

enat-facts §5: mask ratio r ~ Beta(12, 3), one draw per batch, #masked = round(L r) clamped to
[1, L-1], positions from a random permutation per sample; cross-entropy with label smoothing 0.1 on the
masked tokens only; for class labels the label embedder's extra 10% label drop in train mode (on top
of the dataset's p_uncond 0.15, which the data readers apply; text captions are dropped once, by the
reader); and reuse training: with probability 0.5 per batch a random fraction of the visible tokens is
re-masked, the EMA model encodes that more-masked input without gradient, and the model is trained to
use those features (`prev`).

All randomness comes from one `torch.Generator` (deterministic under a seed), which must live on the
device of the tokens (`torch.Generator(tokens.device)`): every draw is made on that device.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .model import ENAT, ENATState


@dataclass(frozen=True)
class ObjectiveConfig:
    """Defaults are the official ones (enat-facts §5)."""

    mask_beta: tuple[float, float] = (12.0, 3.0)
    label_smoothing: float = 0.1
    reuse_prob: float = 0.5
    class_dropout: float = 0.1       # LabelEmbedder dropout_prob (train mode, online model, class labels only)
    ema_for_cond: bool = True        # reuse features from the EMA model (official default --ema_for_cond 1)
    # differs from official when True: one mask ratio per *sample* instead of per batch. The model's
    # padded path handles the unequal counts; the official rearranger requires equal counts.
    per_sample_ratio: bool = False

    def __post_init__(self) -> None:
        a, b = self.mask_beta
        if a <= 0 or b <= 0:
            raise ValueError(f"ObjectiveConfig.mask_beta must be two positive numbers, got {self.mask_beta!r}")
        for name in ("label_smoothing", "reuse_prob", "class_dropout"):
            v = getattr(self, name)
            if not 0 <= v <= 1:
                raise ValueError(f"ObjectiveConfig.{name} must be in [0, 1], got {v!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def _same_device(a: torch.device, b: torch.device) -> bool:
    """Same device type and index (an unset index means the current device)."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _rand(shape, generator: Optional[torch.Generator], device) -> Tensor:
    return torch.rand(shape, generator=generator, device=device)


def sample_beta(n: int, a: float, b: float, generator: Optional[torch.Generator], device) -> Tensor:
    """n draws of Beta(a, b) as float32 from `generator`.

    Integer shapes (the official 12, 3) use the exact identity Beta(a, b) = G_a / (G_a + G_b) with
    Gamma(k) a sum of k Exp(1) draws, so the generator drives it; other shapes fall back to
    torch.distributions (global RNG).
    """
    if float(a).is_integer() and float(b).is_integer() and a + b <= 64:
        e = -torch.log(_rand((n, int(a + b)), generator, device).double().clamp_min(1e-300))
        ga = e[:, : int(a)].sum(1)
        return (ga / e.sum(1)).float()
    return torch.distributions.Beta(float(a), float(b)).sample((n,)).to(device).float()


def mask_tokens(tokens: Tensor, mask_id: int, config: ObjectiveConfig = ObjectiveConfig(),
                generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Official `NATSchedule.sample`: -> (masked ids (B, L), labels (B, L) with -1 at visible, ratio (B,)).

    tokens: LongTensor (B, L) of codebook ids.
    """
    B, L = tokens.shape
    device = tokens.device
    a, b = config.mask_beta
    ratio = sample_beta(B if config.per_sample_ratio else 1, a, b, generator, device).expand(B)
    # as official: float32 product, round half to even, clamp to [1, L-1]
    n_mask = (L * ratio).round().clamp(min=1, max=L - 1)
    rank = _rand((B, L), generator, device).argsort(dim=-1)
    mask = rank < n_mask[:, None]
    return torch.where(mask, mask_id, tokens), torch.where(mask, tokens, -1), ratio


def remask_visible(masked_ids: Tensor, mask_id: int, generator: Optional[torch.Generator] = None,
                   per_sample: bool = False) -> Tensor:
    """Official reuse branch: mask round(U * #visible) more of the visible tokens (one U per batch;
    count clamped to L-1), chosen at random per sample. -> the more-masked ids (B, L)."""
    B, L = masked_ids.shape
    device = masked_ids.device
    masking = masked_ids == mask_id
    visible = (~masking).sum(-1)                                                   # (B,)
    u = _rand((B,) if per_sample else (1,), generator, device)
    n = (visible * u).round().clamp(0, L - 1)                                      # (B,)
    conf = _rand((B, L), generator, device).masked_fill(masking, float("inf"))
    rank = conf.argsort(dim=-1).argsort(dim=-1)                                    # rank of each position
    more = rank < n[:, None]
    return torch.where(more, mask_id, masked_ids)


def drop_labels(model: ENAT, cond: Tensor, p: float, generator: Optional[torch.Generator]) -> Tensor:
    """Replace each condition by the null one with probability p (official LabelEmbedder.token_drop)."""
    if p <= 0:
        return cond
    drop = _rand((cond.shape[0],), generator, cond.device) < p
    null = model.null_cond(cond.shape[0], cond.device)
    if cond.dim() == 1:
        return torch.where(drop, null, cond)
    return torch.where(drop[:, None, None], null.to(cond.dtype), cond)


def lsimple(model: ENAT, tokens: Tensor, cond: Tensor, ema_model: Optional[ENAT] = None,
            config: ObjectiveConfig = ObjectiveConfig(), generator: Optional[torch.Generator] = None,
            reuse: Optional[bool] = None) -> tuple[Tensor, dict[str, Tensor]]:
    """One batch of the official objective -> (scalar loss, metrics as 0-d tensors).

    tokens: LongTensor (B, L) codebook ids; cond: (B,) labels (already dropped with p_uncond by the
    data reader, as the official CFGDataset does) or (B, T, text_dim) text features. `ema_model` supplies
    the reuse features (the online model is used if None or `config.ema_for_cond` is False). `reuse`
    forces the reuse branch on/off instead of the coin flip.
    """
    net: ENAT = getattr(model, "module", model)        # a DeepSpeed engine wraps the ENAT
    if generator is not None and not _same_device(generator.device, tokens.device):
        raise ValueError(f"lsimple: the generator is on {generator.device} but the tokens are on "
                         f"{tokens.device}; make it with torch.Generator({str(tokens.device)!r})")
    mask_id = net.config.mask_id
    masked_ids, labels, _ = mask_tokens(tokens, mask_id, config, generator)
    coin = _rand((1,), generator, tokens.device)
    if reuse is None:
        reuse = bool(coin.item() < config.reuse_prob)   # one host read per batch, as official
    prev: Optional[ENATState] = None
    if reuse:
        feat_net = ema_model if (ema_model is not None and config.ema_for_cond) else model
        prev_ids = remask_visible(masked_ids, mask_id, generator, config.per_sample_ratio)
        with torch.no_grad():
            training = feat_net.training
            if feat_net is ema_model:
                feat_net.eval()                     # as official: the EMA model runs in eval mode
            prev = feat_net(prev_ids, cond).state
            feat_net.train(training)
    # as official: the embedder's extra label drop applies to the online model only (the EMA runs in
    # eval mode), on top of the reader's p_uncond (0.15 + 0.1 -> 0.235 null labels). Text models have
    # no label embedder: U-ViT drops the caption once, in the dataset (p_uncond 0.1, enat-facts §10),
    # so the reader's p_uncond is the only caption drop.
    drop_here = net.training and not net.config.text_conditioned
    cond_online = drop_labels(net, cond, config.class_dropout, generator) if drop_here else cond
    # logits for the masked tokens only (the loss ignores visible positions; official computes all L);
    # through model.__call__ so wrappers' forward hooks (DeepSpeed ZeRO-3) see the whole computation
    out = model(masked_ids, cond_online, prev=prev, masked_only=True)
    logits = out.logits.float()                                                    # (B, N_mask, K)
    if out.masked_index is None:                                                   # baseline NAT: all L
        target = labels
    else:
        target = labels.gather(1, out.masked_index.clamp(min=0))
        target = torch.where(out.masked_index >= 0, target, -1)
    loss = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-1,
                           label_smoothing=config.label_smoothing)
    with torch.no_grad():
        valid = target >= 0
        acc = ((logits.argmax(-1) == target) & valid).sum() / valid.sum().clamp(min=1)
        metrics = {"masked_token_ratio": (masked_ids == mask_id).float().mean(),
                   "mask_acc": acc, "reuse": torch.tensor(float(reuse))}
    return loss, metrics


@torch.no_grad()
def ema_update(ema_model: nn.Module, model: nn.Module, rate: float) -> None:
    """Official utils.ema: p_ema = rate * p_ema + (1 - rate) * p, over named parameters."""
    src = dict(model.named_parameters())
    named = list(ema_model.named_parameters())
    ema_update_tensors([p for _, p in named], [src[n] for n, _ in named], rate)


def ema_update_tensors(dst: list[Tensor], src: list[Tensor], rate: float) -> None:
    """dst = rate * dst + (1 - rate) * src, tensor by tensor (foreach ops), in place."""
    torch._foreach_mul_(dst, rate)
    torch._foreach_add_(dst, src, alpha=1 - rate)


def warmup_constant(warmup_steps: int) -> Callable[[int], float]:
    """The official LR multiplier for a `LambdaLR` stepped once after every update (`sched.step()`).

    as official (train.py): `LambdaLR(min(step / warmup, 1))` is stepped after `optimizer.step()` with
    the pre-increment step, `lr_scheduler.step(train_state.step)`, so update k (1-based) runs at
    min(max(k - 2, 0) / warmup, 1): the first two updates at lr 0. A LambdaLR stepped without an
    argument evaluates its lambda at k - 1 for update k, hence the shift by one here. enat-facts §5.
    """
    if warmup_steps <= 0:
        return lambda k: 1.0
    return lambda k: min(max(k - 1, 0) / warmup_steps, 1.0)
