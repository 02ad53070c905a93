"""Fast paths of the tokenizers tied to their plain formulations (issue 14).

* VQGAN encode: the encoder reuses one sigmoid buffer per activation shape (``_ReusedSwish``); its
  latents must be bit-identical to the plain official computation (``x * sigmoid(x)``, ``x + h``),
  and the codes identical to the argmin of the official distance formula, ties included.
* VQGAN decode: folded upsample + channels-last + ``F.silu`` against the plain official decoder
  (nearest upsample then 3x3 conv, NCHW, ``x * sigmoid(x)``): max abs difference below 1e-4 on the
  clamped [0, 1] image (float rounding only; official fp32 vs fp64 is ~1e-5).
* PatchVQ: chunked nearest-code search with a reused distance buffer gives the same codes and
  distances as one GEMM over all rows.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from enat import patch_vq
from enat.patch_vq import PatchVQ
from enat.vqgan import VQGAN, VQGANConfig, _ReusedSwish

SMALL = VQGANConfig(resolution=64, ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(),
                    z_channels=64, codebook_size=128, embed_dim=64)


def _model(seed: int) -> VQGAN:
    torch.manual_seed(seed)
    m = VQGAN(SMALL)
    with torch.no_grad():  # non-trivial GroupNorm affines and codebook, like trained weights
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        m.quantize.embedding.weight.normal_()
    return m


def _images(seed: int, n: int = 3, res: int = 64) -> torch.Tensor:
    """Smooth images with noise, quantised to /255 like decoded JPEGs."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, res // 8, res // 8, generator=g)
    x = F.interpolate(low, size=(res, res), mode="bilinear", align_corners=False)
    x = (x + 0.05 * torch.randn(n, 3, res, res, generator=g)).clamp(0, 1)
    return (x * 255).round() / 255


# --- the plain official computation (taming model.py / quantize.py), written out op by op


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def _block(blk, x: torch.Tensor) -> torch.Tensor:
    h = blk.conv1(_swish(blk.norm1(x)))
    h = blk.conv2(_swish(blk.norm2(h)))
    if blk.in_channels != blk.out_channels:
        x = blk.nin_shortcut(h)
    return x + h


def _plain_encoder(enc, x: torch.Tensor) -> torch.Tensor:
    h = enc.conv_in(x)
    for i, level in enumerate(enc.down):
        for blk in level.block:
            h = _block(blk, h)
        if i != len(enc.down) - 1:
            h = F.avg_pool2d(h, kernel_size=2, stride=2)
    h = _block(enc.mid.block_2, _block(enc.mid.block_1, h))
    return enc.conv_out(_swish(enc.norm_out(h)))


