"""FID / IS in pure torch: the FID Inception network, Fréchet distance, exact mergeable statistics.

The network is pytorch-fid's `InceptionV3([3], resize_input=True, normalize_input=True)` with
`use_fid_inception=True` (the TF-graph port used by ENAT's `libs/inception.py`, enat-facts §9), written
here without torchvision. Its state-dict layout is the one of pytorch-fid's weights file
`pt_inception-2015-12-05-6726825d.pth` (torchvision's `Inception3` names, no `AuxLogits`, a 1008-way `fc`),
so that file loads key for key.

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
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import Source, load_strict, read_state_dict

ArrayLike = Union[np.ndarray, Tensor]
FileSource = Union[str, os.PathLike, BinaryIO, bytes]
_Size = Union[int, tuple[int, int]]

FID_INPUT_SIZE = 299  # pytorch-fid's resize_input target
NUM_CLASSES = 1008  # the TF graph's softmax: 1000 ImageNet classes + 8 unused


# ----------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 0.001, as the TF graph) → ReLU. Keys: `conv.*`, `bn.*`."""

    def __init__(self, cin: int, cout: int, kernel_size: _Size, stride: _Size = 1, padding: _Size = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool_tf(x: Tensor) -> Tensor:
    # as official: pytorch-fid FIDInceptionA/C/E_1 — TF's average pool ignores the zero padding,
    # torchvision's blocks count it.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35×35 block (Mixed_5b/c/d): 1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avgpool→1x1; out 224+pool_features ch."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35→17 reduction (Mixed_6a): 3x3/2 | 1x1→3x3→3x3/2 | maxpool/2; out 480+cin ch."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], 1)


class InceptionC(nn.Module):
    """17×17 block (Mixed_6b..e) with factorized 7x7 convolutions; out 768 ch."""

    def __init__(self, cin: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        bp = self.branch_pool(_avg_pool_tf(x))
        return torch.cat([b1, b7, bd, bp], 1)


class InceptionD(nn.Module):
    """17→8 reduction (Mixed_7a): 1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | maxpool/2; out 512+cin ch."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8×8 block (Mixed_7b/c) with split 1x3 / 3x1 heads; out 2048 ch.

    `pool="avg"` for Mixed_7b, `pool="max"` for Mixed_7c.
    """

    def __init__(self, cin: int, pool: Literal["avg", "max"]) -> None:
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
        if self.pool == "max":
            # as official: pytorch-fid FIDInceptionE_2 — the TF graph's last block max-pools here
            # (the paper and torchvision average-pool).
            bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            bp = _avg_pool_tf(x)
        return torch.cat([b1, b3, bd, self.branch_pool(bp)], 1)


def quantize_uint8(images: Tensor) -> Tensor:
    """Round float images in [0, 1] to the uint8 grid and back: what writing a PNG and reading it with
    pytorch-fid (ToTensor) does. Rounds half up and clamps like torchvision's `save_image` (used by
    U-ViT's `sample2dir`). Same shape and dtype as the input, values in {0, 1/255, ..., 1}."""
    return torch.floor(images * 255 + 0.5).clamp_(0, 255).div_(255).to(images.dtype)


class FIDInception(nn.Module):
    """pytorch-fid's FID Inception-v3 returning `(pool3, logits)`.

    `forward(images)`: images float [B, 3, H, W] in [0, 1] (or uint8 in [0, 255]); bilinear resize to
    299×299 (align_corners=False), scaled to [-1, 1] → pool3 float32 [B, 2048] (pytorch-fid's block 3,
    what FID uses) and logits float32 [B, 1008].

    Options:
    - `uint8_protocol`: quantize float inputs to the uint8 grid first (the ADM / PNG-on-disk protocol).
      ENAT's official eval does not (enat-facts §9), hence off by default.
    - `logits_bias`: `False` (default) returns `pool3 @ fc.weight.T`, the "unbiased" logits that the
      standard Inception Score uses (improved-GAN's and ADM's TF code take the MatMul of
      `softmax/logits` without the bias add; torch-fidelity's `logits_unbiased`). `True` returns
      `fc(pool3)`, the TF graph's full head (pytorch-fid's `Inception3.fc`).
    - `autocast_dtype`: run the convolutions under `torch.autocast` in bf16/fp16; `None` (default) runs
      fp32 even inside a caller's autocast region. Outputs are float32 either way.

    The module is frozen: parameters do not require grad and `train()` keeps it in eval mode (batch
    statistics would change the features).
    """

    def __init__(self, *, uint8_protocol: bool = False, logits_bias: bool = False,
                 autocast_dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.uint8_protocol = uint8_protocol
        self.logits_bias = logits_bias
        self.autocast_dtype = autocast_dtype
        # Attribute names are the weights file's keys (torchvision Inception3 names).
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, NUM_CLASSES)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_pytorch_fid(cls, source: Source, **kwargs) -> "FIDInception":
        """Build from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (a state dict, a local path,
        bytes or an open binary file), loaded strictly. Raises `ValueError` naming every missing /
        unexpected key and shape mismatch. `kwargs` go to the constructor."""
        net = cls(**kwargs)
        sd = read_state_dict(source)
        # BatchNorm's num_batches_tracked is unused in eval; a file written before torch 0.4.1 has
        # none and torch itself fills them in on load, so do the same here.
        own = net.state_dict()
        sd = dict(sd)
        for k, v in own.items():
            if k.endswith("num_batches_tracked") and k not in sd:
                sd[k] = v
        name = source if isinstance(source, (str, os.PathLike)) else getattr(source, "name", None)
        what = f"FID Inception weights {os.fspath(name)!r}" if name else "FID Inception weights"
        load_strict(net, sd, what=f"{what} (expected pytorch-fid's pt_inception-2015-12-05-6726825d.pth layout)")
        return net

    def train(self, mode: bool = True) -> "FIDInception":
        # Frozen feature extractor: BatchNorm must keep its running statistics.
        return super().train(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] float in [0, 1] or uint8 → float32 [B, 3, 299, 299] in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"FIDInception: expected images [B, 3, H, W], got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float() / 255
        else:
            x = images.float()
            if self.uint8_protocol:
                x = quantize_uint8(x)
        # as official: pytorch-fid InceptionV3.forward — resize first, then 2x-1.
        x = F.interpolate(x, size=(FID_INPUT_SIZE, FID_INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def features(self, x: Tensor) -> Tensor:
        """Preprocessed [B, 3, 299, 299] → pool3 [B, 2048] (dtype of the computation)."""
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)  # (B, 2048)

    def logits(self, pool3: Tensor) -> Tensor:
        """pool3 [B, 2048] → logits float32 [B, 1008], with or without the fc bias (`logits_bias`).
        Dropout before fc is the identity in eval, as in pytorch-fid's Inception3."""
        pool3 = pool3.float()
        return F.linear(pool3, self.fc.weight.float(), self.fc.bias.float() if self.logits_bias else None)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """images [B, 3, H, W] float in [0, 1] or uint8 → (pool3 float32 [B, 2048], logits float32 [B, 1008])."""
        x = self.preprocess(images)
        dtype = self.autocast_dtype
        # enabled=False also switches off a caller's autocast region: fp32 unless asked otherwise.
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            pool3 = self.features(x)
        pool3 = pool3.float()
        return pool3, self.logits(pool3)


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
