"""VQGAN image tokenizer: MAGE's f16 VQGAN as ENAT uses it (see enat-facts.md §8).

A pure-PyTorch re-implementation of the official ``taming`` VQModel (encoder, VectorQuantizer2,
decoder) with the same state-dict keys, so the released ``vqgan_jax_strongaug.ckpt`` loads strictly
through :meth:`VQGAN.from_official`. Images are float ``[0, 1]`` (``arr / 255``, no normalisation);
codes are int64 indices into a ``codebook_size`` codebook on a grid ``downsample`` (16) times smaller.

``encode`` mirrors the official computation op for op, so codes are bit-identical to the official
model on the same device and batch. ``decode`` uses faster, mathematically equivalent formulations
(max abs difference to the official decoder below 1e-4 on [0, 1] images; ~4e-5 measured).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .checkpoint import Source, load_strict, read_state_dict

__all__ = ["VQGANConfig", "VQGAN_PRESETS", "VQGAN", "center_crop_arr", "to_tensor", "preprocess"]


# ---------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class VQGANConfig:
    """Architecture of the taming-style VQGAN (the fields of the official ``ddconfig`` that matter).

    ``embed_dim`` must equal ``z_channels``: this model has no quant_conv / post_quant_conv, the
    quantizer works directly on the encoder output.
    """

    resolution: int = 256  # training resolution; the model is fully convolutional (512 px works too)
    ch: int = 128  # base width; every width ch * m must divide into GroupNorm's 32 groups
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # one level per entry; downsample = 2 ** (levels - 1)
    num_res_blocks: int = 2  # ResnetBlocks per level
    # in the official yaml but unused: no attention blocks here or there; kept for round trips
    attn_resolutions: tuple[int, ...] = (16,)
    z_channels: int = 256  # encoder output / decoder input channels
    codebook_size: int = 1024  # n_embed
    embed_dim: int = 256  # codebook vector size (== z_channels)

    def __post_init__(self) -> None:
        # Accept lists (e.g. from YAML/JSON) but store tuples so the config stays hashable.
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        for name in ("resolution", "ch", "num_res_blocks", "z_channels", "codebook_size", "embed_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"VQGANConfig.{name}: expected a positive int, got {value!r}")
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value):
                raise ValueError(f"VQGANConfig.{name}: expected a tuple of positive ints, got {value!r}")
        if not self.ch_mult:
            raise ValueError("VQGANConfig.ch_mult: needs at least one level, got ()")
        if self.ch % 32:
            raise ValueError(f"VQGANConfig.ch: GroupNorm uses 32 groups, so ch must be a multiple of 32, "
                             f"got {self.ch}")
        if self.z_channels != self.embed_dim:
            raise ValueError(f"VQGANConfig.embed_dim: must equal z_channels ({self.z_channels}) because there "
                             f"is no quant_conv, got {self.embed_dim}")
        if self.resolution % self.downsample:
            raise ValueError(f"VQGANConfig.resolution: must be a multiple of the downsampling factor "
                             f"{self.downsample}, got {self.resolution}")

    @property
    def downsample(self) -> int:
        """Spatial reduction factor image → code grid (16 for ch_mult of length 5)."""
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def preset(cls, name: str) -> "VQGANConfig":
        """Return the named preset from :data:`VQGAN_PRESETS`; ``KeyError`` lists the known names."""
        try:
            return VQGAN_PRESETS[name]
        except KeyError:
            raise KeyError(f"unknown VQGAN preset {name!r}; known: {sorted(VQGAN_PRESETS)}") from None

    def to_dict(self) -> dict:
        """JSON-friendly dict (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


VQGAN_PRESETS: dict[str, VQGANConfig] = {
    # enat-facts.md §8: vq-f16-jax.yaml == MAGE config/vqgan.yaml (vqgan_jax_strongaug.ckpt).
    "mage-f16": VQGANConfig(resolution=256, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                            attn_resolutions=(16,), z_channels=256, codebook_size=1024, embed_dim=256),
}


# ---------------------------------------------------------------------------------------------------
# Building blocks (module names follow taming/modules/diffusionmodules/model.py for strict loading)


def _swish_exact(x: torch.Tensor) -> torch.Tensor:
    # as official: model.py nonlinearity, x * sigmoid(x); F.silu rounds differently, and the encoder
    # must stay bit-identical so argmin picks the same codes. In place: same bits (products commute).
    return x * torch.sigmoid(x) if x.requires_grad else torch.sigmoid(x).mul_(x)


class _ReusedSwish:
    """``_swish_exact`` with the sigmoid in one reused buffer per shape (same bits; x, a fresh GroupNorm output,
    becomes x·sigmoid(x) in place): a fresh tensor page-faults in on CPU. Cleared after each encoder forward."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}  # (shape, dtype, device) -> buffer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad or not x.is_contiguous():
            return _swish_exact(x)
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.buffers:
            self.buffers[key] = torch.empty_like(x)
        return x.mul_(torch.sigmoid(x, out=self.buffers[key]))  # (B, C, H, W), x's storage


def _swish_fast(x: torch.Tensor) -> torch.Tensor:
    # differs from official: F.silu equals x * sigmoid(x) up to float rounding and is ~2x faster.
    return F.silu(x, inplace=not x.requires_grad)  # x is always a fresh GroupNorm output here


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Norm-swish-conv twice with a residual; convs are bias-free (MaskGIT-JAX port)."""

    def __init__(self, in_channels: int, out_channels: int, act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.act = act  # a plain function, not a module: no state-dict keys
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        if in_channels != out_channels:
            # as official: model.py ResnetBlock, out->out 1x1 conv applied to the block OUTPUT h
            # (MaskGIT-JAX quirk), not the usual in->out projection of the input x.
            self.nin_shortcut = nn.Conv2d(out_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))  # (B, C_out, H, W)
        h = self.conv2(self.act(self.norm2(h)))  # dropout is 0 in every released config: omitted
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(h)
        return x + h if h.requires_grad else h.add_(x)  # h + x in place: same bits, no new tensor


class _Level(nn.Module):
    """One resolution level: ``block`` (ModuleList of ResnetBlocks) and, in the decoder, ``upsample``."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)


class _Mid(nn.Module):
    def __init__(self, channels: int, act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, act)
        self.block_2 = ResnetBlock(channels, channels, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.block_1(x))


class Upsample(nn.Module):
    """Nearest 2x upsampling followed by a 3x3 conv, computed as one stride-2 transposed conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self._folded: Optional[tuple[tuple, torch.Tensor]] = None  # (weight identity, kernel); not state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # differs from official: model.py Upsample does interpolate(x2, nearest) then conv3x3 on the
        # upsampled map. The same linear map is a 4x4 stride-2 transposed conv on the low-res map
        # whose taps are sums of the 3x3 taps: 16 instead of 36 MACs per 2x2 output block and no
        # upsampled intermediate. Equal up to float rounding (~1e-6 relative).
        return F.conv_transpose2d(x, self._kernel(), self.conv.bias, stride=2, padding=1)  # (B, C, 2H, 2W)

    def _kernel(self) -> torch.Tensor:
        w = self.conv.weight
        if w.requires_grad:  # training through the decoder: no cache, keep the graph
            return _upsample_conv_kernel(w)
        # cached (folding cost ~0.3 s per decode); the key changes when the weight is replaced/edited
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if self._folded is None or self._folded[0] != key:
            with torch.no_grad():
                self._folded = (key, _upsample_conv_kernel(w))
        return self._folded[1]


def _upsample_conv_kernel(weight: torch.Tensor) -> torch.Tensor:
    """3x3 conv weight (C_out, C_in, 3, 3) → equivalent transposed-conv weight (C_in, C_out, 4, 4).

    Along each axis, output row 2i reads upsampled rows 2i-1, 2i, 2i+1 = input rows i-1, i, i (taps
    w0 | w1+w2) and output row 2i+1 reads input rows i, i, i+1 (taps w0+w1 | w2). A stride-2,
    padding-1, 4-tap transposed conv puts its taps 3, 1 on input rows (i-1, i) of output 2i and its
    taps 2, 0 on rows (i, i+1) of output 2i+1, hence the tap order (w2, w1+w2, w0+w1, w0).
    """
    def fold(w: torch.Tensor, dim: int) -> torch.Tensor:
        w0, w1, w2 = w.unbind(dim)
        return torch.stack([w2, w1 + w2, w0 + w1, w0], dim=dim)

    # Elementwise adds (not a matmul), so a surrounding autocast does not round the kernel early.
    k = fold(fold(weight, 2), 3)  # (C_out, C_in, 4, 4)
    return k.transpose(0, 1).contiguous(memory_format=torch.channels_last)  # (C_in, C_out, 4, 4)


class Encoder(nn.Module):
    """Image (B, 3, H, W) → latents (B, z_channels, H/f, W/f); average-pool downsampling, no attention."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch = cfg.ch
        act = self._swish = _ReusedSwish()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1, bias=False)
        self.down = nn.ModuleList()
        block_in = ch
        for mult in cfg.ch_mult:
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * mult, act))
                block_in = ch * mult
            # as official: Downsample(with_conv=False) is a parameter-free 2x2 average pool
            self.down.append(_Level(blocks))
        self.mid = _Mid(block_in, act)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 1)  # 1x1, with bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            h = self.conv_in(x)  # (B, ch, H, W)
            for i, level in enumerate(self.down):
                for block in level.block:
                    h = block(h)
                if i != len(self.down) - 1:
                    h = F.avg_pool2d(h, kernel_size=2, stride=2)  # (B, C, H/2, W/2)
            return self.conv_out(self._swish(self.norm_out(self.mid(h))))  # (B, z, H/f, W/f)
        finally:
            self._swish.buffers.clear()


class Decoder(nn.Module):
    """Latents (B, z_channels, h, w) → image (B, 3, f·h, f·w), unclamped."""

    def __init__(self, cfg: VQGANConfig):
        super().__init__()
        ch, act = cfg.ch, _swish_fast
        block_in = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _Mid(block_in, act)
        levels: list[_Level] = []
        for i in reversed(range(len(cfg.ch_mult))):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(block_in, ch * cfg.ch_mult[i], act))
                block_in = ch * cfg.ch_mult[i]
            level = _Level(blocks)
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)  # as official: up[0] is the full-resolution level
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # differs from official: channels_last (oneDNN convs ~1.4x faster on CPU; cuDNN likes NHWC). Not
        # bit-identical: max abs diff to the official fp32 decoder ~4e-5 (official fp32 vs fp64: ~8e-6).
        h = self.conv_in(z.contiguous(memory_format=torch.channels_last))  # (B, C, h, w)
        h = self.mid(h)
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if i != 0:
                h = level.upsample(h)  # (B, C, 2H, 2W)
        h = self.conv_out(_swish_fast(self.norm_out(h)))  # (B, 3, H, W)
        return h.contiguous()


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook (taming VectorQuantizer2, inference part only)."""

    def __init__(self, codebook_size: int, embed_dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, embed_dim)
        # as official: quantize.py init, irrelevant once a checkpoint is loaded
        nn.init.uniform_(self.embedding.weight, -1.0 / codebook_size, 1.0 / codebook_size)

    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, D, h, w) → codes (B, h, w) int64, argmin of the L2 distance (first on ties)."""
        b, _, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).contiguous().view(-1, z.shape[1])  # (B·h·w, D), rows in b h w order
        e = self.embedding.weight  # (K, D)
        # as official: quantize.py VectorQuantizer2.forward: the same expression and evaluation order
        # (|z|² + |e|² − 2 z·eᵀ via einsum on eᵀ) so the float distances, and hence argmin, are identical.
        d = (torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1)
             - 2 * torch.einsum("bd,dn->bn", zf, e.t()))  # (B·h·w, K)
        return torch.argmin(d, dim=1).view(b, h, w)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) int → latents (B, D, h, w) (official get_codebook_entry)."""
        # A permuted view, i.e. channels_last strides: what the decoder wants (official: .contiguous()).
        return self.embedding(codes).permute(0, 3, 1, 2)  # (B, D, h, w)


