"""Tokenize throughput: the Ray job vs the official extraction approach, on the same images and tokenizer.

Measures images/s end to end (read + decode + center crop + encode with flips + write) and how the
time splits between decode, encode and write, for

* the Ray job (``pipeline.tokenize.run_tokenize`` on an embedded local Ray with ``--workers`` CPUs),
* the official ``extract_imagenet_feature.py`` approach: one process, a torch ``DataLoader`` with
  ``--workers`` workers running the official ``ImageDataset`` preprocessing, the encoder in the
  main process (image batch concatenated with its flip), one ``np.save`` at the end,

once per worker count, so the scaling from 1 to 2 workers shows too::

    python benchmarks/tokenize_throughput.py                       # CPU, patch tokenizer, 1 and 2 workers
    python benchmarks/tokenize_throughput.py --tiny                # CI smoke (seconds)
    python benchmarks/tokenize_throughput.py --tokenizer vqgan --device cuda --workers 16 \\
        --actor-gpus 1 --images 20000                              # one GPU node, MAGE VQGAN random weights

Images are synthetic JPEGs with ImageNet-like sizes (``--data DIR`` takes a real ImageNet-layout
folder instead). Results are printed as a table and written as JSON with ``--json``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.cluster import LOOPBACK_ENV  # noqa: E402

for _k, _v in LOOPBACK_ENV.items():  # an embedded Ray stays on 127.0.0.1
    os.environ.setdefault(_k, _v)


# ---------------------------------------------------------------------------------------------------
# Inputs


def make_images(root: Path, n: int, classes: int, seed: int = 0, size_range=(300, 520)) -> None:
    """``n`` smooth random JPEGs in ImageNet layout, sizes drawn like ImageNet's (~400 x 350)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        c = f"n{i % classes:08d}"
        d = root / "train" / c
        d.mkdir(parents=True, exist_ok=True)
        w, h = (int(x) for x in rng.integers(*size_range, 2))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        im = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        noise = rng.integers(-12, 12, (h, w, 3))
        arr = np.clip(np.asarray(im).astype(np.int16) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(d / f"{c}_{i:06d}.JPEG", quality=90)


def make_tokenizer(kind: str, resolution: int, workdir: Path, seed: int = 0) -> tuple[str | None, object]:
    """(weights path or None for random VQGAN, tokenizer module)."""
    if kind == "patch":
        from enat.patch_vq import PatchVQ

        g = torch.Generator().manual_seed(seed)
        crops = torch.rand(256, 3, resolution, resolution, generator=g)
        tok = PatchVQ.fit(crops, codebook_size=1024, patch=16, iters=3, seed=seed)
        path = workdir / "patch_vq.pt"
        torch.save(tok.state_dict(), path)
        return str(path), tok
    from pipeline.models import TokenizerSection, build_tokenizer

    tok, _ = build_tokenizer(TokenizerSection(kind="vqgan", weights=None, seed=seed))
    return None, tok


class OfficialVQGAN(torch.nn.Module):
    """The official taming VQModel holding our VQGAN's weights, with the tokenizer's ``encode`` (codes)."""

    def __init__(self, root: str, ours: torch.nn.Module):
        super().__init__()
        sys.path.insert(0, str(REPO / "benchmarks"))
        from vqgan_speed import official_vqmodel

        self.model = official_vqmodel(root, ours.config)
        self.model.load_state_dict(ours.state_dict())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.encode(images)[2][2].view(images.shape[0], -1)  # as official: extract_imagenet_feature.py


# ---------------------------------------------------------------------------------------------------
# The official approach (extract_imagenet_feature.py + dataset.py ImageDataset), re-expressed


def list_official(path: str) -> tuple[list[str], list[int]]:
    """Recursive sorted listing of jpg/jpeg/png/gif and labels from sorted parent names (as official)."""
    files = []

    def walk(d: str) -> None:
        for entry in sorted(os.listdir(d)):
            full = os.path.join(d, entry)
            if "." in entry and entry.split(".")[-1].lower() in ("jpg", "jpeg", "png", "gif"):
                files.append(full)
            elif os.path.isdir(full):
                walk(full)

    walk(path)
    names = [Path(f).parent.name for f in files]
    index = {c: i for i, c in enumerate(sorted(set(names)))}
    return files, [index[c] for c in names]


class OfficialImageDataset(torch.utils.data.Dataset):
    """dataset.py ImageDataset(random_crop=False, random_flip=False): RGB, center crop, /255, CHW."""

    def __init__(self, files: list[str], labels: list[int], resolution: int):
        self.files, self.labels, self.resolution = files, labels, resolution

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from enat.vqgan import center_crop_arr

        im = Image.open(self.files[i])
        im.load()
        im = im.convert("RGB")
        arr = center_crop_arr(im, self.resolution).astype(np.float32) / 255.0
        return np.transpose(arr, [2, 0, 1]), np.array(self.labels[i], dtype=np.int64)


def run_official(data: Path, tok: object, resolution: int, workers: int, batch_size: int, device: str,
                 out: Path) -> dict:
    t0 = time.perf_counter()
    files, labels = list_official(str(data / "train"))
    loader = torch.utils.data.DataLoader(OfficialImageDataset(files, labels, resolution), batch_size=batch_size,
                                         shuffle=False, drop_last=False, num_workers=workers,
                                         pin_memory=device == "cuda", persistent_workers=workers > 0)
    tok = tok.to(device)
    feats, t_wait, t_encode, t_first, n_first = [], 0.0, 0.0, None, 0
    it = iter(loader)
    with torch.no_grad():
        while True:
            tw = time.perf_counter()
            try:
                img, label = next(it)
            except StopIteration:
                break
            te = time.perf_counter()
            t_wait += te - tw
            img = img.to(device)
            img = torch.cat([img, img.flip(dims=[-1])], dim=0)  # as official: train split with flips
            label = torch.cat([label, label], dim=0).numpy()
            codes = tok.encode(img).reshape(len(label), -1).cpu().numpy()
            feats.append(np.concatenate((label[:, None], codes), axis=-1))
            t_encode += time.perf_counter() - te
            if t_first is None:
                t_first, n_first = time.perf_counter(), len(label) // 2
    tw = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "train.npy", np.concatenate(feats))
    t_write = time.perf_counter() - tw
    total = time.perf_counter() - t0
    del it, loader
    steady = (len(files) - n_first) / (time.perf_counter() - t_first) if len(files) > n_first else None
    return {"images": len(files), "seconds": total, "images_per_s": len(files) / total, "steady_images_per_s": steady,
            "split_s": {"decode_wait": t_wait, "encode": t_encode, "write": t_write}}


