"""FID / IS statistics in pure torch: Fréchet distance, exact mergeable statistics, the IS protocol.

The features and logits come from the FID Inception network (`enat.inception.FIDInception`).
Statistics are exact and mergeable so that a sharded evaluation reduces to the single-pass numbers
(ecosystem.md §5.3): `FeatureStats` keeps (n, Σx, Σxxᵀ) in float64, `ISStats` keeps per-split
(n_k, Σp, Σ p·log p) with the split a function of the global sample index, never of the worker. The
Inception Score follows torch-fidelity's default protocol (seeded shuffle, then 10 splits).
"""
from __future__ import annotations

import functools
import io
import os
import warnings
from dataclasses import dataclass
from typing import BinaryIO, Literal, Optional, Union

import numpy as np
import torch
from torch import Tensor

from .inception import NUM_CLASSES

ArrayLike = Union[np.ndarray, Tensor]
FileSource = Union[str, os.PathLike, BinaryIO, bytes]


# ----------------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------------

def _np64(a: ArrayLike) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().to("cpu", torch.float64).numpy()
    return np.asarray(a, dtype=np.float64)


def _torch64(a: ArrayLike) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().to(torch.float64)
    return torch.from_numpy(np.asarray(a, dtype=np.float64))


def _sqrtm(a: np.ndarray) -> np.ndarray:
    from scipy import linalg  # lazy: only this path needs scipy

    with warnings.catch_warnings():
        # pytorch-fid calls sqrtm(disp=False), which is silent; newer scipy warns instead and
        # deprecates `disp`. The finiteness check below is what decides.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        out = linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike,
                     eps: float = 1e-6, method: Literal["sqrtm", "eigvals"] = "sqrtm") -> float:
    """‖mu1 − mu2‖² + tr(sigma1 + sigma2 − 2 (sigma1 sigma2)^½), in float64.

    mu [D], sigma [D, D], numpy or torch (converted to float64). `method`:
    - "sqrtm" (default): pytorch-fid's `calculate_frechet_distance` — scipy `sqrtm` of sigma1·sigma2;
      if not finite, retry with `eps` added to both diagonals (warns); a complex result whose diagonal's
      imaginary part exceeds 1e-3 raises `ValueError`, otherwise its real part is used.
    - "eigvals": the official ENAT eval (enat-facts §9, = torchmetrics): Σ sqrt(eigvals(sigma1·sigma2)).real
      in torch float64, on the inputs' device.
    Raises `ValueError` for mismatched shapes or an unknown method.
    """
    if method == "eigvals":
        m1, m2, s1, s2 = (_torch64(a) for a in (mu1, mu2, sigma1, sigma2))
        m1, m2, s1, s2 = m1.reshape(-1), m2.reshape(-1).to(m1.device), s1.to(m1.device), s2.to(m1.device)
        _check_shapes(m1.shape, s1.shape, m2.shape, s2.shape)
        diff = m1 - m2
        tr_covmean = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
        return float(diff.dot(diff) + s1.trace() + s2.trace() - 2 * tr_covmean)
    if method != "sqrtm":
        raise ValueError(f"frechet_distance: method must be 'sqrtm' or 'eigvals', got {method!r}")

    m1, m2 = np.atleast_1d(_np64(mu1)), np.atleast_1d(_np64(mu2))
    s1, s2 = np.atleast_2d(_np64(sigma1)), np.atleast_2d(_np64(sigma2))
    _check_shapes(m1.shape, s1.shape, m2.shape, s2.shape)
    diff = m1 - m2
    # as official: pytorch-fid fid_score.calculate_frechet_distance (eps retry, imaginary check).
    covmean = _sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"frechet_distance: singular product; adding {eps} to the diagonal of both covariances")
        offset = np.eye(s1.shape[0]) * eps
        covmean = _sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _check_shapes(m1, s1, m2, s2) -> None:
    if tuple(m1) != tuple(m2):
        raise ValueError(f"frechet_distance: mean vectors differ in shape: {tuple(m1)} vs {tuple(m2)}")
    if tuple(s1) != tuple(s2) or tuple(s1) != (m1[0], m1[0]):
        raise ValueError(f"frechet_distance: covariances {tuple(s1)} and {tuple(s2)} must both be "
                         f"[{m1[0]}, {m1[0]}] for means of shape {tuple(m1)}")


