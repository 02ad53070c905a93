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
    "tiny": dict(per_class=100, steps=500, text_steps=20, dim=96, depth=3, batch=32, workers=1, samples=100),
    "small": dict(per_class=180, steps=1500, text_steps=60, dim=128, depth=4, batch=64, workers=1, samples=200),
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
    from jobs import sample as sample_job
    from jobs import tokenize as tokenize_job
    from jobs import train as train_job
    from pipeline import storage
    from pipeline.cluster import init_ray

    s = SIZES[size]
    t0 = time.time()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    store = store or str(out / "store")
    stor = [f"storage.endpoint_url={endpoint_url}"] if endpoint_url else []
    tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{out / 'mlflow.db'}"
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
    from pipeline.sections import RayConfig
    started = init_ray(RayConfig(num_cpus=max(2, os.cpu_count() or 2)))
    try:
        common = ["tokenizer.kind=patch", f"tokenizer.weights={tok_uri}", f"image.resolution={RES}",
                  "tokenize.samples_per_shard=250", "tokenize.batch_size=256", f"mlflow.tracking_uri={tracking}",
                  "mlflow.experiment=enat-demo", *stor]
        summary = tokenize_job.main([f"source.root={out / 'data' / 'imagenet'}", "source.kind=imagefolder",
                                     f"output.uri={storage.join(store, 'tokens', 'digits')}",
                                     "mlflow.run_name=demo-tokenize", *common])
        text_summary = tokenize_job.main([f"source.root={out / 'data' / 'coco'}", "source.kind=coco",
                                          "source.splits=[train2014]", "text.kind=random", "text.dim=32",
                                          "text.length=8", "tokenize.flips=none",
                                          f"output.uri={storage.join(store, 'tokens', 'captions')}",
                                          "mlflow.run_name=demo-tokenize-captions", *common])
        report["tokenize"] = {"digits": summary["splits"]["train"], "captions": text_summary["splits"]["train2014"]}

        _log(f"[demo 3/5] training: Ray Train + DeepSpeed ({s['workers']} CPU worker(s)), {s['steps']} steps")
        model = [f"model.dim={s['dim']}", f"model.encoder_depth={s['depth']}", "model.decoder_depth=1",
                 "model.num_heads=4", "model.preset=enat-s"]
        train_common = [*model, "deepspeed.precision=fp32", f"compute.workers={s['workers']}",
                        f"train.global_batch={s['batch']}", "optim.lr=0.002", "optim.warmup_steps=50",
                        "optim.betas=[0.9, 0.99]", "train.ema_rate=0.995", f"train.log_every={max(1, s['steps'] // 20)}",
                        "mlflow.experiment=enat-demo", f"mlflow.tracking_uri={tracking}", "mlflow.system_metrics=true",
                        f"output.uri={storage.join(store, 'checkpoints')}", *stor]
        res = train_job.main([f"data.root={storage.join(store, 'tokens', 'digits')}", f"train.steps={s['steps']}",
                              "train.run_name=demo-class", f"output.checkpoint_every={s['steps']}",
                              "mlflow.aliases=[candidate]", *train_common])
        report["train"] = {"checkpoint": res.checkpoint}
        res_t = train_job.main([f"data.root={storage.join(store, 'tokens', 'captions')}", "data.split=train2014",
                                "data.flip=none",
                                f"train.steps={s['text_steps']}", "train.run_name=demo-text",
                                f"output.checkpoint_every={s['text_steps']}", *train_common])
        report["train_text"] = {"checkpoint": res_t.checkpoint}
        train_run = _run_id(tracking, "demo-class")

        _log(f"[demo 4/5] sampling {s['samples']} digits with the Ray sampling job"
             + ("" if inception else " (no Inception weights given: FID is reported as unavailable)"))
        # the version training registered (models:/demo-class@candidate): the sampling run becomes a child
        # of the training run, and its FID lands on the training run at the checkpoint's step
        sample_args = ["model.checkpoint=models:/demo-class@candidate", "tokenizer.kind=patch", f"tokenizer.weights={tok_uri}",
                       f"plan.num_samples={s['samples']}", "plan.unit_size=50", "plan.batch_size=50",
                       # the paper's guidance with milder temperatures for a 64-entry codebook
                       "sampler.cfg_scale=2.5", "sampler.mask_temp=1.0", "sampler.sample_temp=1.0",
                       f"output.uri={storage.join(store, 'samples')}", "output.grid=50",
                       f"mlflow.tracking_uri={tracking}", "mlflow.run_name=demo-sample", *stor]
        if inception:
            sample_args += [f"inception.weights={inception}",
                            f"fid.reference_images.root={out / 'data' / 'imagenet'}",
                            f"fid.reference_images.resolution={RES}"]
        results = sample_job.main(sample_args)
        report["sample"] = {k: results.get(k) for k in ("fid", "is", "num_samples", "samples_per_s")}

        _log("[demo 5/5] offline score: a classifier trained on the real digits checks the requested class")
        report["offline"] = offline_score(fs, storage.filesystem(storage.join(store, "samples"),
                                                                  _storage(endpoint_url))[1], s, seed, tok)
        grid_local = out / "samples.png"
        grid_local.write_bytes(fs.cat_file(storage.filesystem(storage.join(store, "samples", "grid.png"),
                                                              _storage(endpoint_url))[1]))
        report["grid"] = str(grid_local)
        _log_offline(report["offline"], tracking, train_run)
    finally:
        if started:
            import ray
            ray.shutdown()
    report["seconds"] = round(time.time() - t0, 1)
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    _print_summary(report)
    return report


