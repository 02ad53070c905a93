"""enat.patch_vq: k-means patch tokenizer (no pretrained weights)."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from enat.patch_vq import PatchVQ


def _images(n: int = 300, size: int = 16, seed: int = 0) -> torch.Tensor:
    """Smooth random images (N, 3, size, size) in [0, 1]: upsampled low-res noise, so patches cluster."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, size // 4, size // 4, generator=g), size=size, mode="bilinear")


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return _images()


@pytest.fixture(scope="module")
def vq(images: torch.Tensor) -> PatchVQ:
    return PatchVQ.fit(images, codebook_size=64, patch=4, iters=8, seed=0)


def test_round_trip_shapes(vq: PatchVQ, images: torch.Tensor) -> None:
    assert vq.codebook.shape == (64, 48) and vq.codebook_size == 64 and vq.patch == vq.downsample == 4
    codes = vq.encode(images[:5])
    assert codes.dtype == torch.int64 and codes.shape == (5, 4, 4)
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    out = vq.decode(codes)
    assert out.dtype == torch.float32 and out.shape == (5, 3, 16, 16)
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(vq(images[:5]), codes)  # forward = encode
    # non-square images work too
    assert vq.encode(torch.rand(2, 3, 8, 12)).shape == (2, 2, 3)


def test_decode_is_the_codebook_patch(vq: PatchVQ) -> None:
    codes = torch.tensor([[[3, 7], [0, 63]]])
    out = vq.decode(codes)  # (1, 3, 8, 8)
    # top-right 4x4 patch is code 7, laid out (channel, row, col)
    assert torch.equal(out[0, :, :4, 4:].reshape(-1), vq.codebook[7])
    assert torch.equal(out[0, :, 4:, 4:].reshape(-1), vq.codebook[63])


def test_codebook_patches_encode_to_their_own_index(vq: PatchVQ) -> None:
    codes = torch.arange(64).view(1, 8, 8)
    assert torch.equal(vq.encode(vq.decode(codes)), codes)


def test_error_decreases_with_codebook_size(images: torch.Tensor) -> None:
    errors = []
    for k in (4, 16, 64):
        vq = PatchVQ.fit(images, codebook_size=k, patch=4, iters=8, seed=0)
        errors.append(((vq.decode(vq.encode(images)) - images) ** 2).mean().item())
    assert errors[0] > errors[1] > errors[2], errors
    # and k-means beats the trivial "every patch is the mean" baseline by a wide margin
    assert errors[2] < 0.5 * images.var().item()


def test_deterministic_under_seed(images: torch.Tensor, vq: PatchVQ) -> None:
    again = PatchVQ.fit(images, codebook_size=64, patch=4, iters=8, seed=0)
    assert torch.equal(again.codebook, vq.codebook)
    other = PatchVQ.fit(images, codebook_size=64, patch=4, iters=8, seed=1)
    assert not torch.equal(other.codebook, vq.codebook)
    rand = PatchVQ.fit(images, codebook_size=64, patch=4, iters=2, seed=0, init="random")
    assert torch.equal(rand.codebook, PatchVQ.fit(images, codebook_size=64, patch=4, iters=2, seed=0,
                                                  init="random").codebook)
    # a global RNG state does not leak in
    torch.manual_seed(123)
    assert torch.equal(PatchVQ.fit(images, codebook_size=64, patch=4, iters=8, seed=0).codebook, vq.codebook)


def test_subsampled_fit_and_duplicates() -> None:
    # max_patches subsamples; an image set with only 3 distinct patches still fills 8 codes
    flat = torch.cat([torch.full((4, 3, 8, 8), v) for v in (0.0, 0.5, 1.0)])
    vq = PatchVQ.fit(flat, codebook_size=8, patch=4, iters=3, seed=0, max_patches=40)
    assert torch.equal(vq.decode(vq.encode(flat)), flat)


def test_save_load_round_trip(vq: PatchVQ, images: torch.Tensor, tmp_path) -> None:
    path = tmp_path / "patch_vq.pt"
    torch.save(vq.state_dict(), path)
    buf = io.BytesIO()
    torch.save({"model": vq.state_dict()}, buf)
    for source in (str(path), path, buf.getvalue(), dict(vq.state_dict())):
        loaded = PatchVQ.from_state_dict(source)
        assert (loaded.codebook_size, loaded.patch, loaded.downsample) == (64, 4, 4)
        assert torch.equal(loaded.encode(images[:4]), vq.encode(images[:4]))
    fresh = PatchVQ(64, 4)
    fresh.load_state_dict(vq.state_dict())
    assert torch.equal(fresh.codebook, vq.codebook)


def test_errors(images: torch.Tensor, vq: PatchVQ) -> None:
    with pytest.raises(ValueError, match="cannot fill a codebook of 1000"):
        PatchVQ.fit(images[:2], codebook_size=1000, patch=4)
    with pytest.raises(ValueError, match="not a multiple of patch 3"):
        PatchVQ.fit(images, codebook_size=4, patch=3)
    with pytest.raises(ValueError, match="init"):
        PatchVQ.fit(images, codebook_size=4, init="kmeans")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        vq.encode(torch.rand(2, 16, 16))
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        vq.decode(torch.tensor([[[64]]]))
    with pytest.raises(ValueError, match="codebook width 50"):
        PatchVQ.from_state_dict({"codebook": torch.zeros(8, 50)})
    with pytest.raises(ValueError, match="PatchVQ.patch"):
        PatchVQ(8, 0)
