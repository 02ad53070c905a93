"""enat.vqgan against golden outputs of the official taming VQModel (tests/golden/make_vqgan_golden.py)."""
from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from enat.vqgan import VQGAN, VQGAN_PRESETS, VQGANConfig, center_crop_arr, preprocess, to_tensor

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "vqgan_small.pt")


@pytest.fixture(scope="module")
def golden() -> dict:
    g = torch.load(GOLDEN, map_location="cpu", weights_only=True)
    # int8 · 2**exp is how the generator stored the official weights; the product is exact in float32
    g["state_dict"] = {k: q.float() * 2.0 ** e for k, (q, e) in g["state_dict_int8"].items()}
    g["images"] = g["images_u8"].float() / 255
    g["wide"] = g["wide_u8"].float() / 255
    return g


@pytest.fixture(scope="module")
def small(golden: dict) -> VQGAN:
    return VQGAN.from_official(golden["state_dict"], VQGANConfig(**golden["config"]))


# --- config ------------------------------------------------------------------------------------------


def test_mage_preset_matches_official_layout(golden: dict) -> None:
    cfg = VQGANConfig.preset("mage-f16")
    assert cfg == VQGAN_PRESETS["mage-f16"]
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels, cfg.codebook_size, cfg.embed_dim,
            cfg.resolution, cfg.attn_resolutions) == (128, (1, 1, 2, 2, 4), 2, 256, 1024, 256, 256, (16,))
    assert cfg.downsample == 16
    model = VQGAN("mage-f16")
    # Keys and shapes identical to the official VQModel built from vq-f16-jax.yaml (recorded in golden).
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == golden["mage_f16_shapes"]
    assert len(golden["mage_f16_shapes"]) == 168
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    assert round(n_enc / 1e6, 2) == 23.78 and round(n_dec / 1e6, 2) == 30.48  # enat-facts.md §8
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.codebook_size == 1024 and model.downsample == 16


@pytest.mark.parametrize("change, field", [
    (dict(ch=48), "ch"),
    (dict(ch=0), "ch"),
    (dict(embed_dim=128), "embed_dim"),
    (dict(resolution=100), "resolution"),
    (dict(ch_mult=()), "ch_mult"),
    (dict(ch_mult=(1, 0, 2)), "ch_mult"),
    (dict(num_res_blocks=True), "num_res_blocks"),
    (dict(codebook_size=-1), "codebook_size"),
    (dict(attn_resolutions=("16",)), "attn_resolutions"),
])
def test_config_rejects_bad_values(change: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"VQGANConfig.{field}"):
        VQGANConfig(**change)


def test_config_lists_become_tuples_and_unknown_preset() -> None:
    cfg = VQGANConfig(ch_mult=[1, 1, 2, 2, 4], attn_resolutions=[16])
    assert cfg == VQGANConfig() and hash(cfg) == hash(VQGANConfig())
    assert cfg.to_dict()["ch_mult"] == [1, 1, 2, 2, 4]
    with pytest.raises(KeyError, match="mage-f16"):
        VQGANConfig.preset("nope")


# --- golden numerics -----------------------------------------------------------------------------------


def test_codes_equal_official_exactly(golden: dict, small: VQGAN) -> None:
    codes = small.encode(golden["images"])
    assert codes.dtype == torch.int64 and codes.shape == (3, 4, 4)
    assert torch.equal(codes, golden["codes"])
    assert torch.equal(small.encode(golden["wide"]), golden["codes_wide"])  # non-square (64, 96)
    assert torch.equal(small(golden["images"]), golden["codes"])  # forward = encode
    cl = golden["images"].contiguous(memory_format=torch.channels_last)  # e.g. a permuted HWC batch
    assert torch.equal(small.encode(cl), golden["codes"])


def test_decode_matches_official(golden: dict, small: VQGAN) -> None:
    with torch.no_grad():  # unclamped decoder output: the golden range is about [-4, 4.4]
        raw = small.decoder(small.quantize.lookup(golden["codes"]))
    assert (raw - golden["decoded"]).abs().max().item() < 1e-4
    images = small.decode(golden["rand_codes"])  # (2, 4, 5) codes → (2, 3, 64, 80)
    assert images.dtype == torch.float32 and images.shape == (2, 3, 64, 80)
    assert images.min() >= 0 and images.max() <= 1
    assert (images - golden["decoded_rand"].clamp(0, 1)).abs().max().item() < 1e-4