def offline_score(fs, samples_path: str, s: dict, seed: int, tok) -> dict[str, float]:
    """How often a small CNN trained on the real digits recognises the requested class: in the job's
    samples, in samples of the untrained model (same size, same sampler) and on held-out real digits."""
    import enat
    from jobs.core_demo import class_accuracy, train_classifier
    imgs, labels = digits(180)
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels).long()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    test, train = perm[:300], perm[300:]
    clf = train_classifier(x[train], y[train], steps=400, seed=seed)
    arrs, labs = [], []
    for p in sorted(fs.glob(f"{samples_path}/npz/*.npz")):
        with np.load(io.BytesIO(fs.cat_file(p))) as z:
            arrs.append(z["arr_0"])
            labs.append(z["arr_1"])
    sx = torch.from_numpy(np.concatenate(arrs)).permute(0, 3, 1, 2).float() / 255
    sy = torch.from_numpy(np.concatenate(labs)).long()
    cfg = enat.ENATConfig(s["depth"], 1, s["dim"], 4, seq_len=(RES // PATCH) ** 2, codebook_size=CODEBOOK,
                          num_classes=10)
    torch.manual_seed(seed)
    untrained = enat.ENAT(cfg).eval()
    toks = enat.generate(untrained, sy, enat.SamplerConfig(cfg_scale=2.5, mask_temp=1.0, sample_temp=1.0),
                         generator=torch.Generator().manual_seed(seed))
    ux = tok.decode(toks.view(-1, RES // PATCH, RES // PATCH))
    return {"class_acc_samples": class_accuracy(clf, sx, sy), "class_acc_untrained": class_accuracy(clf, ux, sy),
            "class_acc_real_heldout": class_accuracy(clf, x[test], y[test]), "num_samples": int(len(sy))}


def _run_id(tracking: str, run_name: str) -> Optional[str]:
    import mlflow
    client = mlflow.MlflowClient(tracking)
    exp = client.get_experiment_by_name("enat-demo")
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], f"tags.enat_run_name = '{run_name}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def _log_offline(metrics: dict, tracking: str, train_run: Optional[str]) -> None:
    import mlflow
    mlflow.set_tracking_uri(tracking)
    mlflow.set_experiment("enat-demo")
    with mlflow.start_run(run_name="demo-offline-score", parent_run_id=train_run):
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})


def _print_summary(r: dict) -> None:
    db = r["tracking_uri"]
    off = r.get("offline", {})
    fid = (r.get("sample") or {}).get("fid")
    lines = [
        "", "=" * 78, "ENAT demo finished in %.0f s" % r["seconds"],
        f"  data & tokens:   {r['store']}",
        f"  tokenize:        {r['tokenize']['digits']['written']} digits written, "
        f"{r['tokenize']['digits']['rejected']} rejected {r['tokenize']['digits'].get('rejected_by_reason', '')}, "
        f"{r['tokenize']['digits']['converted']} converted",
        f"  checkpoint:      {r['train']['checkpoint']}",
        f"  sample grid:     {r.get('grid')}",
        f"  FID:             {'%.2f' % fid if fid is not None else 'unavailable (pass --inception pt_inception-2015-12-05-6726825d.pth)'}",
    ]
    if off:
        lines.append(f"  offline score:   {100 * off['class_acc_samples']:.0f}% of samples show the requested digit "
                     f"(untrained model {100 * off['class_acc_untrained']:.0f}%, real held-out "
                     f"{100 * off['class_acc_real_heldout']:.0f}%)")
    if db.startswith("sqlite:///"):
        lines.append(f"  MLflow UI:       mlflow ui --backend-store-uri {db}   (experiment enat-demo)")
    else:
        lines.append(f"  MLflow:          {db} (experiment enat-demo)")
    lines.append("=" * 78)
    _log("\n".join(lines))


def _storage(endpoint_url: Optional[str]):
    from pipeline.sections import StorageConfig
    return StorageConfig(endpoint_url=endpoint_url)


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