# ---------------------------------------------------------------------------------------------------
# The Ray job


def run_ray(data: Path, weights: str | None, tokenizer: str, resolution: int, workers: int, batch_size: int,
            out: Path, args: argparse.Namespace) -> dict:
    import ray

    from pipeline.cluster import init_ray
    from pipeline.config import load_config
    from pipeline.tokenize import TokenizeJobConfig, run_tokenize

    per_shard = args.samples_per_shard
    cfg = load_config(TokenizeJobConfig, {
        "source": {"kind": "imagefolder", "root": str(data), "splits": ["train"]},
        "image": {"resolution": resolution},
        "tokenizer": {"kind": tokenizer, "weights": weights},
        "tokenize": {"samples_per_shard": per_shard, "batch_size": batch_size},
        "output": {"uri": str(out)},
        # CPU: one single-threaded encoder actor per worker CPU (data parallel over shards), decode
        # tasks in the remaining quarter; GPU: --actors x --actor-gpus
        "compute": {"workers": args.actors or (workers if not args.actor_gpus else 1),
                    "gpus_per_worker": args.actor_gpus, "cpus_per_worker": args.actor_cpus,
                    "decode_cpus": args.decode_cpus, "decode_on": args.decode_on, "progress": False},
        "mlflow": {"enabled": False},
        "ray": {"num_cpus": workers, "num_gpus": 1 if args.actor_gpus else None,
                "object_store_memory": args.object_store_mb * 2**20},
    })
    t0 = time.perf_counter()
    init_ray(cfg.ray, dashboard=False)  # as the tokenize job (run_job)
    t_init = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        summary = run_tokenize(cfg, log=lambda m: None)
        total = time.perf_counter() - t1
    finally:
        ray.shutdown()
    parts = [json.loads(Path(p).read_text()) for p in glob.glob(str(out / "train" / "_parts" / "*.json"))]
    busy = {k: sum(p["seconds"][k] for p in parts) for k in ("read", "decode", "encode", "write")}
    n = summary["splits"]["train"]["written"]
    return {"images": n, "seconds": total, "images_per_s": n / total, "ray_init_s": t_init,
            "images_per_s_incl_init": n / (total + t_init), "steady_images_per_s": summary.get("steady_per_s"),
            "busy_s": busy}


