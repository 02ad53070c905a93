"""Side-by-side speed of our ENAT sampler (and VQGAN) and the official code, in one process.

    python benchmarks/vs_official.py --official /path/to/LeapLabTHU-ENAT-checkout
    python benchmarks/vs_official.py --tiny            # seconds-long smoke run without the official code
    python benchmarks/vs_official.py --official ENAT --device cuda --preset enat-l --batch 250   # one GPU

The official code is imported from the checkout the person running this fetched (never copied into the
project; see benchmarks/official.py). Both run on the same inputs, the same random weights and the same
settings (ENAT-S by default: 15/1, 366, 6 heads, 256 px, 8 steps, guidance 2.5, batch 16); each figure
is the median of `--repeat` timed runs after one warm-up, and every ratio is ours / official.
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


def timeit(fn, repeat: int, device: torch.device = torch.device("cpu")) -> float:
    """Median seconds of `repeat` calls after one warm-up; CUDA work is waited for inside each timing."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()                                   # warm-up
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    rows: dict[str, float] = {}

    def ours(**kw):
        sc = enat.SamplerConfig(**{**settings.to_dict(), **kw})
        g = torch.Generator(device).manual_seed(0)
        return lambda: enat.generate(model, labels, sc, generator=g)

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
        rows["official reuse"] = timeit(official(net), args.repeat, device)
        rows["official no-reuse"] = timeit(official(no_reuse), args.repeat, device)
        print(f"official sampler autocast: {official_amp}")
    rows["ours fp32 reuse"] = timeit(ours(), args.repeat, device)
    rows["ours fp32 no-reuse"] = timeit(ours(reuse=False), args.repeat, device)
    rows["ours bf16 reuse"] = timeit(ours(dtype="bfloat16"), args.repeat, device)
    if device.type == "cuda":
        rows["ours fp16 reuse"] = timeit(ours(dtype="float16"), args.repeat, device)
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")

    print(f"{'sampler':<22} {'s/batch':>9} {'img/s':>8} {'vs official reuse':>18}")
    base = rows.get("official reuse")
    for k, v in rows.items():
        ratio = f"{base / v:.2f}x" if base else "-"
        print(f"{k:<22} {v:9.3f} {args.batch / v:8.3f} {ratio:>18}")
    print(f"reuse gain: ours {rows['ours fp32 no-reuse'] / rows['ours fp32 reuse']:.2f}x", end="")
    if base:
        print(f", official {rows['official no-reuse'] / base:.2f}x")
    else:
        print()

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
