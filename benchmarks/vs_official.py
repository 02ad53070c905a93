"""Side-by-side speed of our ENAT sampler (and VQGAN) and the official code, in one process.

    python benchmarks/vs_official.py --official /path/to/LeapLabTHU-ENAT-checkout
    python benchmarks/vs_official.py --tiny            # seconds-long smoke run without the official code
    python benchmarks/vs_official.py --official ENAT --device cuda --preset enat-l --batch 250   # one GPU

The official code is imported from the checkout the person running this fetched (never copied into the
project; see benchmarks/official.py). Both run on the same inputs, the same random weights and the same
settings (ENAT-S by default: 15/1, 366, 6 heads, 256 px, 8 steps, guidance 2.5, batch 16); each figure
is timed over `--repeat` rounds after one warm-up round, the implementations alternating call by call
(A, B, C, A, B, C, ...) so that load drift hits all alike; best-of-N and median are printed, and every
ratio is official / ours (how many times faster ours is).
On a GPU the official sampler runs under fp16 autocast (`--official-amp`, as its train.py evaluates
under accelerate's fp16 mixed precision) and ours adds an fp16 row. Prints figures only; it asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import enat  # noqa: E402
from benchmarks.official import load_official, official_args  # noqa: E402


def interleaved(fns: dict, repeat: int, device: torch.device = torch.device("cpu")) -> dict:
    """Seconds per call of each function, timed round-robin (A, B, C, A, B, C, ...) after one warm-up
    round, so that drift in the machine's load hits every implementation alike. -> {name: [times]}."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns.values():                # warm-up
        fn()
        sync()
    times: dict = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            times[k].append(time.perf_counter() - t0)
    return times


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu, {torch.get_num_threads()} threads"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", help="path to a LeapLabTHU/ENAT checkout (omit to time ours only)")
    ap.add_argument("--preset", default="enat-s")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--official-amp", default=None, choices=["none", "float16", "bfloat16"],
                    help="autocast dtype of the official sampler (default: float16 on cuda, none on cpu)")
    ap.add_argument("--vqgan", action="store_true", help="also time VQGAN encode/decode (MAGE config)")
    ap.add_argument("--vq-batch", type=int, default=4)
    ap.add_argument("--skip-official-no-reuse", action="store_true", help="time the official sampler with reuse only")
    ap.add_argument("--tiny", action="store_true", help="tiny config, 1 repeat: a smoke run for CI")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    official_amp = args.official_amp or ("float16" if device.type == "cuda" else "none")

    cfg = enat.ENATConfig.preset(args.preset)
    if args.tiny:
        cfg = enat.ENATConfig(2, 1, 64, 4, seq_len=64, codebook_size=1024)
        args.batch, args.repeat = 2, 1
    model = enat.ENAT(cfg).eval().to(device)
    with torch.no_grad():   # random weights everywhere (adaLN too), so no path is an identity
        for p in model.parameters():
            p.normal_(0, 0.02)
    labels = torch.arange(args.batch, device=device) % cfg.num_classes
    settings = enat.SamplerConfig.preset("imagenet-256" if cfg.seq_len == 256 else "imagenet-512")
    settings = enat.SamplerConfig(steps=args.steps, cfg_scale=settings.cfg_scale, mask_temp=settings.mask_temp,
                                  sample_temp=settings.sample_temp)
    print(f"# {args.preset if not args.tiny else 'tiny'}: {cfg.encoder_depth}/{cfg.decoder_depth}, dim {cfg.dim}, "
          f"{cfg.num_heads} heads, L={cfg.seq_len}, {args.steps} steps, cfg {settings.cfg_scale}, batch {args.batch}, "
          f"torch {torch.__version__}, {_device_name(device)}")
    fns: dict = {}

    def ours(**kw):
        sc = enat.SamplerConfig(**{**settings.to_dict(), **kw})
        return lambda: enat.generate(model, labels, sc, generator=torch.Generator(device).manual_seed(0))

    if args.official:
        off = load_official(args.official)
        a = official_args(cfg.encoder_depth, cfg.decoder_depth, cfg.dim, cfg.num_heads, seq_len=cfg.seq_len,
                          cfg_scale=settings.cfg_scale, mask_temp=settings.mask_temp, samp_temp=settings.sample_temp)
        net = off.models.DiT(input_size=cfg.grid, num_classes=cfg.num_classes, hidden_size=cfg.dim,
                             num_heads=cfg.num_heads, args=a, codebook_size=cfg.codebook_size)
        net.load_state_dict(model.state_dict())
        net.eval().to(device)
        sched = off.nat_misc.NATSchedule(codebook_size=cfg.codebook_size, device=device, args=a)
        amp = (torch.autocast(device.type, dtype=getattr(torch, official_amp)) if official_amp != "none"
               else contextlib.nullcontext())
        no_reuse = lambda ids, prev_dict=None, **kw: net(ids, prev_dict=None, **kw)  # noqa: E731

        def official(nnet):
            def run():
                with torch.no_grad(), amp:
                    sched.generate(args.steps, args.batch, nnet, lambda z: z, latent_size=cfg.grid, context=labels)
            return run
        fns["official reuse"] = official(net)
        if not args.skip_official_no_reuse:
            fns["official no-reuse"] = official(no_reuse)
        print(f"official sampler autocast: {official_amp}")
    fns["ours fp32 reuse"] = ours()
    fns["ours fp32 no-reuse"] = ours(reuse=False)
    fns["ours bf16 reuse"] = ours(dtype="bfloat16")
    if device.type == "cuda":
        fns["ours fp16 reuse"] = ours(dtype="float16")
    times = interleaved(fns, args.repeat, device)
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")

    best = {k: min(v) for k, v in times.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"interleaved, {args.repeat} rounds after a warm-up round; ratios are official reuse / row "
          f"(best-of-{args.repeat} and median)")
    print(f"{'sampler':<22} {'best s':>8} {'median s':>9} {'img/s':>7} {'vs off. best':>13} {'vs off. median':>15}")
    b0, m0 = best.get("official reuse"), med.get("official reuse")
    for k in times:
        rb = f"{b0 / best[k]:.2f}x" if b0 else "-"
        rm = f"{m0 / med[k]:.2f}x" if m0 else "-"
        print(f"{k:<22} {best[k]:8.3f} {med[k]:9.3f} {args.batch / best[k]:7.2f} {rb:>13} {rm:>15}")
    print(f"reuse gain (no-reuse / reuse): ours {best['ours fp32 no-reuse'] / best['ours fp32 reuse']:.2f}x best, "
          f"{med['ours fp32 no-reuse'] / med['ours fp32 reuse']:.2f}x median", end="")
    if "official no-reuse" in best:
        print(f"; official {best['official no-reuse'] / b0:.2f}x best, {med['official no-reuse'] / m0:.2f}x median")
    else:
        print()
    # what bf16 changes: token agreement with fp32 on the same seed (the random streams are the same
    # draws; a token differs where bf16 rounding moved a logit enough to change a draw or a reveal)
    t32, t16 = ours()(), ours(dtype="bfloat16")()
    print(f"bf16 vs fp32 tokens (seed 0): {(t32 == t16).float().mean().item() * 100:.1f}% equal")

    if args.vqgan:
        from benchmarks.vqgan_speed import main as vq_main
        vq_argv = ["--batch", str(args.vq_batch), "--repeats", str(args.repeat), "--device", args.device]
        if args.official:
            vq_argv += ["--official", args.official]
        if args.tiny:
            vq_argv += ["--tiny"]
        vq_main(vq_argv)


if __name__ == "__main__":
    main()