# ---------------------------------------------------------------------------------------------------
# The tokenizer


class VQGAN(nn.Module):
    """Frozen VQGAN tokenizer: ``encode`` images → codes, ``decode`` codes → images.

    State-dict keys match the official taming ``VQModel`` (``encoder.*``, ``decoder.*``,
    ``quantize.embedding.weight``; 168 keys for ``mage-f16``). Built in eval mode with
    ``requires_grad=False``.
    """

    def __init__(self, config: Union[VQGANConfig, str] = "mage-f16"):
        super().__init__()
        if isinstance(config, str):
            config = VQGANConfig.preset(config)
        self.config = config
        self.codebook_size, self.downsample = config.codebook_size, config.downsample
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.embed_dim)
        # differs from official: decoder conv weights stored channels_last to match its activations
        # (else every conv call re-lays-out its weight); same values, same state-dict keys/shapes.
        self.decoder.to(memory_format=torch.channels_last)
        self.eval()
        self.requires_grad_(False)

    @classmethod
    def from_official(cls, source: Source, config: Union[VQGANConfig, str] = "mage-f16") -> "VQGAN":
        """Build from an official taming/MAGE checkpoint (path, open file, bytes or state dict).

        Wrapper keys (``state_dict``, ``model``) and a ``module.`` prefix are unwrapped. Raises
        ``ValueError`` naming every missing/unexpected key and shape mismatch.
        """
        model = cls(config)
        load_strict(model, read_state_dict(source), what="VQGAN checkpoint")
        return model

    @torch.no_grad()  # not inference_mode: its tensors refuse later in-place edits by callers
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images float (B, 3, H, W) in [0, 1] → codes int64 (B, H/f, W/f), f = ``downsample`` (16).

        H and W must be multiples of ``downsample``. Codes equal the official
        ``VQModel.encode(images)[2][2]`` (reshaped) bit for bit on the same device and batch.
        """
        _check_images(images, self.downsample)
        param = self.quantize.embedding.weight
        # contiguous NCHW as the official DataLoader feeds it: channels_last picks other conv kernels/bits
        x = images.to(device=param.device, dtype=param.dtype, memory_format=torch.contiguous_format)
        z = self.encoder(x)  # (B, D, h, w)
        return self.quantize.codes(z)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Codes int (B, h, w) in [0, codebook_size) → images float32 (B, 3, 16h, 16w) clamped to [0, 1].

        ``dtype`` (e.g. ``torch.bfloat16``) runs the decoder under autocast on the model's device; a
        surrounding ``torch.autocast`` is honoured too. Raises ``ValueError`` on a bad shape/dtype or
        out-of-range codes.
        """
        if codes.dim() != 3 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"VQGAN.decode: expected integer codes of shape (B, h, w), "
                             f"got {codes.dtype} {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"VQGAN.decode: codes must lie in [0, {self.codebook_size}), "
                             f"got range [{int(codes.min())}, {int(codes.max())}]")
        param = self.quantize.embedding.weight
        z = self.quantize.lookup(codes.to(device=param.device, dtype=torch.long))  # (B, D, h, w)
        if dtype is not None and dtype != torch.float32:
            with torch.autocast(device_type=param.device.type, dtype=dtype):
                x = self.decoder(z)
        else:
            x = self.decoder(z)
        return x.float().clamp_(0.0, 1.0)  # as official: train.py clamps samples to [0, 1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Same as :meth:`encode`."""
        return self.encode(images)


