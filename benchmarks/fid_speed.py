"""FID cost on this machine: FIDInception images/s (fp32, bf16 autocast) and the statistics reduction.

    .venv/bin/python benchmarks/fid_speed.py            # batch 8, 50,000 x 2048 features, FD at D=2048
    .venv/bin/python benchmarks/fid_speed.py --tiny     # seconds-long smoke run
    .venv/bin/python benchmarks/fid_speed.py --device cuda

Random weights (the speed does not depend on them) and random 256x256 inputs (ENAT's resolution; the
resize to 299 is included). Prints figures only.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from enat.fid import FeatureStats, frechet_distance  # noqa: E402
from enat.inception import FIDInception  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network_rate(device: torch.device, batch: int, res: int, iters: int, dtype) -> tuple[float, float]:
    """(median, best) images/s over `iters` timed batches; the best is the figure least disturbed by
    other work on a shared machine."""
    net = FIDInception(autocast_dtype=dtype).to(device)
    x = torch.rand(batch, 3, res, res, device=device)
    times = []
    with torch.no_grad():
        net(x)  # warm-up: oneDNN / cuDNN algorithm selection
        for _ in range(iters):
            _sync(device)
            t = time.perf_counter()
            net(x)
            _sync(device)
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times), batch / min(times)


def stats_cost(device: torch.device, n: int, dim: int, chunk: int) -> dict[str, float]:
    g = torch.Generator(device=device).manual_seed(0)
    # a few distinct chunks reused, so the RNG is not what is timed
    pool = [torch.rand(chunk, dim, generator=g, device=device) for _ in range(4)]
    stats = FeatureStats.empty(dim, device=device)
    _sync(device)
    t = time.perf_counter()
    for i in range(n // chunk):
        stats.update(pool[i % len(pool)])
    _sync(device)
    out = {"update_s": time.perf_counter() - t}
    t = time.perf_counter()
    mu, sigma = stats.mean_cov()
    out["mean_cov_s"] = time.perf_counter() - t
    mu2, sigma2 = mu + 0.01, sigma * 1.01
    for method in ("sqrtm", "eigvals"):
        t = time.perf_counter()
        out[f"fd_{method}"] = frechet_distance(mu, sigma, mu2, sigma2, method=method)
        out[f"fd_{method}_s"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="batch 2, 2 iterations, 2,000 x 256 features")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--chunk", type=int, default=500)
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.iters, args.n, args.dim = 2, 2, 2_000, 256
    device = torch.device(args.device)

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        med, best = network_rate(device, args.batch, args.res, args.iters, dtype)
        print(f"FIDInception {name}: {med:.2f} images/s median, {best:.2f} best of {args.iters} "
              f"(batch {args.batch}, {args.res}px -> 299)")
    r = stats_cost(device, args.n, args.dim, args.chunk)
    print(f"FeatureStats.update: {args.n} x {args.dim} in chunks of {args.chunk}: {r['update_s']:.2f} s "
          f"({args.n / r['update_s']:.0f} features/s)")
    print(f"mean_cov: {r['mean_cov_s']:.3f} s")
    print(f"frechet_distance sqrtm: {r['fd_sqrtm_s']:.2f} s (FD {r['fd_sqrtm']:.6f}); "
          f"eigvals: {r['fd_eigvals_s']:.2f} s (FD {r['fd_eigvals']:.6f})")


if __name__ == "__main__":
    main()
