"""What this machine allows: upper bounds on the sampler and VQGAN-encode ratios against the official code.

    python benchmarks/cpu_bounds.py --official /path/to/LeapLabTHU-ENAT-checkout

Three figures, each measured here, and the bound that follows from them by arithmetic:
1. the machine's fp32 GEMM rate (a 2048² matmul, the torch threads in use): the most any GEMM can reach;
2. the sampler's GEMM work, counted with torch.utils.flop_counter (ENAT-S, batch 16, 8 steps, guidance, as
   benchmarks/vs_official.py runs it) for ours and for the official sampler. Ours can never take less
   than its GEMM FLOPs / the peak rate, so official time / that is the best ratio possible even if every
   other op were free (the official sampler is timed here, best of 2 after a warm-up);
3. the official VQGAN encoder's time (batch 4, 256 px, as it runs by default) and the time of its
   convolutions alone (torch profiler) at their fastest, with freed memory kept in the process as our CPU
   workers do. Codes bit-identical to the official ones pin the same convolution kernels on the same data
   layout, so ours can at best drop everything else: official time / convolution time is the ceiling.
Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import enat  # noqa: E402
from benchmarks.official import load_official, official_args  # noqa: E402


def gemm_peak(n: int = 2048, repeat: int = 5) -> float:
    """Best GFLOP/s of an n x n x n fp32 matmul over `repeat` calls."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def sampler_flops(official: str | None, batch: int = 16, steps: int = 8) -> dict[str, float]:
    """GFLOP of ours (and the official sampler's) per batch, by aten op."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    cfg = enat.ENATConfig.preset("enat-s")
    model = enat.ENAT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    labels = torch.arange(batch) % cfg.num_classes
    s = enat.SamplerConfig.preset("imagenet-256")
    sc = enat.SamplerConfig(steps=steps, cfg_scale=s.cfg_scale, mask_temp=s.mask_temp, sample_temp=s.sample_temp)
    out = {}
    enat.layers.set_cpu_gemm("default")   # the counter sees aten matmuls, not oneDNN's opaque op: same FLOPs
    try:
        with FlopCounterMode(display=False) as fc:
            enat.generate(model, labels, sc, generator=torch.Generator().manual_seed(0))
    finally:
        enat.layers.set_cpu_gemm("onednn")
    out["ours"] = fc.get_total_flops() / 1e9
    if official:
        off = load_official(official)
        a = official_args(cfg.encoder_depth, cfg.decoder_depth, cfg.dim, cfg.num_heads, seq_len=cfg.seq_len,
                          cfg_scale=s.cfg_scale, mask_temp=s.mask_temp, samp_temp=s.sample_temp)
        net = off.models.DiT(input_size=cfg.grid, num_classes=cfg.num_classes, hidden_size=cfg.dim,
                             num_heads=cfg.num_heads, args=a, codebook_size=cfg.codebook_size)
        net.load_state_dict(model.state_dict())
        net.eval()
        sched = off.nat_misc.NATSchedule(codebook_size=cfg.codebook_size, device=torch.device("cpu"), args=a)
        with torch.no_grad(), FlopCounterMode(display=False) as fc2:
            sched.generate(steps, batch, net, lambda z: z, latent_size=cfg.grid, context=labels)
        out["official"] = fc2.get_total_flops() / 1e9
        with torch.no_grad():
            times = []
            for _ in range(3):   # the first call warms up
                t = time.perf_counter()
                sched.generate(steps, batch, net, lambda z: z, latent_size=cfg.grid, context=labels)
                times.append(time.perf_counter() - t)
        out["official_s"] = min(times[1:])
    return out


def encode_conv_bound(official: str, repeat: int = 3) -> tuple[float, float, float]:
    """(best seconds of the official VQGAN encoder as it runs by default, then with freed memory kept in
    the process, and best seconds of its convolutions alone with freed memory kept), batch 4 at 256 px
    (the latter two from the profiler's self times). Call last: it turns on
    pipeline.cluster.keep_freed_memory for the whole process, as our CPU workers do."""
    from torch.profiler import profile

    from benchmarks.vqgan_speed import official_vqmodel
    from enat.vqgan import VQGANConfig
    from pipeline.cluster import keep_freed_memory

    torch.manual_seed(0)
    model = official_vqmodel(official, VQGANConfig.preset("mage-f16")).eval()
    x = torch.rand(4, 3, 256, 256)
    total, kept, conv = float("inf"), float("inf"), float("inf")
    with torch.no_grad():
        model.encode(x)
        for _ in range(repeat):
            t = time.perf_counter()
            model.encode(x)
            total = min(total, time.perf_counter() - t)
        keep_freed_memory()  # the convolutions at their fastest: no output page-faults in
        model.encode(x)
        for _ in range(repeat):
            with profile() as p:
                model.encode(x)
            ops = p.key_averages()
            kept = min(kept, sum(e.self_cpu_time_total for e in ops) / 1e6)
            conv = min(conv, sum(e.self_cpu_time_total for e in ops
                                 if "convolution" in e.key or "conv2d" in e.key) / 1e6)
    return total, kept, conv


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", help="path to a LeapLabTHU/ENAT checkout")
    ap.add_argument("--tiny", action="store_true", help="only the GEMM peak (a smoke run)")
    args = ap.parse_args(argv)
    peak = gemm_peak()
    print(f"fp32 GEMM peak (2048^3 matmul, {torch.get_num_threads()} threads): {peak:.0f} GFLOP/s")
    if args.tiny:
        return
    flops = sampler_flops(args.official)
    floor = flops["ours"] / peak
    print(f"sampler GEMM work, ENAT-S batch 16, 8 steps: ours {flops['ours']:.1f} GFLOP"
          + (f", official {flops['official']:.1f} GFLOP" if "official" in flops else ""))
    print(f"ours cannot take less than {floor:.2f} s per batch on this machine (GEMMs alone at the peak rate)")
    if args.official:
        t_off = flops["official_s"]
        print(f"official sampler, best of 2 after a warm-up: {t_off:.2f} s per batch")
        print(f"=> sampler ratio ceiling: {t_off:.2f} / {floor:.2f} = {t_off / floor:.2f}x "
              f"(every non-GEMM op free, every GEMM at the peak)")
        total, kept, conv = encode_conv_bound(args.official)
        print(f"official VQGAN encode (batch 4, 256 px): {total:.2f} s as it runs; with freed memory kept "
              f"{kept:.2f} s, of which convolutions {conv:.2f} s ({100 * conv / kept:.0f}%)")
        print(f"=> encode ratio ceiling with bit-identical codes (the same conv kernels): {kept:.2f} / {conv:.2f}"
              f" = {kept / conv:.2f}x with the same allocator; {total:.2f} / {conv:.2f} = {total / conv:.2f}x "
              f"against the official as it runs")


if __name__ == "__main__":
    main()