# ---------------------------------------------------------------------------------------------------


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CI smoke: 24 small images, 1 worker, 64 px")
    p.add_argument("--images", type=int, default=768)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="CPU counts to compare")
    p.add_argument("--tokenizer", choices=["patch", "vqgan"], default="patch")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="official approach's device")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per encoder forward (default 128; 8 for --tokenizer vqgan on CPU, where 128 "
                        "images + flips need ~40 GB of activations in the official model)")
    p.add_argument("--official", default=str(REPO / ".official"),
                   help="official ENAT checkout: with --tokenizer vqgan the official approach encodes with its "
                        "taming VQModel (same weights); without a checkout it uses ours")
    p.add_argument("--samples-per-shard", type=int, default=128)
    p.add_argument("--actors", type=int, default=0, help="encoder actors (0: one per worker on CPU, 1 on GPU)")
    p.add_argument("--actor-gpus", type=float, default=0.0)
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument("--decode-cpus", type=float, default=0.25)
    p.add_argument("--decode-on", choices=["auto", "tasks", "actors"], default="auto",
                   help="auto: in the encoder actors on CPU, CPU tasks feeding GPU actors")
    p.add_argument("--object-store-mb", type=int, default=400)
    p.add_argument("--data", help="an ImageNet-layout folder (with train/) instead of synthetic images")
    p.add_argument("--skip-official", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repetitions; the table shows medians")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 8 if args.tokenizer == "vqgan" and args.device == "cpu" else 128
    if args.tiny:
        args.images, args.resolution, args.workers, args.batch_size = 24, 64, [1], 8
        args.samples_per_shard = 8
    work = Path(tempfile.mkdtemp(prefix="tokbench-"))
    try:
        if args.data:
            data = Path(args.data)
        else:
            data = work / "data"
            t = time.perf_counter()
            make_images(data, args.images, classes=8, size_range=(60, 90) if args.tiny else (300, 520))
            print(f"generated {args.images} JPEGs in {time.perf_counter() - t:.1f} s", flush=True)
        weights, tok = make_tokenizer(args.tokenizer, args.resolution, work)
        if args.tokenizer == "vqgan" and args.official and (Path(args.official) / "taming").is_dir():
            tok = OfficialVQGAN(args.official, tok)  # the official approach runs the official model
        results = {"config": {k: v for k, v in vars(args).items()}, "torch_threads": torch.get_num_threads(),
                   "cpus": os.cpu_count(), "load_avg_start": os.getloadavg(), "runs": []}
        for rep in range(args.repeats):  # interleaved, so drifting load on a shared machine hits both
            for w in args.workers:
                r = run_ray(data, weights, args.tokenizer, args.resolution, w, args.batch_size,
                            work / f"ray-{w}-{rep}", args)
                results["runs"].append({"path": "ray", "workers": w, **r})
                print(f"ray      workers={w}: {r['images_per_s']:.1f} img/s end to end, steady "
                      f"{_fmt(r['steady_images_per_s'])} ({r['images']} images in {r['seconds']:.1f} s; "
                      f"+{r['ray_init_s']:.1f} s ray.init) busy s: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in r["busy_s"].items()), flush=True)
                if not args.skip_official:
                    o = run_official(data, tok, args.resolution, w, args.batch_size, args.device,
                                     work / f"official-{w}-{rep}")
                    results["runs"].append({"path": "official", "workers": w, **o})
                    print(f"official workers={w}: {o['images_per_s']:.1f} img/s end to end, steady "
                          f"{_fmt(o['steady_images_per_s'])} ({o['images']} images in {o['seconds']:.1f} s) "
                          f"split s: " + ", ".join(f"{k} {v:.1f}" for k, v in o["split_s"].items()), flush=True)
        results["load_avg_end"] = os.getloadavg()
        print(f"\nmedian of {args.repeats} run(s); load average {results['load_avg_start'][0]:.1f} → "
              f"{results['load_avg_end'][0]:.1f} on {os.cpu_count()} CPUs\n")
        print("| path | workers | img/s end to end | img/s steady | wall s | time split (s, summed over processes) |")
        print("|---|---|---|---|---|---|")
        summary = {}
        for path in ("ray", "official"):
            for w in args.workers:
                runs = [r for r in results["runs"] if r["path"] == path and r["workers"] == w]
                if not runs:
                    continue
                med = sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]
                steady = [r["steady_images_per_s"] for r in runs if r["steady_images_per_s"]]
                split = med.get("busy_s") or med.get("split_s")
                summary[f"{path}-{w}"] = {"images_per_s": float(np.median([r["images_per_s"] for r in runs])),
                                          "steady_images_per_s": float(np.median(steady)) if steady else None}
                extra = f" (+{med['ray_init_s']:.1f} ray.init)" if path == "ray" else ""
                print(f"| {'Ray job' if path == 'ray' else 'official approach'} | {w} | "
                      f"{summary[f'{path}-{w}']['images_per_s']:.1f} | {_fmt(summary[f'{path}-{w}']['steady_images_per_s'])} | "
                      f"{med['seconds']:.1f}{extra} | " + ", ".join(f"{k} {v:.1f}" for k, v in split.items()) + " |")
        results["summary"] = summary
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