def test_decode_under_autocast(golden: dict, small: VQGAN) -> None:
    ref = small.decode(golden["rand_codes"])
    low = small.decode(golden["rand_codes"], dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and low.shape == ref.shape
    assert (low - ref).abs().mean().item() < 0.05  # bf16 convs: loose, but the same image
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outer = small.decode(golden["rand_codes"])
    assert outer.dtype == torch.float32 and torch.allclose(outer, low)


def test_outputs_are_ordinary_tensors(golden: dict, small: VQGAN) -> None:
    images = small.decode(golden["codes"])
    images.mul_(255)  # callers may edit results in place (not inference-mode tensors)
    assert not images.requires_grad


# --- loading -------------------------------------------------------------------------------------------


def test_from_official_wrappers_and_sources(golden: dict, tmp_path) -> None:
    cfg = VQGANConfig(**golden["config"])
    sd = golden["state_dict"]
    path = tmp_path / "vq.ckpt"
    torch.save({"state_dict": sd, "global_step": 3}, path)  # Lightning-style wrapper
    buf = io.BytesIO()
    torch.save({"module." + k: v for k, v in sd.items()}, buf)  # DDP prefix
    sources = [str(path), path, buf.getvalue(), io.BytesIO(buf.getvalue()), {"model": sd}]
    for source in sources:
        model = VQGAN.from_official(source, cfg)
        assert torch.equal(model.encode(golden["images"]), golden["codes"]), type(source)


def test_from_official_bad_checkpoints_name_the_key(golden: dict) -> None:
    cfg = VQGANConfig(**golden["config"])
    sd = dict(golden["state_dict"])
    missing = {k: v for k, v in sd.items() if k != "decoder.up.1.upsample.conv.weight"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): decoder.up.1.upsample.conv.weight"):
        VQGAN.from_official(missing, cfg)
    wrong = dict(sd, **{"quantize.embedding.weight": torch.zeros(65, 32)})
    with pytest.raises(ValueError, match=r"quantize.embedding.weight: checkpoint \(65, 32\) vs model \(64, 32\)"):
        VQGAN.from_official(wrong, cfg)
    extra = dict(sd, **{"encoder.mid.attn_1.q.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected keys.*encoder.mid.attn_1.q.weight"):
        VQGAN.from_official(extra, cfg)
    with pytest.raises(ValueError, match="shape mismatches"):  # small weights into the MAGE config
        VQGAN.from_official(sd, "mage-f16")
    with pytest.raises(FileNotFoundError):
        VQGAN.from_official("/nonexistent/vqgan_jax_strongaug.ckpt")


def test_loaded_weights_reach_the_folded_upsample(golden: dict) -> None:
    # The decoder caches a folded upsample kernel; replacing the weights must invalidate it.
    cfg = VQGANConfig(**golden["config"])
    model = VQGAN(cfg)
    model.decode(golden["rand_codes"])  # fills the cache with the random-init kernel
    model.load_state_dict(golden["state_dict"])
    out = model.decode(golden["rand_codes"])
    assert (out - golden["decoded_rand"].clamp(0, 1)).abs().max().item() < 1e-4


def test_bad_inputs(small: VQGAN) -> None:
    with pytest.raises(ValueError, match="multiple of the downsampling factor 16"):
        small.encode(torch.rand(1, 3, 64, 40))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        small.encode(torch.rand(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        small.decode(torch.full((1, 2, 2), 64))
    with pytest.raises(ValueError, match="integer codes"):
        small.decode(torch.zeros(1, 2, 2))


# --- preprocessing -------------------------------------------------------------------------------------


def test_center_crop_matches_official(golden: dict) -> None:
    for arr, size, expected in golden["crops"]:
        out = center_crop_arr(Image.fromarray(arr.numpy()), size)
        assert out.dtype == np.uint8 and out.shape == (size, size, 3)
        assert np.array_equal(out, expected.numpy()), (tuple(arr.shape), size)


def test_center_crop_known_image() -> None:
    # 400x200 (W x H): left half red, right half blue. Short side 200 >= 2*100, so one BOX halving
    # → 200x100 (no colour mixing: the edge sits on an even column), no resize, crop columns 50..149.
    arr = np.zeros((200, 400, 3), np.uint8)
    arr[:, :200, 0] = 255
    arr[:, 200:, 2] = 255
    out = center_crop_arr(Image.fromarray(arr), 100)
    assert out.shape == (100, 100, 3)
    assert (out[:, :50] == [255, 0, 0]).all() and (out[:, 50:] == [0, 0, 255]).all()
    # Constant images stay constant through BOX halving, bicubic up/down-scaling and any crop offset.
    for w, h in [(1001, 1503), (257, 301), (31, 17), (256, 256)]:
        img = Image.new("RGB", (w, h), (12, 200, 77))
        out = center_crop_arr(img, 64)
        assert out.shape == (64, 64, 3) and (out == [12, 200, 77]).all(), (w, h)
    # Non-RGB modes are converted first, as the official dataset does.
    assert center_crop_arr(Image.new("L", (90, 70), 9), 32).shape == (32, 32, 3)
    assert (center_crop_arr(Image.new("RGBA", (70, 90), (1, 2, 3, 4)), 32) == [1, 2, 3]).all()


def test_to_tensor_and_preprocess() -> None:
    arr = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    x = to_tensor(arr)
    assert x.shape == (1, 3, 4, 4) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.equal(x[0], torch.from_numpy(arr.astype(np.float32) / 255.0).permute(2, 0, 1))
    assert to_tensor([arr, arr]).shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="uint8"):
        to_tensor(arr.astype(np.float32))
    batch = preprocess([Image.new("RGB", (50, 40), (255, 0, 51)), Image.new("RGB", (33, 90))], 32)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.allclose(batch[0, :, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
