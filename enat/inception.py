"""The FID Inception network in pure torch: Inception-v3 features (pool3) and logits for FID and IS.

The network is pytorch-fid's `InceptionV3([3], resize_input=True, normalize_input=True)` with
`use_fid_inception=True` (the TF-graph port used by ENAT's `libs/inception.py`, enat-facts §9), written
here without torchvision. Its state-dict layout is the one of pytorch-fid's weights file
`pt_inception-2015-12-05-6726825d.pth` (torchvision's `Inception3` names, no `AuxLogits`, a 1008-way `fc`),
so that file loads key for key. The statistics computed from its outputs are in `enat.fid`.
"""
from __future__ import annotations

import os
from typing import Literal, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checkpoint import Source, load_strict, read_state_dict

_Size = Union[int, tuple[int, int]]


FID_INPUT_SIZE = 299  # pytorch-fid's resize_input target
NUM_CLASSES = 1008  # the TF graph's softmax: 1000 ImageNet classes + 8 unused


# ----------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    """Conv (no bias) → BatchNorm (eps 0.001, as the TF graph) → ReLU. Keys: `conv.*`, `bn.*`.

    `fused` (default): one convolution with the BatchNorm folded into its weight and bias (eval
    statistics), the weight channels-last — the same function up to fp32 rounding (~1e-7 relative),
    ~1.3x faster on oneDNN. `fused=False` runs the modules as written (the reference path)."""

    def __init__(self, cin: int, cout: int, kernel_size: _Size, stride: _Size = 1, padding: _Size = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)
        self.fused = True
        self._folded: Optional[tuple] = None  # (key, weight, bias); not state: rebuilt from the parameters

    def folded(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(weight [cout, cin, kh, kw] channels-last, bias [cout]) of conv∘BN in `dtype`, folded in the
        parameters' precision and cached until a parameter or buffer is replaced, moved or edited in place."""
        bn = self.bn
        srcs = (self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = (dtype, *((t.data_ptr(), t._version) for t in srcs))
        if self._folded is None or self._folded[0] != key:
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (cout,)
            w = (self.conv.weight * scale[:, None, None, None]).to(dtype)
            self._folded = (key, w.contiguous(memory_format=torch.channels_last),
                            (bn.bias - bn.running_mean * scale).to(dtype))
        return self._folded[1], self._folded[2]

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return F.relu(self.bn(self.conv(x)), inplace=True)
        dev = x.device.type
        # Under autocast the weights are cast once here (and cached), not on every call by autocast.
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else self.conv.weight.dtype
        w, b = self.folded(dtype)
        return F.relu_(F.conv2d(x, w, b, self.conv.stride, self.conv.padding))


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
    - `fused` (default True): BatchNorm folded into the convolutions and channels-last activations
      (differs from pytorch-fid only by fp32 rounding: features within ~1e-6 relative, tied to the plain
      path by tests/test_equiv_sample_job.py); `False`: the modules as pytorch-fid runs them.

    The module is frozen: parameters do not require grad and `train()` keeps it in eval mode (batch
    statistics would change the features).
    """

    def __init__(self, *, uint8_protocol: bool = False, logits_bias: bool = False,
                 autocast_dtype: Optional[torch.dtype] = None, fused: bool = True) -> None:
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
        self.fused = fused
        self.requires_grad_(False)
        self.eval()

    @property
    def fused(self) -> bool:
        """Folded conv+BN, channels-last (see the class docstring); settable."""
        return self._fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self._fused = bool(value)
        for m in self.modules():
            if isinstance(m, BasicConv2d):
                m.fused = self._fused

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
        if self.fused:  # oneDNN's convolutions and pools run faster on NHWC activations
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = self.autocast_dtype
        # enabled=False also switches off a caller's autocast region: fp32 unless asked otherwise.
        with torch.autocast(device_type=x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            pool3 = self.features(x)
        pool3 = pool3.float()
        return pool3, self.logits(pool3)