def load_reference_stats(source: FileSource) -> tuple[np.ndarray, np.ndarray]:
    """Read reference statistics from an `.npz` with keys `mu` [D] and `sigma` [D, D] (pytorch-fid's
    `--save-stats`, U-ViT's `fid_stats/*.npz`, ADM's reference batches) — a path, bytes or an open
    binary file. Returns float64 numpy (mu, sigma). Raises `ValueError` naming the file and its keys."""
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else getattr(source, "name", "<open file>")
    if isinstance(source, (bytes, bytearray)):
        source, name = io.BytesIO(source), "<bytes>"
    with np.load(source, allow_pickle=False) as f:
        if "mu" not in f.files or "sigma" not in f.files:
            raise ValueError(f"reference stats {name}: expected keys 'mu' and 'sigma', found {sorted(f.files)}")
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"reference stats {name}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    return mu, sigma


# ----------------------------------------------------------------------------------------------------
# Exact mergeable feature statistics
# ----------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class FeatureStats:
    """Sufficient statistics of a feature set: n, Σx (float64 [D]), Σxxᵀ (float64 [D, D]).

    Merging is elementwise addition, so partials computed per work unit and summed in any order give
    the single-pass mean and covariance (torchmetrics' FID state; ecosystem.md §5.3). Keep the tensors
    on the GPU during evaluation: `update` runs one float64 GEMM per batch there.
    """

    n: int
    sum: Tensor
    outer: Tensor

    @classmethod
    def empty(cls, dim: int = 2048, device: Union[str, torch.device, None] = None) -> "FeatureStats":
        """No samples yet: zeros of float64 [dim] and [dim, dim] on `device`."""
        return cls(0, torch.zeros(dim, dtype=torch.float64, device=device),
                   torch.zeros(dim, dim, dtype=torch.float64, device=device))

    @property
    def dim(self) -> int:
        return self.sum.shape[0]

    def update(self, features: ArrayLike) -> "FeatureStats":
        """Add features [B, D] (any float dtype, numpy or torch; moved to this object's device).
        In place; returns self."""
        x = _torch64(features).to(self.sum.device)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"FeatureStats.update: expected features [B, {self.dim}], got {tuple(x.shape)}")
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer.addmm_(x.T, x)  # (D, D) += (D, B) @ (B, D), no temporary
        return self

    def merge(self, other: "FeatureStats") -> "FeatureStats":
        """A new FeatureStats for the union of both sample sets (on this object's device)."""
        if other.dim != self.dim:
            raise ValueError(f"FeatureStats.merge: dimensions differ ({self.dim} vs {other.dim})")
        dev = self.sum.device
        return FeatureStats(self.n + other.n, self.sum + other.sum.to(dev), self.outer + other.outer.to(dev))

    __add__ = merge

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """(mu float64 [D], sigma float64 [D, D]) as numpy: the mean and the unbiased covariance, i.e.
        `np.mean(x, 0)` and `np.cov(x, rowvar=False)` of all features seen. Raises `ValueError` for
        n < 2 or non-finite sums."""
        if self.n < 2:
            raise ValueError(f"FeatureStats.mean_cov: need at least 2 samples, have {self.n}")
        mu = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(mu, mu)) / (self.n - 1)
        mu_np, sigma_np = mu.cpu().numpy(), sigma.cpu().numpy()
        if not (np.isfinite(mu_np).all() and np.isfinite(sigma_np).all()):
            raise ValueError(f"FeatureStats.mean_cov: non-finite statistics over {self.n} samples "
                             "(a NaN/inf feature was added; check the images fed to the network)")
        return mu_np, sigma_np

    def state_dict(self) -> dict[str, Tensor]:
        """{"n": int64 scalar, "sum": float64 [D], "outer": float64 [D, D]} (CPU tensors)."""
        return {"n": torch.tensor(self.n, dtype=torch.int64), "sum": self.sum.cpu(), "outer": self.outer.cpu()}

    @classmethod
    def from_state_dict(cls, sd: dict, device: Union[str, torch.device, None] = None) -> "FeatureStats":
        """Inverse of `state_dict`."""
        missing = {"n", "sum", "outer"} - set(sd)
        if missing:
            raise ValueError(f"FeatureStats.from_state_dict: missing keys {sorted(missing)}")
        s, o = _torch64(sd["sum"]).to(device), _torch64(sd["outer"]).to(device)
        if s.ndim != 1 or o.shape != (s.shape[0], s.shape[0]):
            raise ValueError(f"FeatureStats: sum {tuple(s.shape)} and outer {tuple(o.shape)} are not [D] and [D, D]")
        return cls(int(sd["n"]), s.clone(), o.clone())

    def to_npz(self, file: Union[str, os.PathLike, BinaryIO]) -> None:
        """Write keys `n`, `sum`, `outer` (uncompressed npz, ~32 MB at D=2048) to a path or open file."""
        sd = self.state_dict()
        np.savez(file, n=np.int64(self.n), sum=sd["sum"].numpy(), outer=sd["outer"].numpy())

    @classmethod
    def from_npz(cls, source: FileSource, device: Union[str, torch.device, None] = None) -> "FeatureStats":
        """Read what `to_npz` wrote, from a path, bytes or an open binary file."""
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        with np.load(source, allow_pickle=False) as f:
            return cls.from_state_dict({k: f[k] for k in f.files}, device=device)


