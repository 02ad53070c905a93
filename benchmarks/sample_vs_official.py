"""The sample job end to end beside the official evaluation loop, in one process, alternating batch by batch.

    python benchmarks/sample_vs_official.py --official .official              # ENAT-S, batch 16, 256 px, 8 steps
    python benchmarks/sample_vs_official.py --tiny                            # smoke run (tiny models, ours only)
    python benchmarks/sample_vs_official.py --official ENAT --device cuda --preset enat-l --batch 125

Official ("official fp32"): one batch of `eval_step` in the official train.py — `NATSchedule.generate` with the
official DiT (which decodes with the taming VQGAN's `decode_code`), `clamp_(0, 1)`, then
`inception(samples.float())[0]`, pool3 features collected; no files written. The official `libs/inception.py`
imports torchvision, which does not load with this CPU-only torch, so its Inception is our pure-torch
`FIDInception` with `fused=False` (pytorch-fid's architecture run module by module, same numbers) in fp32,
called exactly as `eval_step` calls it. On CUDA the official generate + decode run under fp16 autocast
(`--official-amp`; the official eval runs under accelerate's fp16) and its Inception in fp32, as there.

Ours: the sample job's unit runner (`pipeline.sample.UnitRunner.run`) on one unit of one batch — generate,
VQGAN decode, FID Inception (+ IS statistics), PNG tar, npz, statistics and features files written to a local
folder, commit record — i.e. the real job's per-unit file overheads counted once per batch (the job's units
hold 1,000 samples). "ours fp32" is the job's default; "ours bf16" is `sampler.precision=bf16`,
`tokenizer.precision=bf16`, `inception.precision=bf16`.

Same random weights for both (ENAT of the preset, the MAGE f16 VQGAN, the Inception with batch-norm statistics
set from one decoded batch so its random features are well scaled), same labels. Timed round-robin (official,
ours fp32, ours bf16, official, ...) after one warm-up round; on the CPU each side runs with the malloc
settings it is deployed with (`--allocator deployed`: ours keeps freed memory as our CPU sample workers do,
the official eval_step has glibc's defaults; switched between calls, outside the timed ones). The bf16 rows also report what bf16 changes on
the same seeds: the fraction of identical tokens, and the FID between the fp32 and bf16 feature sets beside the
FID between our fp32 set and the official's (independent random streams: the seed-to-seed noise at that n).
Prints figures only; asserts nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import enat  # noqa: E402
from enat import FeatureStats, FIDInception  # noqa: E402
from enat.vqgan import VQGAN, VQGANConfig  # noqa: E402
from benchmarks.official import set_allocator  # noqa: E402
from pipeline import sample  # noqa: E402

STAGES = ("generate", "decode", "inception", "write")


def calibrate_bn(net: FIDInception, images: torch.Tensor) -> None:
    """Set every batch norm's running statistics to those of its input on `images` (one plain forward), so a
    randomly initialised Inception gives well-scaled, informative features."""
    def pre(bn, inp):
        x = inp[0].double()
        bn.running_mean.copy_(x.mean((0, 2, 3)))
        bn.running_var.copy_(x.var((0, 2, 3)))
    fused = net.fused
    net.fused = False
    hooks = [m.register_forward_pre_hook(pre) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    try:
        with torch.no_grad():
            net(images)
    finally:
        for h in hooks:
            h.remove()
        net.fused = fused


def fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (eigvals, as the official eval computes it)."""
    m1, s1 = FeatureStats.empty(a.shape[1]).update(a).mean_cov()
    m2, s2 = FeatureStats.empty(b.shape[1]).update(b).mean_cov()
    return float(enat.frechet_distance(m1, s1, m2, s2, method="eigvals"))


