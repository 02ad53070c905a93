"""The whole pipeline end to end on embedded defaults: ``enat demo [--size tiny|small|medium]``.

Nothing to set up: a local Ray started by the job on 127.0.0.1, a local folder as the object store
(``--store s3://bucket/prefix`` with ``storage.endpoint_url`` for an S3 API), a local MLflow store.

1. data: scikit-learn's handwritten digits (1,797 real scans, 10 classes) upscaled and written as an
   ImageNet-layout class folder, plus a COCO-format captions file ("a handwritten digit seven"), with a
   few broken files mixed in;
2. tokenize both with the patch k-means tokenizer through the Ray tokenization job;
3. train a small class-conditional ENAT with the Ray Train + DeepSpeed job (CPU workers), then a short
   text-conditional run on the captions;
4. sample with the Ray sampling job and score: FID when Inception weights are given
   (``--inception pt_inception-2015-12-05-6726825d.pth``), and offline how often a small classifier
   trained on the real digits recognises the requested class in the samples (vs the untrained model);
5. print where everything is: the MLflow UI command, the runs, the sample grid, the figures.
One MLflow experiment (``enat-demo``), one run per stage.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import Image

SIZES: dict[str, dict[str, Any]] = {
    # images per class (≤ ~180), train steps (class / text), model width and depth, workers, samples
    "tiny": dict(per_class=60, steps=150, text_steps=20, dim=96, depth=3, batch=64, workers=1, samples=100),
    "small": dict(per_class=180, steps=600, text_steps=60, dim=128, depth=4, batch=64, workers=1, samples=200),
    "medium": dict(per_class=180, steps=4000, text_steps=400, dim=256, depth=6, batch=128, workers=2, samples=1000),
}
RES, PATCH, CODEBOOK = 32, 4, 64            # 32 px digits -> 8 x 8 = 64 tokens of a 64-entry codebook
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _log(msg: str) -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------
# 1. data
# ----------------------------------------------------------------------------------------------------

def digits(per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Real handwritten digits from scikit-learn as uint8 RGB (N, 32, 32, 3) and labels (N,)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    keep = np.concatenate([np.flatnonzero(d.target == c)[:per_class] for c in range(10)])
    imgs = (255 - d.images[keep] * (255 / 16)).clip(0, 255).astype(np.uint8)        # dark ink on white
    big = np.stack([np.asarray(Image.fromarray(a).resize((RES, RES), Image.BICUBIC)) for a in imgs])
    return np.repeat(big[..., None], 3, axis=-1), d.target[keep]


def write_data(root: Path, per_class: int) -> dict[str, Any]:
    """ImageNet-layout folder + COCO captions, each with broken inputs; returns what was written."""
    imgs, labels = digits(per_class)
    inet = root / "imagenet" / "train"
    coco = root / "coco"
    (coco / "annotations").mkdir(parents=True, exist_ok=True)
    (coco / "train2014").mkdir(parents=True, exist_ok=True)
    images, anns = [], []
    for i, (a, y) in enumerate(zip(imgs, labels)):
        d = inet / f"digit_{y}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(a).save(d / f"{i:05d}.png")
        name = f"COCO_train2014_{i:012d}.png"
        Image.fromarray(a).save(coco / "train2014" / name)
        images.append({"id": i, "file_name": name, "width": RES, "height": RES})
        anns.append({"id": 2 * i, "image_id": i, "caption": f"a handwritten digit {WORDS[y]}"})
        anns.append({"id": 2 * i + 1, "image_id": i, "caption": f"the number {y} written by hand"})
    broken = {"digit_3/broken_zero_bytes.png": b"", "digit_5/broken_not_an_image.png": b"hello, not a png",
              "digit_7/broken_truncated.png": _png(imgs[0])[:60]}
    for rel, data in broken.items():
        (inet / rel).write_bytes(data)
    Image.fromarray(imgs[1]).resize((4, 4)).save(inet / "digit_1" / "broken_tiny.png")
    Image.fromarray(imgs[2]).convert("CMYK").save(inet / "digit_2" / "converted_cmyk.jpg")   # converted, kept
    # COCO: an image without a caption, and a caption pointing to a missing image
    Image.fromarray(imgs[3]).save(coco / "train2014" / "COCO_train2014_999999999999.png")
    images.append({"id": 10 ** 6, "file_name": "COCO_train2014_999999999999.png", "width": RES, "height": RES})
    anns.append({"id": 10 ** 7, "image_id": 10 ** 6 + 1, "caption": "points to a missing image"})
    (coco / "annotations" / "captions_train2014.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return {"good": len(imgs) + 1, "broken": len(broken) + 1, "labels": labels}


def _png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------
# the demo
# ----------------------------------------------------------------------------------------------------

def run(out: Path, size: str = "small", store: Optional[str] = None, inception: Optional[str] = None,
        endpoint_url: Optional[str] = None, seed: int = 0) -> dict[str, Any]:
    from enat.patch_vq import PatchVQ
    from jobs import tokenize as tokenize_job
    from jobs import train as train_job
    from pipeline import storage
    from pipeline.tokenize import init_ray

    s = SIZES[size]
    t0 = time.time()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = store or str(out / "store")
    stor = [f"storage.endpoint_url={endpoint_url}"] if endpoint_url else []
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = tracking
    report: dict[str, Any] = {"out": str(out), "store": store, "tracking_uri": tracking}

    _log(f"[demo 1/5] data: real handwritten digits -> {out / 'data'}")
    data = write_data(out / "data", s["per_class"])
    report["data"] = {k: v for k, v in data.items() if k != "labels"}

    _log("[demo 2/5] tokenizer: fitting patch k-means on the digits, then the Ray tokenization job")
    imgs, _ = digits(s["per_class"])
    tok = PatchVQ.fit(torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255, codebook_size=CODEBOOK,
                      patch=PATCH, iters=10, seed=seed)
    fs, path = storage.filesystem(store, _storage(endpoint_url))
    buf = io.BytesIO()
    torch.save(tok.state_dict(), buf)
    storage.put_atomic(fs, f"{path}/tokenizer/patch_vq.pt", buf.getvalue())
    tok_uri = storage.join(store, "tokenizer", "patch_vq.pt")
    from pipeline.config import RayConfig
    started = init_ray(RayConfig(num_cpus=max(2, os.cpu_count() or 2)))
    try:
        common = [f"tokenizer.kind=patch", f"tokenizer.weights={tok_uri}", f"image.resolution={RES}",
                  "tokenize.samples_per_shard=250", "tokenize.batch_size=256", *stor]
        summary = tokenize_job.main([f"source.root={out / 'data' / 'imagenet'}", "source.kind=imagefolder",
                                     f"tokenize.out={storage.join(store, 'tokens', 'digits')}", *common])
        text_summary = tokenize_job.main([f"source.root={out / 'data' / 'coco'}", "source.kind=coco",
                                          "source.splits=[train2014]", "text.kind=random", "text.dim=32",
                                          "text.length=8", "tokenize.flips=none",
                                          f"tokenize.out={storage.join(store, 'tokens', 'captions')}", *common])
        report["tokenize"] = {"digits": summary["splits"]["train"], "captions": text_summary["splits"]["train2014"]}
        _log_stage_run("tokenize", report["tokenize"], tracking)

        _log(f"[demo 3/5] training: Ray Train + DeepSpeed ({s['workers']} CPU worker(s)), {s['steps']} steps")
        model = [f"model.dim={s['dim']}", f"model.encoder_depth={s['depth']}", "model.decoder_depth=1",
                 "model.num_heads=4", "model.preset=enat-s"]
        train_common = [*model, "deepspeed.precision=fp32", f"scaling.num_workers={s['workers']}",
                        f"train.global_batch={s['batch']}", "optim.lr=0.001", "optim.warmup_steps=50",
                        "optim.betas=[0.9, 0.99]", "train.ema_rate=0.995", f"train.log_every={max(1, s['steps'] // 20)}",
                        "mlflow.experiment=enat-demo", f"mlflow.tracking_uri={tracking}", "mlflow.system_metrics=true",
                        f"checkpoint.uri={storage.join(store, 'checkpoints')}", *stor]
        res = train_job.main([f"data.root={storage.join(store, 'tokens', 'digits')}", f"train.steps={s['steps']}",
                              "train.run_name=demo-class", f"checkpoint.every={s['steps']}", *train_common])
        report["train"] = {"checkpoint": str(res.checkpoint.path) if res.checkpoint else None}
        res_t = train_job.main([f"data.root={storage.join(store, 'tokens', 'captions')}",
                                f"train.steps={s['text_steps']}", "train.run_name=demo-text",
                                f"checkpoint.every={s['text_steps']}", *train_common])
        report["train_text"] = {"checkpoint": str(res_t.checkpoint.path) if res_t.checkpoint else None}
    finally:
        if started:
            import ray
            ray.shutdown()
    report["seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _storage(endpoint_url: Optional[str]):
    from pipeline.config import StorageConfig
    return StorageConfig(endpoint_url=endpoint_url)


def _log_stage_run(name: str, metrics: dict, tracking: str) -> None:
    """One MLflow run per stage: the tokenize summary as metrics."""
    import mlflow
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("enat-demo")
    with mlflow.start_run(run_name=f"demo-{name}"):
        flat = {}
        for ds, m in metrics.items():
            for k in ("read", "written", "converted", "rejected"):
                if k in m:
                    flat[f"{ds}.{k}"] = float(m[k])
        mlflow.log_metrics(flat)
        mlflow.log_dict(metrics, f"{name}_summary.json")


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="enat demo", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="scale of the demo (default small)")
    ap.add_argument("--store", help="object store URL for data, tokens, checkpoints (default: <out>/store)")
    ap.add_argument("--endpoint-url", help="S3-compatible endpoint for --store s3://...")
    ap.add_argument("--inception", help="pytorch-fid Inception weights (pt_inception-2015-12-05-6726825d.pth) for FID")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    return run(Path(a.out), a.size, a.store, a.inception, a.endpoint_url, a.seed)


if __name__ == "__main__":
    main()