# ----------------------------------------------------------------------------------------------------
# Inception Score
# ----------------------------------------------------------------------------------------------------

# torch-fidelity's defaults (torch_fidelity/defaults.py: isc_splits 10, samples_shuffle True, rng_seed
# 2020; metric_isc.py isc_features_to_metric): the samples are permuted by
# np.random.RandomState(2020).permutation(N), then cut into `splits` contiguous slices
# [k·N // splits, (k+1)·N // splits) of the permuted order.
IS_SPLITS = 10
IS_SHUFFLE_SEED = 2020


def is_protocol(splits: int = IS_SPLITS, shuffle_seed: Optional[int] = IS_SHUFFLE_SEED) -> dict:
    """A JSON-able description of an Inception Score protocol (recorded beside every IS we report):
    {"name": "torch-fidelity" | "contiguous", "splits", "shuffle_seed"}."""
    return {"name": "contiguous" if shuffle_seed is None else "torch-fidelity", "splits": int(splits),
            "shuffle_seed": None if shuffle_seed is None else int(shuffle_seed)}


@functools.lru_cache(maxsize=4)
def _shuffled_position(total: int, seed: int) -> Tensor:
    """int64 [total] (CPU): where sample i lands after torch-fidelity's shuffle (the inverse permutation).
    Cached: the sampling units of one evaluation all ask for the same table. Do not modify it."""
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(total).astype(np.int64))
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(total))


def is_split_index(index: Tensor, total: int, splits: int,
                   shuffle_seed: Optional[int] = IS_SHUFFLE_SEED) -> Tensor:
    """Split of each global sample index (int64 [B] → int64 [B], on the index's device) of an Inception
    Score over `total` samples: a pure function of (index, total, splits, shuffle_seed), so any sharding
    of the samples accumulates the same per-split partials.

    `shuffle_seed=2020` (default): torch-fidelity's protocol, sample i sits at position
    `RandomState(seed).permutation(total).argsort()[i]` and position j belongs to the slice
    [⌊k·total/splits⌋, ⌊(k+1)·total/splits⌋) that holds it. `shuffle_seed=None`: no shuffle, contiguous
    ranges of the index (ADM's `index // split_size` when `splits` divides `total`; a class-ordered plan
    then puts only C/splits classes in each split, which caps the score near C/splits)."""
    pos = index
    if shuffle_seed is not None:
        pos = _shuffled_position(total, shuffle_seed)[index.cpu()].to(index.device)
    # largest k with ⌊k·N/S⌋ <= j  ⇔  k·N < (j+1)·S  ⇔  k = ⌊((j+1)·S − 1) / N⌋
    return ((pos + 1) * splits - 1) // total