def _plain_codes(z: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    b, _, h, w = z.shape
    zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    d = torch.sum(zf ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * torch.einsum("bd,dn->bn", zf, e.t())
    return torch.argmin(d, dim=1).view(b, h, w)


def _plain_decoder(dec, z: torch.Tensor) -> torch.Tensor:
    def conv(c, x):  # NCHW weights and activations, as the official model runs
        return F.conv2d(x, c.weight.contiguous(), c.bias, padding=c.padding)

    def block(blk, x):
        h = conv(blk.conv1, _swish(blk.norm1(x)))
        h = conv(blk.conv2, _swish(blk.norm2(h)))
        if blk.in_channels != blk.out_channels:
            x = conv(blk.nin_shortcut, h)
        return x + h

    h = conv(dec.conv_in, z.contiguous())
    h = block(dec.mid.block_2, block(dec.mid.block_1, h))
    for i in reversed(range(len(dec.up))):
        for blk in dec.up[i].block:
            h = block(blk, h)
        if i != 0:
            h = conv(dec.up[i].upsample.conv, F.interpolate(h, scale_factor=2.0, mode="nearest"))
    return conv(dec.conv_out, _swish(dec.norm_out(h)))


# --- VQGAN encode: exact


def test_reused_swish_is_bit_identical() -> None:
    act = _ReusedSwish()
    for shape in [(2, 32, 16, 16), (1, 64, 8, 8), (2, 32, 16, 16)]:  # the third reuses the first buffer
        x = torch.randn(shape) * 4
        assert torch.equal(act(x.clone()), _swish(x))
    assert len(act.buffers) == 2


def test_encode_bit_identical_to_plain_path() -> None:
    for seed in range(3):
        m = _model(seed)
        x = _images(seed)
        with torch.no_grad():
            z_ref = _plain_encoder(m.encoder, x)
            assert torch.equal(m.encoder(x), z_ref), f"seed {seed}: latents differ"
            assert not m.encoder._swish.buffers  # nothing held between calls
        assert torch.equal(m.encode(x), _plain_codes(z_ref, m.quantize.embedding.weight))


def test_codes_on_ties_and_near_ties() -> None:
    m = _model(7)
    x = _images(7, n=2)
    with torch.no_grad():
        z = _plain_encoder(m.encoder, x)  # (2, D, 4, 4)
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        e = m.quantize.embedding.weight
        # exact ties: code 3 duplicated at 9 and 40 (argmin takes the first); near ties: codes 10/11
        # straddle latent 0 at distances that differ in the last bits
        e[3] = zf[5]
        e[9] = e[3]
        e[40] = e[3]
        e[10] = zf[0] + 1e-3
        e[11] = zf[0] - 1e-3 * (1 + 2e-7)
        e[20] = zf[1] * (1 + 1e-7)
        e[21] = zf[1] * (1 - 1e-7)
        codes = m.encode(x)
    ref = _plain_codes(z, e)
    assert torch.equal(codes, ref)
    assert codes.flatten()[5] == 3


def test_encode_matches_the_official_model_when_checked_out() -> None:
    import os

    import pytest

    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".official")
    if not os.path.exists(os.path.join(root, "taming", "models", "vqgan.py")):
        pytest.skip("no official checkout at .official")
    from benchmarks.vqgan_speed import official_vqmodel

    torch.manual_seed(0)
    off = official_vqmodel(root, SMALL)
    ours = VQGAN.from_official(off.state_dict(), SMALL)
    x = _images(3, n=4)
    with torch.no_grad():
        assert torch.equal(ours.encode(x).flatten(), off.encode(x)[2][2].flatten())


# --- VQGAN decode: to a tolerance


def test_decode_close_to_plain_official_decoder() -> None:
    for seed in range(2):
        m = _model(seed)
        codes = torch.randint(0, SMALL.codebook_size, (2, 4, 4), generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            z = m.quantize.embedding.weight[codes].permute(0, 3, 1, 2)
            ref = _plain_decoder(m.decoder, z).clamp(0, 1)
        err = (m.decode(codes) - ref).abs().max().item()
        assert err < 1e-4, f"seed {seed}: decode differs from the plain decoder by {err:.2e}"


# --- PatchVQ: exact


def test_patch_vq_chunked_search_equals_one_gemm() -> None:
    g = torch.Generator().manual_seed(0)
    cb = torch.rand(256, 48, generator=g)
    cb[7] = cb[3]  # an exact tie: the first index wins
    x = torch.cat([torch.rand(5000, 48, generator=g), cb[3:4]])
    c2 = (cb * cb).sum(1)
    d = torch.addmm(c2, x, cb.t(), alpha=-2.0)
    m, i = d.min(dim=1)
    ref_dist = (m + (x * x).sum(1)).clamp_min(0.0)
    for chunk in (100, 4096, 65536):  # ≥ 50 rows per GEMM (1-row GEMMs round otherwise)
        idx, dist = patch_vq._nearest(x, cb, chunk=chunk)
        assert torch.equal(idx, i) and torch.equal(dist, ref_dist), f"chunk {chunk}"
    assert idx[-1] == 3
    vq = PatchVQ(256, 4, cb)
    images = torch.rand(3, 3, 32, 32, generator=g)
    v = patch_vq._patches(images, 4).reshape(-1, 48)
    ref = torch.addmm(c2, v, cb.t(), alpha=-2.0).argmin(dim=1).view(3, 8, 8)
    assert torch.equal(vq.encode(images), ref)