def build(args: argparse.Namespace, device: torch.device):
    torch.manual_seed(0)
    if args.tiny:
        from benchmarks.vqgan_speed import TINY

        mcfg, vcfg = enat.ENATConfig(2, 1, 64, 4, seq_len=16, codebook_size=TINY.codebook_size), TINY
    else:
        mcfg, vcfg = enat.ENATConfig.preset(args.preset), VQGANConfig.preset("mage-f16")
    model = enat.ENAT(mcfg).eval()
    with torch.no_grad():  # random weights everywhere (adaLN too), so no path is an identity
        for p in model.parameters():
            p.normal_(0, 0.02)
    off = None
    if args.official:
        from benchmarks.official import load_official, official_args
        from benchmarks.vqgan_speed import official_vqmodel

        ns = load_official(args.official)
        s = enat.SamplerConfig.preset("imagenet-256" if mcfg.seq_len == 256 else "imagenet-512")
        a = official_args(mcfg.encoder_depth, mcfg.decoder_depth, mcfg.dim, mcfg.num_heads, seq_len=mcfg.seq_len,
                          cfg_scale=s.cfg_scale, mask_temp=s.mask_temp, samp_temp=s.sample_temp)
        net = ns.models.DiT(input_size=mcfg.grid, num_classes=mcfg.num_classes, hidden_size=mcfg.dim,
                            num_heads=mcfg.num_heads, args=a, codebook_size=mcfg.codebook_size)
        net.load_state_dict(model.state_dict())
        vq_off = official_vqmodel(args.official, vcfg)
        tok = VQGAN.from_official(vq_off.state_dict(), vcfg)  # same weights
        sched = ns.nat_misc.NATSchedule(codebook_size=mcfg.codebook_size, device=device, args=a)
        off = dict(net=net.eval().to(device), vq=vq_off.to(device), sched=sched)
    else:
        tok = VQGAN(vcfg)
    model, tok = model.to(device), tok.to(device)
    inception = FIDInception().to(device)
    with torch.no_grad():
        g = torch.Generator(device).manual_seed(1)
        codes = torch.randint(0, vcfg.codebook_size, (4, mcfg.grid, mcfg.grid), generator=g, device=device)
        calibrate_bn(inception, tok.decode(codes))
    return mcfg, model, tok, inception, off


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--official", default=None, help="path of a LeapLabTHU/ENAT checkout (omit: ours only)")
    ap.add_argument("--preset", default="enat-s")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2, help="timed batches of each")
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches of each first (0: none)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--official-amp", default=None, choices=["none", "float16", "bfloat16"],
                    help="autocast of the official generate + decode (default: float16 on cuda, none on cpu)")
    ap.add_argument("--png-threads", type=int, default=4)
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 option")
    ap.add_argument("--tiny", action="store_true", help="tiny models, batch 2, one repeat: a smoke run")
    ap.add_argument("--allocator", choices=["deployed", "default", "kept"], default="deployed",
                    help="glibc malloc per call: deployed (default) = ours as our CPU sample workers run it, "
                         "freed memory kept (pipeline.cluster.keep_freed_memory), the official eval_step "
                         "with glibc's defaults, switched before each call; default / kept = both alike")
    args = ap.parse_args(argv)
    if args.tiny:
        args.batch, args.repeat, args.warmup = 2, 1, 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_name = args.official_amp or ("float16" if device.type == "cuda" else "none")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    mcfg, model, tok, inception, off = build(args, device)
    B = args.batch
    labels = [int(x) for x in np.arange(B) * 37 % mcfg.num_classes]  # a spread of classes, same for all
    tmp = tempfile.TemporaryDirectory(prefix="enat-sample-vs-official-")

    # ---- ours: the job's unit runner, one unit = one batch
    options = {"ours fp32": "fp32"} if args.no_bf16 else {"ours fp32": "fp32", "ours bf16": "bf16"}
    runners, out_dirs = {}, {}
    for name, prec in options.items():
        inc = inception if prec == "fp32" else copy.deepcopy(inception)
        inc.autocast_dtype = None if prec == "fp32" else torch.bfloat16
        sampler = sample.SamplerSection(steps=args.steps, precision=prec).resolve()
        out_dirs[name] = f"{tmp.name}/{name.replace(' ', '-')}"
        runners[name] = sample.UnitRunner(
            model, tok, inc, sampler, out_dirs[name], batch_size=B,
            is_total=max(50_000, B * (args.repeat + args.warmup)),
            output=sample.OutputSection(uri=out_dirs[name], grid=0, features=True), decode_precision=prec,
            png_threads=args.png_threads)
    tokens: dict[str, list] = {k: [] for k in options}
    recording = None  # the runner under way: its tokens are recorded (a clone; no extra generation)
    plain_generate = enat.generate

    def generate_recorded(*a, **kw):
        t = plain_generate(*a, **kw)
        if recording is not None:
            tokens[recording].append(t.detach().cpu().clone())
        return t
    enat.generate = generate_recorded
    records: dict[str, list] = {k: [] for k in options}

    def ours(name: str, r: int):
        def run():
            nonlocal recording
            recording = name if r >= 0 else None
            unit = sample.Unit(r + args.warmup, (r + args.warmup) * B, B, seed=1000 + r, labels=tuple(labels))
            rec = runners[name].run(unit, "bench")
            if r >= 0:
                records[name].append(rec["seconds"])
        return run

    # ---- official eval_step, one batch
    off_feats: list[np.ndarray] = []
    off_stage = {"generate+decode": [], "inception": []}

    def official(r: int):
        amp = (torch.autocast(device.type, dtype=getattr(torch, amp_name)) if amp_name != "none"
               else contextlib.nullcontext())
        inc_plain = off["inception"]

        def run():
            ctx = torch.tensor(labels, dtype=torch.long, device=device)
            with torch.no_grad():
                t0 = time.perf_counter()
                with amp:
                    samples = off["sched"].generate(args.steps, B, off["net"], off["vq"].decode_code, context=ctx,
                                                    latent_size=mcfg.grid)
                samples = samples.clamp_(0.0, 1.0)
                sync()
                t1 = time.perf_counter()
                pred = inc_plain(samples.float())[0]  # (B, 2048): pool3, already pooled and flattened
                feats = pred.cpu().numpy()
                t2 = time.perf_counter()
            if r >= 0:
                off_feats.append(feats)
                off_stage["generate+decode"].append(t1 - t0)
                off_stage["inception"].append(t2 - t1)
        return run

    if off is not None:
        off["inception"] = FIDInception(fused=False).to(device)
        off["inception"].load_state_dict(inception.state_dict())

    names = (["official fp32"] if off else []) + list(options)
    print(f"# sample job vs official eval_step: {'tiny' if args.tiny else args.preset} ({mcfg.encoder_depth}/"
          f"{mcfg.decoder_depth}, dim {mcfg.dim}), {mcfg.grid * int(tok.downsample)} px, {args.steps} steps, "
          f"guidance, batch {B}, torch {torch.__version__}, {device}"
          + (f" ({torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()})"
             if device.type == "cpu" else f" ({torch.cuda.get_device_name(device)})")
          + (f", official autocast {amp_name}" if off else ""))
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(-args.warmup, args.repeat):  # r < 0: warm-up rounds (oneDNN / cuDNN primitives, allocator)
        for k in names:
            fn = official(r) if k.startswith("official") else ours(k, r)
            if device.type == "cpu":   # outside the timed call
                set_allocator(args.allocator, ours=k.startswith("ours"))
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if r >= 0:
                times[k].append(time.perf_counter() - t)
    enat.generate = plain_generate

    base = statistics.median(times["official fp32"]) if off else None
    print(f"{'':<14} {'s/batch med':>11} {'best':>8} {'samples/s':>10} {'vs official (median)':>21} {'(best)':>8}")
    for k in names:
        med, best = statistics.median(times[k]), min(times[k])
        ratio = f"{base / med:.2f}x" if base else "-"
        rb = f"{min(times['official fp32']) / best:.2f}x" if base else "-"
        print(f"{k:<14} {med:11.2f} {best:8.2f} {B / med:10.3f} {ratio:>21} {rb:>8}")
    print(f"(each over {args.repeat} timed batches; ours includes the unit's PNG tar / npz / statistics files)")

    print("per-sample seconds by stage (medians over the timed batches; the inputs of a FID-50K time model):")
    for k in options:
        row = "  ".join(f"{s} {statistics.median(x[s] for x in records[k]) / B:.3f}" for s in STAGES)
        print(f"  {k:<14} {row}")
    if off:
        print(f"  {'official fp32':<14} generate+decode {statistics.median(off_stage['generate+decode']) / B:.3f}  "
              f"inception {statistics.median(off_stage['inception']) / B:.3f}")

    feats = {k: np.concatenate([np.load(f"{out_dirs[k]}/features/{r + args.warmup:06d}.npy")
                                for r in range(args.repeat)]) for k in options}
    n = len(feats["ours fp32"])
    if "ours bf16" in options:
        a, b = torch.cat(tokens["ours fp32"]), torch.cat(tokens["ours bf16"])
        print(f"bf16 option vs fp32 on the same seeds ({n} samples): identical tokens {(a == b).float().mean():.4f}; "
              f"FID(fp32, bf16) {fid(feats['ours fp32'], feats['ours bf16']):.3f}")
    if off and n > 1:
        noise = fid(feats["ours fp32"], np.concatenate(off_feats))
        print(f"seed-to-seed noise at n={n}: FID(ours fp32, official fp32) {noise:.3f} "
              f"(same model, independent random streams)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
