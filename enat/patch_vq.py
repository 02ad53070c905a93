"""PatchVQ: a tiny k-means patch tokenizer that needs no pretrained weights (demos and tests).

Each non-overlapping ``patch × patch`` RGB patch is replaced by its nearest codebook vector; the
codebook is fit by k-means on training patches in a few seconds on CPU. It has the same interface
as :class:`enat.vqgan.VQGAN`: ``encode`` images in [0, 1] → int64 codes on a grid ``downsample``
(= ``patch``) times smaller, ``decode`` codes → images, plus ``codebook_size`` and ``downsample``.
It is a stand-in for the VQGAN, not part of ENAT.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .checkpoint import Source, load_strict, read_state_dict

__all__ = ["PatchVQ"]


def _patches(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) → (B, H/p, W/p, 3·p·p), each vector in (channel, row, col) order."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)  # (B, 3, h, p, w, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // patch, w // patch, c * patch * patch)


def _unpatch(vectors: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, h, w, 3·p·p) → (B, 3, h·p, w·p); inverse of :func:`_patches`."""
    b, h, w, _ = vectors.shape
    x = vectors.reshape(b, h, w, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)  # (B, 3, h, p, w, p)
    return x.reshape(b, 3, h * patch, w * patch)


def _nearest(x: torch.Tensor, codebook: torch.Tensor, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows x (N, D) → (index (N,) int64 of the nearest codebook row by L2, squared distance (N,)).

    Rows go through in chunks of ``chunk`` into one reused (chunk, K) distance buffer: a 4096-row
    chunk (16 MB at K=1024) stays cache-friendly and allocates once, where one (65536, K) matrix cost
    a fresh 268 MB (page faults) per call. A GEMM row's bits do not depend on how many rows share the
    call, so the codes are the same for every chunk size (tests/test_equiv_vqgan.py checks it).
    """
    c2 = (codebook * codebook).sum(1)  # (K,)
    n = x.shape[0]
    # equal chunks, no short tail: a GEMM of very few rows may take another kernel (other bits)
    chunk = -(-n // max(1, -(-n // chunk))) if n else 1
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    buf = x.new_empty(min(chunk, n), codebook.shape[0])  # (chunk, K)
    for s in range(0, n, chunk):
        part = x[s:s + chunk]
        d = buf[:part.shape[0]]
        # |x|² is the same for every code, so argmin needs only |c|² − 2 x·c; added back for the distance.
        torch.addmm(c2, part, codebook.t(), alpha=-2.0, out=d)  # (n, K)
        torch.min(d, dim=1, out=(dist[s:s + chunk], idx[s:s + chunk]))
        dist[s:s + chunk].add_((part * part).sum(1)).clamp_min_(0.0)
    return idx, dist


class PatchVQ(nn.Module):
    """Patch k-means tokenizer with a ``codebook`` buffer (codebook_size, 3·patch·patch) in [0, 1]."""

    def __init__(self, codebook_size: int, patch: int, codebook: Optional[torch.Tensor] = None):
        super().__init__()
        for name, value in (("codebook_size", codebook_size), ("patch", patch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PatchVQ.{name}: expected a positive int, got {value!r}")
        self.codebook_size = codebook_size
        self.patch = patch
        self.downsample = patch
        dim = 3 * patch * patch
        if codebook is None:
            codebook = torch.zeros(codebook_size, dim)
        if tuple(codebook.shape) != (codebook_size, dim):
            raise ValueError(f"PatchVQ: codebook must have shape ({codebook_size}, {dim}), "
                             f"got {tuple(codebook.shape)}")
        self.register_buffer("codebook", codebook.detach().float().clone())  # (K, 3·p·p)

    @classmethod
    def fit(cls, images: torch.Tensor, codebook_size: int = 256, patch: int = 4, iters: int = 10,
            seed: int = 0, init: str = "kmeans++", max_patches: int = 200_000) -> "PatchVQ":
        """Fit the codebook by k-means on the patches of ``images`` float (N, 3, H, W) in [0, 1].

        Uses at most ``max_patches`` patches (a seeded random subset), ``init`` "kmeans++" or
        "random", then ``iters`` Lloyd iterations; empty clusters take the worst-fit patches. The
        result depends only on the inputs and ``seed`` (a ``torch.Generator`` drives every draw).
        Raises ``ValueError`` on a bad shape or when there are fewer patches than codes.
        """
        _check_images(images, patch, "PatchVQ.fit")
        if init not in ("kmeans++", "random"):
            raise ValueError(f"PatchVQ.fit: init must be 'kmeans++' or 'random', got {init!r}")
        if not isinstance(iters, int) or iters < 0:
            raise ValueError(f"PatchVQ.fit: iters must be a non-negative int, got {iters!r}")
        g = torch.Generator().manual_seed(seed)
        x = _patches(images.detach().float().cpu(), patch).reshape(-1, 3 * patch * patch)  # (N, D)
        if x.shape[0] > max_patches:
            x = x[torch.randperm(x.shape[0], generator=g)[:max_patches]]
        n, k = x.shape[0], codebook_size
        if n < k:
            raise ValueError(f"PatchVQ.fit: {n} patches cannot fill a codebook of {k}; "
                             f"give more images or a smaller codebook_size")

        if init == "random":
            centers = x[torch.randperm(n, generator=g)[:k]].clone()
        else:  # k-means++: each next center drawn with probability ∝ squared distance to the chosen ones
            # On a seeded subset: k-means++ is sequential in K, and Lloyd refines on all patches anyway.
            pool = x[torch.randperm(n, generator=g)[:min(n, 32 * k)]]  # (M, D)
            p2 = (pool * pool).sum(1)  # (M,)
            centers = torch.empty(k, x.shape[1])
            centers[0] = pool[torch.randint(len(pool), (1,), generator=g)]
            d2 = torch.full((len(pool),), float("inf"))
            for j in range(k):
                if j:
                    if float(d2.sum()) > 0:
                        pick = torch.multinomial(d2, 1, generator=g)
                    else:  # fewer distinct patches than codes: only duplicates are left
                        pick = torch.randint(len(pool), (1,), generator=g)
                    centers[j] = pool[pick]
                c = centers[j]
                # |p − c|² = |p|² − 2 p·c + |c|² as one matrix-vector product, no (M, D) temporary
                d2 = torch.minimum(d2, torch.addmv(p2, pool, c, alpha=-2.0).add_(c.dot(c)).clamp_min_(0.0))

        for _ in range(iters):
            assign, dist = _nearest(x, centers)
            # float64 sums: the update does not depend on summation order in practice
            sums = torch.zeros(k, x.shape[1], dtype=torch.float64).index_add_(0, assign, x.double())
            counts = torch.bincount(assign, minlength=k)  # (K,)
            filled = counts > 0
            centers[filled] = (sums[filled] / counts[filled, None]).float()
            empty = (~filled).nonzero().flatten()
            if len(empty):  # re-seed empty codes at the currently worst-represented patches
                centers[empty] = x[dist.topk(len(empty)).indices]
        return cls(codebook_size, patch, centers.clamp_(0.0, 1.0))

    @classmethod
    def from_state_dict(cls, source: Source) -> "PatchVQ":
        """Rebuild from ``state_dict()`` output (a dict, path, bytes or open file); patch and
        codebook_size are read off the codebook shape (K, 3·p·p)."""
        sd = read_state_dict(source)
        if "codebook" not in sd or sd["codebook"].dim() != 2:
            raise ValueError(f"PatchVQ state dict: expected a 2-D 'codebook', got keys {sorted(sd)[:10]}")
        k, dim = sd["codebook"].shape
        patch = math.isqrt(dim // 3)
        if 3 * patch * patch != dim:
            raise ValueError(f"PatchVQ state dict: codebook width {dim} is not 3·p·p for any patch size p")
        model = cls(k, patch)
        load_strict(model, sd, what="PatchVQ state dict")
        return model

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float (B, 3, H, W) in [0, 1] → codes int64 (B, H/p, W/p) of the nearest codebook patch."""
        _check_images(images, self.patch, "PatchVQ.encode")
        v = _patches(images.to(self.codebook), self.patch)  # (B, h, w, D)
        idx, _ = _nearest(v.reshape(-1, v.shape[-1]), self.codebook)
        return idx.view(v.shape[:3])

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes int (B, h, w) in [0, codebook_size) → images float32 (B, 3, h·p, w·p) in [0, 1]."""
        if codes.dim() != 3 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"PatchVQ.decode: expected integer codes of shape (B, h, w), "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"PatchVQ.decode: codes must lie in [0, {self.codebook_size}), "
                             f"got range [{int(codes.min())}, {int(codes.max())}]")
        v = self.codebook[codes.to(self.codebook.device, torch.long)]  # (B, h, w, D)
        return _unpatch(v, self.patch).clamp(0.0, 1.0)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(images)

    def extra_repr(self) -> str:
        return f"codebook_size={self.codebook_size}, patch={self.patch}"


def _check_images(images: torch.Tensor, patch: int, where: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.dtype.is_floating_point:
        raise ValueError(f"{where}: expected float images of shape (B, 3, H, W) in [0, 1], "
                         f"got {images.dtype} {tuple(images.shape)}")
    if images.shape[2] % patch or images.shape[3] % patch:
        raise ValueError(f"{where}: image size {tuple(images.shape[2:])} is not a multiple of patch {patch}")
