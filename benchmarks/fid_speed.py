"""FID cost on this machine: FIDInception images/s (plain / fused, fp32 / bf16 autocast) and the statistics.

    .venv/bin/python benchmarks/fid_speed.py            # batch 8, 50,000 x 2048 features, FD at D=2048
    .venv/bin/python benchmarks/fid_speed.py --tiny     # seconds-long smoke run
    .venv/bin/python benchmarks/fid_speed.py --device cuda

Random weights (the speed does not depend on them) and random 256x256 inputs (ENAT's resolution; the
resize to 299 is included). Prints figures only.
"""
from __future__ import annotations

import argparse
import copy
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


def network_rates(device: torch.device, batch: int, res: int, iters: int) -> dict[str, tuple[float, float, float]]:
    """{case: (median, best images/s, max relative pool3 difference to plain fp32)} over `iters` timed batches
    per case, the cases timed round-robin so that load from other work hits all alike. Cases: the network
    run module by module as pytorch-fid does ("plain"), and the default fused path (BN folded into the
    convolutions, channels-last), in fp32 and under bf16 autocast. The best is the figure least disturbed
    by other work on a shared machine."""
    plain = FIDInception(fused=False).to(device)
    fused = FIDInception().to(device)
    fused.load_state_dict(plain.state_dict())
    plain_bf16, fused_bf16 = copy.deepcopy(plain), copy.deepcopy(fused)
    plain_bf16.autocast_dtype = fused_bf16.autocast_dtype = torch.bfloat16
    nets = {"fp32 plain": plain, "fp32 fused": fused, "bf16 plain": plain_bf16, "bf16 fused": fused_bf16}
    x = torch.rand(batch, 3, res, res, device=device)
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad():
        ref = plain(x)[0]  # also the warm-up of the plain path
        err = {k: float((net(x)[0] - ref).abs().max() / ref.abs().max()) for k, net in nets.items()}  # warm-up
        for _ in range(iters):
            for k, net in nets.items():
                _sync(device)
                t = time.perf_counter()
                net(x)
                _sync(device)
                times[k].append(time.perf_counter() - t)
    return {k: (batch / statistics.median(v), batch / min(v), err[k]) for k, v in times.items()}


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
    rates = network_rates(device, args.batch, args.res, args.iters)
    for name, (med, best, err) in rates.items():
        print(f"FIDInception {name:<10}: {med:7.2f} images/s median, {best:7.2f} best of {args.iters} "
              f"(batch {args.batch}, {args.res}px -> 299); pool3 max rel diff to fp32 plain {err:.1e}")
    print(f"fused / plain: fp32 {rates['fp32 fused'][0] / rates['fp32 plain'][0]:.2f}x, "
          f"bf16 {rates['bf16 fused'][0] / rates['bf16 plain'][0]:.2f}x (medians)")
    r = stats_cost(device, args.n, args.dim, args.chunk)
    print(f"FeatureStats.update: {args.n} x {args.dim} in chunks of {args.chunk}: {r['update_s']:.2f} s "
          f"({args.n / r['update_s']:.0f} features/s)")
    print(f"mean_cov: {r['mean_cov_s']:.3f} s")
    print(f"frechet_distance sqrtm: {r['fd_sqrtm_s']:.2f} s (FD {r['fd_sqrtm']:.6f}); "
          f"eigvals: {r['fd_eigvals_s']:.2f} s (FD {r['fd_eigvals']:.6f})")


if __name__ == "__main__":
    main()