def _check_images(images: torch.Tensor, factor: int) -> None:
    if images.dim() != 4 or images.shape[1] != 3 or not images.dtype.is_floating_point:
        raise ValueError(f"VQGAN.encode: expected float images of shape (B, 3, H, W) in [0, 1], "
                         f"got {images.dtype} {tuple(images.shape)}")
    if images.shape[2] % factor or images.shape[3] % factor:
        raise ValueError(f"VQGAN.encode: image size {tuple(images.shape[2:])} is not a multiple of the "
                         f"downsampling factor {factor}; center-crop/resize first (see preprocess)")


# ---------------------------------------------------------------------------------------------------
# Preprocessing (extract_imagenet_feature.py → dataset.py ImageDataset / center_crop_arr)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> np.ndarray:
    """ADM center crop: PIL image (any mode) → uint8 array (image_size, image_size, 3).

    BOX-halve while the short side is ≥ 2·image_size, BICUBIC-resize so the short side equals
    image_size (long side rounded), then crop the center (offset rounded down).
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"center_crop_arr: image_size must be a positive int, got {image_size!r}")
    # as official: dataset.py ImageDataset converts to RGB before center_crop_arr
    if pil_image.mode != "RGB":
        pil_image = pil_image.convert("RGB")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.asarray(pil_image)  # (H, W, 3) uint8
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def to_tensor(arrs: Union[np.ndarray, Sequence[np.ndarray]]) -> torch.Tensor:
    """uint8 array(s) (H, W, 3) or (B, H, W, 3) → float32 (B, 3, H, W) in [0, 1] (``arr / 255``)."""
    batch = np.stack(list(arrs)) if not isinstance(arrs, np.ndarray) else arrs
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != np.uint8:
        raise ValueError(f"to_tensor: expected uint8 arrays (H, W, 3), got {batch.dtype} {batch.shape}")
    # as official: dataset.py, arr.astype(float32) / 255. with no mean/std normalisation
    x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2)  # (B, 3, H, W) uint8 view
    return x.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


def preprocess(pil_images: Sequence[Image.Image], resolution: int) -> torch.Tensor:
    """PIL images → center-cropped float32 batch (B, 3, resolution, resolution) in [0, 1]."""
    return to_tensor([center_crop_arr(im, resolution) for im in pil_images])
