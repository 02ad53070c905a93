"""The core demo: ENAT learning on a CPU in a few minutes, with nothing but `enat` (no Ray, no services).

    python -m jobs.core_demo [--out demo-out/core] [--minutes 3] [--size small|medium]

1. generates a small class-conditional image set (10 classes: a coloured shape each, random position,
   size and background);
2. fits the patch k-means tokenizer on it (no pretrained weights) and tokenizes it;
3. trains a tiny ENAT with the official objective (reuse training with an EMA model);
4. samples a grid (one row per class) with the paper's 8-step sampler and writes it as PNG;
5. scores it offline: a small classifier trained on the real images says how often a sample shows the
   class it was asked for, for the trained model and for the untrained one.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

import enat
from enat.patch_vq import PatchVQ

NUM_CLASSES = 10
SIZES = {  # images, resolution, patch, codebook, model dim, encoder depth
    "small": dict(n=2000, res=32, patch=4, codebook=64, dim=128, depth=4, batch=64),
    "medium": dict(n=8000, res=32, patch=4, codebook=128, dim=256, depth=6, batch=128),
}


def make_shapes(n: int, res: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images float (n, 3, res, res) in [0, 1] and labels (n,): class c is shape c % 5 in hue c."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % NUM_CLASSES
    labels = labels[torch.randperm(n, generator=g)]
    yy, xx = torch.meshgrid(torch.arange(res).float() + 0.5, torch.arange(res).float() + 0.5, indexing="ij")
    imgs = torch.empty(n, 3, res, res)
    hues = torch.linspace(0, 1, NUM_CLASSES + 1)[:-1]
    for i in range(n):
        c = int(labels[i])
        r = (0.22 + 0.12 * torch.rand(1, generator=g).item()) * res
        cx, cy = (r + torch.rand(2, generator=g) * (res - 2 * r)).tolist()
        dx, dy = (xx - cx) / r, (yy - cy) / r
        shape = c % 5
        if shape == 0:
            m = dx ** 2 + dy ** 2 <= 1
        elif shape == 1:
            m = (dx.abs() <= 0.8) & (dy.abs() <= 0.8)
        elif shape == 2:
            m = (dy <= 0.8) & (dy >= -0.9 + 2 * dx.abs())
        elif shape == 3:
            m = ((dx.abs() <= 0.3) | (dy.abs() <= 0.3)) & (dx.abs() <= 1) & (dy.abs() <= 1)
        else:
            m = (dx ** 2 + dy ** 2 <= 1) & (dx ** 2 + dy ** 2 >= 0.35)
        color = torch.tensor(_hsv(float(hues[c]), 0.85, 0.95))
        bg = 0.1 + 0.25 * torch.rand(3, generator=g)
        imgs[i] = torch.where(m, color[:, None, None], bg[:, None, None])
    return imgs, labels


def _hsv(h: float, s: float, v: float) -> tuple[float, float, float]:
    import colorsys
    return colorsys.hsv_to_rgb(h, s, v)


class Classifier(nn.Module):
    """A small CNN for the offline figure: does a sample show the requested class?"""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                 nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(64, NUM_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, steps: int = 300, seed: int = 0) -> Classifier:
    torch.manual_seed(seed)
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=g)
        loss = F.cross_entropy(clf(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clf.eval()


@torch.no_grad()
def class_accuracy(clf: Classifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (clf(images).argmax(-1) == labels).float().mean().item()


def save_grid(images: torch.Tensor, path: Path, nrow: int, scale: int = 3) -> None:
    """images (N, 3, H, W) in [0, 1] -> one PNG, `nrow` images per row, upscaled `scale`x."""
    n, _, h, w = images.shape
    rows = math.ceil(n / nrow)
    grid = torch.ones(3, rows * (h + 2), nrow * (w + 2))
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, c * (w + 2) + 1: c * (w + 2) + 1 + w] = images[i]
    arr = (grid.permute(1, 2, 0).clamp(0, 1) * 255 + 0.5).byte().numpy()
    img = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def sample_grid(model: enat.ENAT, tok: PatchVQ, per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(NUM_CLASSES).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    # guidance 2.5 as the paper's 256 px setting; lower temperatures suit this tiny codebook
    toks = enat.generate(model, labels, enat.SamplerConfig(steps=8, cfg_scale=2.5, mask_temp=1.0, sample_temp=1.0),
                         generator=gen)
    grid = int(math.isqrt(model.config.seq_len))
    return tok.decode(toks.view(-1, grid, grid)), labels


def run(out: Path, minutes: float, size: str = "small", seed: int = 0, log=print) -> dict:
    s = SIZES[size]
    t_start = time.time()
    torch.manual_seed(seed)
    log(f"[1/5] generating {s['n']} images ({NUM_CLASSES} classes, {s['res']} px)")
    images, labels = make_shapes(s["n"], s["res"], seed)
    log(f"[2/5] fitting the patch k-means tokenizer ({s['codebook']} codes, {s['patch']}x{s['patch']} patches)")
    tok = PatchVQ.fit(images, codebook_size=s["codebook"], patch=s["patch"], iters=10, seed=seed)
    tokens = tok.encode(images).flatten(1)                                 # (N, L)
    recon = tok.decode(tok.encode(images[:8]))
    cfg = enat.ENATConfig(encoder_depth=s["depth"], decoder_depth=1, dim=s["dim"], num_heads=4,
                          seq_len=tokens.shape[1], codebook_size=s["codebook"], num_classes=NUM_CLASSES)
    model = enat.ENAT(cfg).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    untrained = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.03)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, enat.warmup_constant(100))
    g = torch.Generator().manual_seed(seed + 1)
    log(f"[3/5] training ENAT ({model.num_parameters() / 1e6:.2f}M params) for {minutes:g} min on CPU")
    losses, step, t0 = [], 0, time.time()
    bar = tqdm(total=int(minutes * 60), unit="s", desc="train", mininterval=5, bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f}s {postfix}")
    while time.time() - t0 < minutes * 60:
        idx = torch.randint(0, len(tokens), (s["batch"],), generator=g)
        y = labels[idx]
        y = torch.where(torch.rand(len(y), generator=g) < 0.15, NUM_CLASSES, y)   # p_uncond 0.15
        loss, _ = enat.lsimple(model, tokens[idx], y, ema, generator=g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        enat.ema_update(ema, model, 0.995)   # faster than the paper's 0.9999 for a few hundred steps
        losses.append(loss.item())
        step += 1
        bar.n = min(time.time() - t0, minutes * 60)
        bar.set_postfix_str(f"step {step} loss {np.mean(losses[-20:]):.3f}")
    bar.close()
    log(f"[4/5] sampling a grid with the EMA model ({step} steps trained)")
    samples, asked = sample_grid(ema, tok, 8, seed)
    before, _ = sample_grid(untrained, tok, 8, seed)
    grid_path = out / "samples.png"
    save_grid(samples, grid_path, nrow=8)
    save_grid(torch.cat([images[:8], recon]), out / "tokenizer_reconstruction.png", nrow=8)
    log("[5/5] scoring: a classifier trained on the real images checks the requested class")
    clf = train_classifier(images, labels, seed=seed)
    real_acc = class_accuracy(clf, images[-500:], labels[-500:])
    report = {
        "grid": str(grid_path), "train_steps": step, "loss_first": float(np.mean(losses[:20])),
        "loss_last": float(np.mean(losses[-20:])), "classifier_acc_real": real_acc,
        "class_acc_trained": class_accuracy(clf, samples, asked),
        "class_acc_untrained": class_accuracy(clf, before, asked),
        "seconds": round(time.time() - t_start, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    torch.save({"config": cfg.to_dict(), "ema": ema.state_dict(), "tokenizer": tok.state_dict()}, out / "model.pt")
    return report


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out/core", help="output folder (default: demo-out/core)")
    ap.add_argument("--minutes", type=float, default=3.0, help="training time budget (default 3)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = run(out, args.minutes, args.size, args.seed)
    print(f"\nloss {r['loss_first']:.3f} -> {r['loss_last']:.3f} over {r['train_steps']} steps")
    print(f"samples showing the requested class: {100 * r['class_acc_trained']:.0f}% "
          f"(untrained model: {100 * r['class_acc_untrained']:.0f}%, classifier on real images: "
          f"{100 * r['classifier_acc_real']:.0f}%)")
    print(f"sample grid (one row per class): {Path(r['grid']).resolve()}")
    return r


if __name__ == "__main__":
    main()
