"""Write tests/golden/vqgan_small.pt from the OFFICIAL ENAT/taming VQModel.

    python tests/golden/make_vqgan_golden.py --official /path/to/LeapLabTHU/ENAT [--out PATH]

Builds the official ``taming.models.vqgan.VQModel`` (its own Encoder, Decoder and VectorQuantizer2,
nothing stubbed; needs ``einops``) with a small f16 config and random weights, runs its ``encode``
and ``decode_code`` on fixed inputs, and saves weights, inputs and outputs. Also records the
official ADM ``center_crop_arr`` (dataset.py) on small noise images of awkward sizes.
``tests/test_vqgan.py`` loads the weights into ``enat.vqgan.VQGAN`` and checks codes exactly and
images to 1e-4.

To keep the file under 2 MB, weights are stored as int8 times a power-of-two scale per tensor and
images as uint8; the official model runs on exactly those values in float32. The key names and
shapes of the official model with the real MAGE config are stored too (no weights).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

import torch

# Small f16 config: 5 levels (downsample 16), width changes in encoder and decoder (nin_shortcut),
# GroupNorm(32) still divides every width.
CONFIG = dict(resolution=64, ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=2, attn_resolutions=(4,),
              z_channels=32, codebook_size=64, embed_dim=32)
SEED = 0
MIN_GAP = 1e-3  # smallest allowed (2nd best − best) distance, so codes are robust to conv rounding


def load_official_vqmodel(root: str):
    """Import taming/models/vqgan.py from an official checkout without its package __init__
    (which pulls in unrelated HuggingFace models)."""
    sys.path.insert(0, root)  # for `from taming.modules... import` inside vqgan.py
    spec = importlib.util.spec_from_file_location("official_taming_vqgan",
                                                  os.path.join(root, "taming/models/vqgan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VQModel


def load_official_center_crop(root: str):
    spec = importlib.util.spec_from_file_location("official_dataset", os.path.join(root, "dataset.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.center_crop_arr


# (width, height, crop size): odd sides, one and two BOX halvings, a short side below the size
# (bicubic upscaling), a tall and a wide image.
CROP_CASES = [(97, 131, 16), (77, 35, 16), (150, 70, 16), (33, 200, 16), (10, 13, 16), (131, 64, 16),
              (260, 130, 32)]


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, int]:
    """w ≈ q * 2**exp with q int8; q * 2**exp is exact in float32."""
    exp = int(torch.ceil(torch.log2(w.abs().max().clamp_min(1e-30) / 127)).item())
    return torch.round(w / 2.0 ** exp).clamp(-127, 127).to(torch.int8), exp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--official", required=True, help="path of a LeapLabTHU/ENAT checkout")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "vqgan_small.pt"))
    args = ap.parse_args()

    VQModel = load_official_vqmodel(args.official)
    c = CONFIG
    ddconfig = dict(double_z=False, z_channels=c["z_channels"], resolution=c["resolution"], in_channels=3,
                    out_ch=3, ch=c["ch"], ch_mult=list(c["ch_mult"]), num_res_blocks=c["num_res_blocks"],
                    attn_resolutions=list(c["attn_resolutions"]), dropout=0.0)
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    model = VQModel(ddconfig=ddconfig, lossconfig=None, n_embed=c["codebook_size"], embed_dim=c["embed_dim"])
    model.eval()

    with torch.no_grad():
        # Non-trivial norm affines, then int8-representable weights.
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            q, exp = quantize_int8(p)
            p.copy_(q.float() * 2.0 ** exp)
        # Smooth-ish uint8 images (low-res noise upsampled, plus grain) and a non-square noise one.
        smooth = torch.nn.functional.interpolate(torch.rand(3, 3, 16, 16, generator=g), size=(64, 64),
                                                 mode="bilinear", align_corners=False)
        smooth = (smooth + 0.05 * torch.rand(smooth.shape, generator=g)).clamp(0, 1)
        images_u8 = (smooth * 255).round().to(torch.uint8)
        wide_u8 = torch.randint(0, 256, (1, 3, 64, 96), generator=g, dtype=torch.uint8)
        images, wide = images_u8.float() / 255, wide_u8.float() / 255  # as the test rebuilds them
        # Codebook = encoder outputs of other images + noise, so codes are diverse (the official init
        # uniform(±1/K) would send every vector to the same few codes).
        z = model.encoder(torch.rand(4, 3, 64, 64, generator=g)).permute(0, 2, 3, 1).reshape(-1, c["embed_dim"])
        pick = torch.randperm(z.shape[0], generator=g)[: c["codebook_size"]]
        cb = z[pick] + 0.3 * z.std() * torch.randn(c["codebook_size"], c["embed_dim"], generator=g)
        q, exp = quantize_int8(cb)
        model.quantize.embedding.weight.copy_(q.float() * 2.0 ** exp)

        def codes_of(x):
            _, _, (_, _, idx) = model.encode(x)
            b, _, h, w = x.shape
            return idx.view(b, h // 16, w // 16)

        def min_gap(x):
            zz = model.encoder(x).permute(0, 2, 3, 1).reshape(-1, c["embed_dim"])
            d = torch.cdist(zz.double(), model.quantize.embedding.weight.double()) ** 2
            top2 = d.topk(2, dim=1, largest=False).values
            return (top2[:, 1] - top2[:, 0]).min().item()

        codes, codes_wide = codes_of(images), codes_of(wide)
        gap = min(min_gap(images), min_gap(wide))
        if gap < MIN_GAP:
            raise SystemExit(f"near-tie in the golden codes (gap {gap:.2e}); change SEED")
        rand_codes = torch.randint(0, c["codebook_size"], (2, 4, 5), generator=g)
        decoded = model.decode_code(codes)
        decoded_rand = model.decode_code(rand_codes)

    state = {k: quantize_int8(v) for k, v in model.state_dict().items()}
    for k, v in model.state_dict().items():  # the int8 form must be lossless
        assert torch.equal(state[k][0].float() * 2.0 ** state[k][1], v), k
    mage_ddconfig = dict(ddconfig, z_channels=256, resolution=256, ch=128, ch_mult=[1, 1, 2, 2, 4],
                         attn_resolutions=[16])
    mage = VQModel(ddconfig=mage_ddconfig, lossconfig=None, n_embed=1024, embed_dim=256)
    mage_shapes = [(k, tuple(v.shape)) for k, v in mage.state_dict().items()]
    from PIL import Image
    center_crop_arr = load_official_center_crop(args.official)
    crops = []
    for w, h, size in CROP_CASES:
        arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8)
        out = center_crop_arr(Image.fromarray(arr.numpy()), size)
        crops.append((arr, size, torch.from_numpy(out.copy())))

    golden = dict(crops=crops, config=c, state_dict_int8=state, images_u8=images_u8, codes=codes, wide_u8=wide_u8,
                  codes_wide=codes_wide, rand_codes=rand_codes, decoded=decoded, decoded_rand=decoded_rand,
                  min_gap=gap, mage_f16_shapes=mage_shapes)
    torch.save(golden, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB): {len(state)} keys, "
          f"{codes.unique().numel()} distinct codes of {codes.numel()}, min gap {gap:.3g}, "
          f"decoded range [{decoded.min():.3f}, {decoded.max():.3f}]")


if __name__ == "__main__":
    main()
