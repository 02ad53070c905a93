"""Build `tests/golden/fid_inception_small.pt` by running pytorch-fid's own code.

What the golden file pins (read by `tests/test_fid.py`):
- `layout`: pytorch-fid's FID Inception state-dict keys and shapes, i.e. the key layout of
  `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid loads that file strictly into this model);
- `seed`: the weights are not stored (~95 MB); both this script and the test rebuild them with
  `golden_state_dict(layout, seed)` below (a copy of this function lives in the test), and
  `checksum` pins the result so a changed RNG is reported as such, not as a model mismatch;
- `images` (float32 [2, 3, 32, 32] in [0, 1]) and pytorch-fid's outputs on them:
  `InceptionV3([3], resize_input=True, normalize_input=True)` pool3 [2, 2048], and the 1008-way
  logits of the same network's `fc` (pytorch-fid's `fid_inception_v3()` model, forward from its
  `avgpool` output: dropout is the identity in eval);
- `png_pool3`: pool3 after the PNG protocol — each image written with torchvision's `save_image`
  (what U-ViT's `sample2dir` does) and read back with pytorch-fid's `ImagePathDataset` + `ToTensor`;
- `fd_cases`: inputs and outputs of pytorch-fid's `calculate_frechet_distance`.

How pytorch-fid runs here without torchvision's compiled ops: the registry's torchvision is a CUDA
build of another torch version, so `import torchvision` fails in `_meta_registrations` ("operator
torchvision::nms does not exist"). pytorch-fid only needs torchvision's pure-Python Inception blocks,
so this script
1. puts an unpacked torchvision wheel (`pip download torchvision==0.29.1 --no-deps`, unzipped; never
   installed) first on `sys.path`; its `extension.py` already tolerates the `_C_stable.so` that cannot
   load (it catches the OSError and reports no ops);
2. registers empty modules for `torchvision._meta_registrations` and `torchvision._autograd_registrations`
   before the import — the only two modules that touch the missing `torchvision::*` operators at import
   time (they register fake / autograd kernels for nms, roi_align, ...; none is used by Inception);
3. imports pytorch-fid from its source tree (mseitzer/pytorch-fid, commit b9c1811, `src/`) and replaces
   `pytorch_fid.inception.load_state_dict_from_url` (the weights download) with a function returning a
   sentinel; torchvision's `Inception3.load_state_dict` is wrapped for the one call so that the sentinel
   becomes `golden_state_dict(<that model's own layout>, seed)`, loaded strictly by pytorch-fid's code.

Both sources live in the git-ignored `.official/` folder:
    .official/tv/torchvision/...           (unzipped torchvision-0.29.1-cp311-...whl)
    .official/pytorch-fid/src/pytorch_fid/  (git archive of mseitzer/pytorch-fid at b9c1811)

Run: `.venv/bin/python tests/golden/make_fid_golden.py` (about 10 s on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "fid_inception_small.pt"
SEED = 20241107


def golden_state_dict(layout: list[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, torch.Tensor]:
    """The seeded weight recipe shared with the tests (tests/helpers.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.helpers import fid_recipe_state_dict
    return fid_recipe_state_dict(layout, seed)


def checksum(sd: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(sd):
        h.update(k.encode())
        h.update(sd[k].numpy().tobytes())
    return h.hexdigest()


def import_pytorch_fid(tv_dir: Path, fid_dir: Path):
    """Import pytorch_fid.inception / fid_score with torchvision's compiled ops disabled (see module doc)."""
    for d in (tv_dir / "torchvision", fid_dir / "pytorch_fid"):
        if not d.is_dir():
            sys.exit(f"{d} is missing: see this script's docstring for how to fetch it into .official/")
    sys.path.insert(0, str(fid_dir))
    sys.path.insert(0, str(tv_dir))
    for name in ("torchvision._meta_registrations", "torchvision._autograd_registrations"):
        sys.modules[name] = types.ModuleType(name)
    import torchvision  # noqa: F401

    if not str(Path(torchvision.__file__).resolve()).startswith(str(tv_dir.resolve())):
        sys.exit(f"imported torchvision from {torchvision.__file__}, expected {tv_dir}")
    import pytorch_fid.fid_score as fid_score
    import pytorch_fid.inception as inception

    return torchvision, inception, fid_score


def build_pytorch_fid_net(torchvision, inception, seed: int):
    """pytorch-fid's InceptionV3([3]) and its inner fid_inception_v3 model, with the golden weights."""
    sentinel = {"__golden__": torch.zeros(())}
    captured = {}
    Inception3 = torchvision.models.inception.Inception3
    original = Inception3.load_state_dict

    def load_golden(self, state_dict, *args, **kwargs):
        if state_dict is not sentinel:
            return original(self, state_dict, *args, **kwargs)
        layout = [(k, tuple(v.shape)) for k, v in self.state_dict().items()]
        sd = golden_state_dict(layout, seed)
        captured.update(layout=layout, model=self, checksum=checksum(sd))
        return original(self, sd, *args, **kwargs)  # pytorch-fid's call: strict=True

    inception.load_state_dict_from_url = lambda *a, **k: sentinel
    Inception3.load_state_dict = load_golden
    try:
        net = inception.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True)
    finally:
        Inception3.load_state_dict = original
    return net.eval(), captured["model"].eval(), captured


def fd_cases(fid_score) -> list[dict]:
    """Inputs (float64) and pytorch-fid's calculate_frechet_distance outputs."""
    rng = np.random.default_rng(SEED)
    d = 48
    cases = []

    def stats(n, shift=0.0):
        x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift
        return x.mean(0), np.cov(x, rowvar=False)

    for name, (a, b) in {
        "well_conditioned": (stats(400), stats(300, 0.5)),
        "rank_deficient": (stats(20), stats(30, 0.2)),  # fewer samples than dims: singular covariances
        "near_identical": (None, None),
    }.items():
        if name == "near_identical":
            mu1, s1 = stats(500)
            e = rng.standard_normal((d, d)) * 1e-4
            a, b = (mu1, s1), (mu1 + 1e-3, s1 + e @ e.T)
        fd = float(fid_score.calculate_frechet_distance(a[0], a[1], b[0], b[1]))
        cases.append({"name": name, "mu1": torch.from_numpy(a[0]), "sigma1": torch.from_numpy(a[1]),
                      "mu2": torch.from_numpy(b[0]), "sigma2": torch.from_numpy(b[1]), "fd": fd})
        print(f"  fd {name}: {fd!r}")
    return cases


def png_features(torchvision, fid_score, net, images: torch.Tensor) -> torch.Tensor:
    """pool3 of images after save_image → PNG → pytorch-fid's ImagePathDataset(ToTensor)."""
    from torchvision.utils import save_image
    import torchvision.transforms as TF

    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, img in enumerate(images):
            files.append(os.path.join(tmp, f"{i}.png"))
            save_image(img, files[-1])
        ds = fid_score.ImagePathDataset(files, transforms=TF.ToTensor())
        batch = torch.stack([ds[i] for i in range(len(ds))])
    with torch.no_grad():
        return net(batch)[0].squeeze(3).squeeze(2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--torchvision-src", type=Path, default=ROOT / ".official" / "tv")
    ap.add_argument("--pytorch-fid-src", type=Path, default=ROOT / ".official" / "pytorch-fid" / "src")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(2)

    torchvision, inception, fid_score = import_pytorch_fid(args.torchvision_src, args.pytorch_fid_src)
    net, inner, captured = build_pytorch_fid_net(torchvision, inception, SEED)

    g = torch.Generator().manual_seed(SEED + 1)
    smooth = torch.linspace(0, 1, 32)
    images = torch.stack([
        (smooth[None, :, None] * smooth[None, None, :]).expand(3, 32, 32) * 0.7
        + 0.3 * torch.rand(3, 32, 32, generator=g),
        torch.rand(3, 32, 32, generator=g),
    ]).float()  # (2, 3, 32, 32) in [0, 1]
    with torch.no_grad():
        (pool3_map,) = net(images)  # (2, 2048, 1, 1)
        pool3 = pool3_map.flatten(1)
        logits = inner.fc(inner.dropout(pool3))  # the TF graph's 1008-way head
    png_pool3 = png_features(torchvision, fid_score, net, images)
    print(f"  pool3 mean {pool3.mean():.4f} std {pool3.std():.4f}; image-to-image diff "
          f"{(pool3[0] - pool3[1]).abs().mean():.4f}; png vs float diff {(png_pool3 - pool3).abs().max():.2e}")

    golden = {
        "source": "mseitzer/pytorch-fid@b9c1811 InceptionV3([3], resize_input=True, normalize_input=True, "
                  f"use_fid_inception=True); torchvision {torchvision.__version__} python files; torch {torch.__version__}",
        "seed": SEED,
        "layout": captured["layout"],
        "checksum": captured["checksum"],
        "images": images,
        "pool3": pool3,
        "logits": logits,
        "png_pool3": png_pool3,
        "fd_cases": fd_cases(fid_score),
    }
    torch.save(golden, args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB, {len(captured['layout'])} keys)")


if __name__ == "__main__":
    main()
