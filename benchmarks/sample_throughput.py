"""Sample job throughput: end-to-end samples/s of one worker (generate → decode → Inception → write) and
how the time splits, plus the cost of merging FID statistics of 50,000 × 2048 features.

    .venv/bin/python benchmarks/sample_throughput.py             # ENAT-S, batch 16, 8 steps, MAGE VQGAN, 256 px
    .venv/bin/python benchmarks/sample_throughput.py --tiny      # seconds-long smoke run (tiny models)
    .venv/bin/python benchmarks/sample_throughput.py --device cuda --preset enat-l --batch 125 --samples 2000 \\
        --precision bf16 --decode-precision bf16 --inception-precision bf16

Beside the official evaluation loop (same weights, alternating batch by batch): benchmarks/sample_vs_official.py.

Random weights everywhere (speed does not depend on them): ENAT of the preset, the MAGE f16 VQGAN,
pytorch-fid's Inception architecture. The worker is the job's own `UnitRunner` writing PNG tars, npz and
statistics to a local temporary folder; one unit is run first as a warm-up. Prints figures only.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import enat  # noqa: E402
from enat import FeatureStats, FIDInception, ISStats  # noqa: E402
from pipeline import sample, storage  # noqa: E402
from pipeline.commits import sha256  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    if args.tiny:
        from enat.patch_vq import PatchVQ

        mcfg = enat.ENATConfig(2, 1, 64, 4, codebook_size=64, num_classes=10, seq_len=16)
        tok = PatchVQ(64, 8, codebook=torch.rand(64, 192))
    else:
        from enat.vqgan import VQGAN

        mcfg = enat.ENATConfig.preset(args.preset)
        tok = VQGAN("mage-f16")
    model = enat.ENAT(mcfg).eval().to(device)
    tok = tok.to(device)
    inc_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.inception_precision]
    inception = FIDInception(autocast_dtype=inc_dtype).to(device)
    sampler = sample.SamplerSection(steps=args.steps, precision=args.precision, compile=args.compile).resolve()
    n = args.samples
    labels = np.arange(n) % mcfg.num_classes  # every class in turn
    out = tempfile.mkdtemp(prefix="enat-sample-bench-")
    runner = sample.UnitRunner(model, tok, inception, sampler, out, batch_size=args.batch, is_total=n + args.batch,
                               is_splits=10, output=sample.OutputSection(uri=out, grid=0),
                               decode_precision=args.decode_precision, png_threads=args.png_threads)
    # warm-up unit (one batch): kernels, allocator, oneDNN / cuDNN algorithm selection
    warm = sample.make_units(args.batch, args.batch, 0, labels[:args.batch])[0]
    runner.run(sample.Unit(10_000, n, warm.count, warm.seed, warm.labels), "warm-up")
    units = sample.make_units(n, args.unit, 0, labels)
    t = time.perf_counter()
    secs = {"generate": 0.0, "decode": 0.0, "inception": 0.0, "write": 0.0}
    for u in units:
        rec = runner.run(u, "bench")
        for k in secs:
            secs[k] += rec["seconds"][k]
    wall = time.perf_counter() - t
    total = sum(secs.values())
    def du(sub: str) -> int:  # bytes of the timed units' files (not the warm-up unit's)
        return sum(f.stat().st_size for f in (Path(out) / sub).rglob("*") if f.is_file() and "010000" not in f.name)

    res = mcfg.grid * int(tok.downsample)
    print(f"device {device}, threads {torch.get_num_threads()}, model "
          f"{'tiny' if args.tiny else args.preset} ({mcfg.depth} blocks, dim {mcfg.dim}), {args.steps} steps, "
          f"sampler precision {args.precision}, decode precision {args.decode_precision}, inception precision "
          f"{args.inception_precision}, {res} px, "
          f"batch {args.batch}, unit {args.unit}, {n} samples")
    print(f"end to end: {n / wall:.3f} samples/s ({wall:.1f} s for {n}; {wall / n * 1000:.0f} ms/sample)")
    for k, v in secs.items():
        print(f"  {k:<10} {v:8.2f} s  {100 * v / total:5.1f} %  {v / n * 1000:8.1f} ms/sample")
    print(f"  output: {du('images') / n / 1024:.1f} KiB/sample PNG tar, {du('npz') / n / 1024:.1f} KiB/sample npz, "
          f"{du('stats') / len(units) / 2**20:.1f} MiB statistics per unit")
    if not args.tiny:
        print(f"  50,000 samples on one such worker: {50_000 / (n / wall) / 3600:.1f} h")
    shutil.rmtree(out, ignore_errors=True)
    return {k: v / n for k, v in secs.items()}


def merge_cost(args: argparse.Namespace, device: torch.device) -> dict:
    """Statistics of n × 2048 features in units: accumulation in the workers, then the driver's exact merge
    (read each unit's 32 MB file back from disk, check its sha256, sum), mean/cov and FID."""
    n, unit, dim = (2_000, 500, 2048) if args.tiny else (50_000, 1000, 2048)
    g = torch.Generator(device=device).manual_seed(0)
    pool = [torch.randn(unit, dim, generator=g, device=device).abs_() for _ in range(2)]
    logits = torch.randn(unit, 1008, generator=g, device=device)
    d = tempfile.mkdtemp(prefix="enat-merge-bench-")
    fs, path = storage.filesystem(d)
    recs = []
    t_update = t_write = 0.0
    for u in range(n // unit):
        _sync(device)
        t = time.perf_counter()
        f = FeatureStats.empty(dim, device).update(pool[u % 2])
        s = ISStats.empty(n, 10, device=device).update(logits, u * unit)
        _sync(device)
        t_update += time.perf_counter() - t
        t = time.perf_counter()
        data = sample.stats_npz_bytes(f, s)
        storage.put_atomic(fs, f"{path}/stats/{u:06d}.npz", data)
        t_write += time.perf_counter() - t
        recs.append({"unit": u, "files": {f"stats/{u:06d}.npz": {"sha256": sha256(data)}}})
    t = time.perf_counter()
    feats, is_stats = sample.merge_stats(sample.read_unit_stats(fs, path, recs))
    t_merge = time.perf_counter() - t
    t = time.perf_counter()
    mu, sigma = feats.mean_cov()
    t_cov = time.perf_counter() - t
    t = time.perf_counter()
    is_stats.score()
    t_is = time.perf_counter() - t
    t = time.perf_counter()
    fid = enat.frechet_distance(mu, sigma, mu + 0.01, sigma * 1.01, method="eigvals")
    t_fid = time.perf_counter() - t
    print(f"statistics of {n:,} x {dim} features in {n // unit} units of {unit} ({device}):")
    print(f"  accumulate in the workers (float64 Σx, Σxxᵀ + IS)  {t_update:7.2f} s in all "
          f"({t_update / (n // unit) * 1000:.0f} ms per unit, {t_update / n * 1e6:.0f} µs/sample)")
    print(f"  serialize + write the unit files (32 MB each)     {t_write:7.2f} s in all")
    print(f"  driver: read {n // unit} files + sha256 + exact sum     {t_merge:7.2f} s")
    print(f"  driver: mean / covariance                        {t_cov:7.2f} s")
    print(f"  driver: IS from the partials                     {t_is:7.2f} s")
    print(f"  driver: FID (eigvals, float64, D=2048)           {t_fid:7.2f} s  (fid {fid:.4f})")
    shutil.rmtree(d, ignore_errors=True)
    return {"merge_s": t_merge + t_cov + t_is, "fid_s": t_fid}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        models = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        return f"{len(models)}x {models[0]}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
    except (OSError, IndexError):
        return f"cpu ({os.cpu_count()} CPUs)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny models and sizes: a smoke run of a few seconds")
    p.add_argument("--device", default="cpu")
    p.add_argument("--preset", default="enat-s")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--samples", type=int, default=32, help="timed samples (after a one-batch warm-up)")
    p.add_argument("--unit", type=int, default=None, help="unit size (default: all timed samples in one unit)")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="sampler.precision")
    p.add_argument("--decode-precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="tokenizer.precision")
    p.add_argument("--inception-precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="inception.precision")
    p.add_argument("--png-threads", type=int, default=4)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--json", help="also write the per-stage rates here, for benchmarks/fid50k_time.py")
    args = p.parse_args()
    if args.tiny:
        args.batch, args.samples = min(args.batch, 8), min(args.samples, 16)
    args.unit = args.unit or args.samples
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"host: {os.cpu_count()} CPUs visible; figures on a shared machine vary with its load")
    per_sample = throughput(args, device)
    rates = {"label": f"ours, {args.preset if not args.tiny else 'tiny'}, sampler {args.precision}, decode "
                      f"{args.decode_precision}, inception {args.inception_precision}",
             "device": device_name(device), "date": time.strftime("%Y-%m-%d"),
             "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]), "batch": args.batch,
             "per_sample_s": per_sample, "startup_s": None, "merge_s": None, "fid_s": None, "measured": True}
    if not args.skip_merge:
        rates.update(merge_cost(args, device))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rates, indent=1))
        print(f"rates written to {args.json} (python benchmarks/fid50k_time.py {args.json})")


if __name__ == "__main__":
    main()