def _is_from_partials(n: Tensor, p_sum: Tensor, plogp_sum: Tensor) -> tuple[float, float]:
    # IS_k = exp(KL(p_i ‖ p̄_k) averaged over split k) = exp(H_k/n_k − Σ_c p̄_kc log p̄_kc)
    p_bar = p_sum / n[:, None]
    # p̄ log p̄ with 0·log 0 = 0 (a class no sample gives any mass underflows to exactly 0)
    ent = torch.where(p_bar > 0, p_bar * p_bar.clamp_min(1e-300).log(), torch.zeros_like(p_bar)).sum(1)
    scores = torch.exp(plogp_sum / n - ent).cpu().numpy()
    return float(np.mean(scores)), float(np.std(scores))


def inception_score(logits: ArrayLike, splits: int = IS_SPLITS,
                    shuffle_seed: Optional[int] = IS_SHUFFLE_SEED) -> tuple[float, float]:
    """Inception Score of logits [N, C] (row i = global sample i): (mean, std over splits), float64
    softmax, std as `np.std` (population).

    Default: torch-fidelity's protocol (`isc_features_to_metric` with its defaults): rows permuted by
    `np.random.RandomState(2020).permutation(N)`, then `splits` contiguous slices of the permuted rows.
    `shuffle_seed=None`: contiguous slices of the rows in index order (ADM's evaluator when `splits`
    divides N). Feed the *unbiased* logits (`FIDInception(logits_bias=False)`, the default;
    torch-fidelity's `logits_unbiased`). Raises `ValueError` for N < splits."""
    x = _torch64(logits)
    n_total = x.shape[0]
    if x.ndim != 2 or n_total < splits:
        raise ValueError(f"inception_score: expected logits [N, C] with N >= splits={splits}, got {tuple(x.shape)}")
    if shuffle_seed is not None:
        x = x[torch.from_numpy(np.random.RandomState(shuffle_seed).permutation(n_total)).to(x.device)]
    p, log_p = x.softmax(1), x.log_softmax(1)
    scores = []
    for k in range(splits):
        lo, hi = k * n_total // splits, (k + 1) * n_total // splits
        pk, log_pk = p[lo:hi], log_p[lo:hi]
        q = pk.mean(0, keepdim=True)
        scores.append(float((pk * (log_pk - q.log())).sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass(eq=False)
class ISStats:
    """Mergeable Inception-Score partials: per split k, n_k, P_k = Σ softmax(logits) (float64 [C]) and
    H_k = Σ Σ_c p log p (float64). The split of a sample is `is_split_index(index, total, splits,
    shuffle_seed)` of its *global* index, so partials from any sharding, merged in any order, give
    `inception_score(all_logits, splits, shuffle_seed)` (torch-fidelity's protocol by default)."""

    total: int
    n: Tensor  # int64 [splits]
    p_sum: Tensor  # float64 [splits, C]
    plogp_sum: Tensor  # float64 [splits]
    shuffle_seed: Optional[int] = IS_SHUFFLE_SEED  # None: contiguous index ranges

    @classmethod
    def empty(cls, total: int, splits: int = IS_SPLITS, num_classes: int = NUM_CLASSES,
              device: Union[str, torch.device, None] = None,
              shuffle_seed: Optional[int] = IS_SHUFFLE_SEED) -> "ISStats":
        """No samples yet, for an evaluation of `total` samples in `splits` splits."""
        if total < splits:
            raise ValueError(f"ISStats: total={total} samples cannot fill splits={splits}")
        return cls(total, torch.zeros(splits, dtype=torch.int64, device=device),
                   torch.zeros(splits, num_classes, dtype=torch.float64, device=device),
                   torch.zeros(splits, dtype=torch.float64, device=device), shuffle_seed)

    @property
    def splits(self) -> int:
        return self.n.shape[0]

    @property
    def protocol(self) -> dict:
        """`is_protocol(splits, shuffle_seed)` of these partials."""
        return is_protocol(self.splits, self.shuffle_seed)

    def update(self, logits: ArrayLike, index: Union[int, Tensor]) -> "ISStats":
        """Add logits [B, C] of the samples with global indices `index` (int64 [B], or an int: the first
        of B consecutive indices). In place; returns self. Raises `ValueError` for an index outside
        [0, total)."""
        x = _torch64(logits).to(self.p_sum.device)
        if x.ndim != 2 or x.shape[1] != self.p_sum.shape[1]:
            raise ValueError(f"ISStats.update: expected logits [B, {self.p_sum.shape[1]}], got {tuple(x.shape)}")
        if isinstance(index, int):
            idx = torch.arange(index, index + x.shape[0], device=x.device)
        else:
            idx = torch.as_tensor(index, dtype=torch.int64).to(x.device).reshape(-1)
        if idx.shape[0] != x.shape[0]:
            raise ValueError(f"ISStats.update: {x.shape[0]} logits but {idx.shape[0]} indices")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.total):
            raise ValueError(f"ISStats.update: indices [{int(idx.min())}, {int(idx.max())}] outside [0, {self.total})")
        k = is_split_index(idx, self.total, self.splits, self.shuffle_seed)
        p, log_p = x.softmax(1), x.log_softmax(1)
        self.n += torch.bincount(k, minlength=self.splits)
        self.p_sum.index_add_(0, k, p)
        self.plogp_sum.index_add_(0, k, (p * log_p).sum(1))
        return self

    def _key(self) -> tuple:
        return self.total, self.splits, self.p_sum.shape[1], self.shuffle_seed

    def merge(self, other: "ISStats") -> "ISStats":
        """A new ISStats with both sets of samples. Raises `ValueError` if total / splits / classes /
        shuffle seed differ."""
        if other._key() != self._key():
            raise ValueError(f"ISStats.merge: (total, splits, classes, shuffle_seed) differ: {self._key()} vs "
                             f"{other._key()}")
        dev = self.n.device
        return ISStats(self.total, self.n + other.n.to(dev), self.p_sum + other.p_sum.to(dev),
                       self.plogp_sum + other.plogp_sum.to(dev), self.shuffle_seed)

    __add__ = merge

    def score(self) -> tuple[float, float]:
        """(mean, std) of the per-split scores. Raises `ValueError` if a split is still empty."""
        if bool((self.n == 0).any()):
            raise ValueError(f"ISStats.score: empty splits {torch.nonzero(self.n == 0).flatten().tolist()} "
                             f"({int(self.n.sum())} of {self.total} samples added)")
        return _is_from_partials(self.n.to(torch.float64), self.p_sum, self.plogp_sum)

    def state_dict(self) -> dict[str, Tensor]:
        """{"total": int64 scalar, "n": int64 [S], "p_sum": float64 [S, C], "plogp_sum": float64 [S],
        "shuffle_seed": int64 scalar (-1: contiguous)} (CPU)."""
        seed = -1 if self.shuffle_seed is None else self.shuffle_seed
        return {"total": torch.tensor(self.total, dtype=torch.int64), "n": self.n.cpu(),
                "p_sum": self.p_sum.cpu(), "plogp_sum": self.plogp_sum.cpu(),
                "shuffle_seed": torch.tensor(seed, dtype=torch.int64)}

    @classmethod
    def from_state_dict(cls, sd: dict, device: Union[str, torch.device, None] = None) -> "ISStats":
        """Inverse of `state_dict`. A state without "shuffle_seed" (written before the key existed) was
        accumulated over contiguous splits and reads as `shuffle_seed=None`."""
        missing = {"total", "n", "p_sum", "plogp_sum"} - set(sd)
        if missing:
            raise ValueError(f"ISStats.from_state_dict: missing keys {sorted(missing)}")
        seed = int(sd["shuffle_seed"]) if "shuffle_seed" in sd else -1
        return cls(int(sd["total"]), torch.as_tensor(sd["n"], dtype=torch.int64).to(device).clone(),
                   _torch64(sd["p_sum"]).to(device).clone(), _torch64(sd["plogp_sum"]).to(device).clone(),
                   None if seed < 0 else seed)
