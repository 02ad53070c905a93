"""Training-step speed side by side with the official step, in one process.

    python benchmarks/train_throughput.py --official /path/to/LeapLabTHU-ENAT-checkout
    python benchmarks/train_throughput.py --tiny          # seconds-long smoke run (no official code)
    python benchmarks/train_throughput.py --official ENAT --device cuda --preset enat-l --batch 128 --precision bf16

Same model (ENAT-S by default), same batch (16), same random tokens, reuse training on (p 0.5 with EMA
features), one step = masking + forward + backward + AdamW + EMA update:
  official   the official DiT and NATSchedule.sample, the LSimple steps of train.py (its reuse branch
             with mask_by_confidence, the full-logit loss) and utils.ema's update, written out here
             because train.py / utils.py import accelerate and torchvision at module level;
  ours       enat.lsimple + torch AdamW + enat.ema_update (no engine);
  deepspeed  the train job's own path: the engine, its optimizer and EMA built by
             pipeline.train.engine.TrainState.build from a TrainJobConfig (the DeepSpeed JSON the job
             generates: ZeRO `--zero-stage`, `--precision`, one process; gloo on CPU, nccl on CUDA), each
             step pipeline.train.loop.train_step + engine_ema_update (from DeepSpeed's fp32 masters).
`--precision` bf16/fp16 runs ours under that autocast (fp16 with a grad scaler) and the engine with
DeepSpeed's bf16/fp16; the official step runs fp16 autocast + GradScaler on a GPU (as its train.py under
accelerate's fp16 mixed precision) and fp32 on the CPU.
The implementations alternate call by call (A, B, C, A, B, C, ...) so machine drift hits all alike; one
call is two steps, one with the reuse branch and one without (the official coin's p = 0.5, made exact).
Each figure is the median (and best) over `--repeat` calls after a warm-up call. Prints figures only.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import enat  # noqa: E402


def interleaved(steps: dict, repeat: int, device: torch.device, warmup: int = 1) -> dict:
    """Time each step function `repeat` times, alternating between them call by call; -> name: times.
    Each call runs two steps: reuse on, then off."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = {k: [] for k in steps}
    for i in range(warmup + repeat):
        for k, step in steps.items():
            sync()
            t0 = time.perf_counter()
            step(True)
            step(False)
            sync()
            if i >= warmup:
                times[k].append((time.perf_counter() - t0) / 2)
    return times


def _amp(device: torch.device, precision: str):
    """Autocast for 'bf16' / 'fp16', nothing for 'fp32'; plus a grad scaler for fp16."""
    if precision == "fp32":
        return contextlib.nullcontext, None
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _backward_step(loss, opt, scaler) -> None:
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


def official_step_fn(off, cfg: enat.ENATConfig, tokens, labels, lr: float):
    """The official training step (train.py LSimple + train_step, utils.ema): fp32 on the CPU, fp16
    autocast + GradScaler on a GPU."""
    from benchmarks.official import official_args
    args = official_args(cfg.encoder_depth, cfg.decoder_depth, cfg.dim, cfg.num_heads, seq_len=cfg.seq_len)
    device = tokens.device
    net = off.models.DiT(input_size=cfg.grid, num_classes=cfg.num_classes, hidden_size=cfg.dim,
                         num_heads=cfg.num_heads, args=args, codebook_size=cfg.codebook_size).to(device)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.03, betas=(0.99, 0.99))
    sched = off.nat_misc.NATSchedule(codebook_size=cfg.codebook_size, device=device, args=args)
    amp, scaler = _amp(device, "fp16" if device.type == "cuda" else "fp32")
    L = cfg.seq_len

    def mask_by_confidence(mask_len, ignore_map):                    # train.py, with args/device bound
        conf = torch.rand(mask_len.shape[0], L, device=device)
        conf = torch.where(ignore_map, +np.inf, conf)
        sorted_inds = torch.argsort(conf, dim=-1, descending=False)
        mask_len = torch.clamp(mask_len, 0, L - 1)[0]
        masking = torch.zeros_like(conf, dtype=torch.bool)
        masking.scatter_(1, sorted_inds[:, :mask_len.long()], True)
        return masking

    def step(reuse: bool):
        net.train()
        opt.zero_grad()
        _, lab, xn = sched.sample(tokens)
        prev = None
        with amp():
            torch.rand(1)                                              # the coin's draw; `reuse` decides
            if reuse:
                with torch.no_grad():
                    masking = xn == sched.mask_ind
                    vis = (~masking).sum(-1)
                    n = (vis * torch.rand(1, device=device)).round().long()
                    more = mask_by_confidence(n, masking)
                    prev = ema(torch.where(more, sched.mask_ind, xn), context=labels, return_dict=True)
            loss = sched.loss(net(xn, context=labels, prev_dict=prev), lab)
        _backward_step(loss, opt, scaler)
        src = dict(net.named_parameters())                             # utils.ema
        for name, p in ema.named_parameters():
            p.data.mul_(0.9999).add_((1 - 0.9999) * src[name].data)
    return step


def ours_step_fn(cfg: enat.ENATConfig, tokens, labels, lr: float, precision: str = "fp32"):
    """enat.lsimple + torch AdamW + enat.ema_update, no engine (autocast for bf16/fp16)."""
    device = tokens.device
    model = enat.ENAT(cfg).train().to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.03, betas=(0.99, 0.99))
    gen = torch.Generator(device).manual_seed(0)                  # draws happen on the tokens' device
    amp, scaler = _amp(device, precision)

    def step(reuse: bool):
        opt.zero_grad(set_to_none=True)
        with amp():
            loss, _ = enat.lsimple(model, tokens, labels, ema, generator=gen, reuse=reuse)
        _backward_step(loss, opt, scaler)
        enat.ema_update(ema, model, 0.9999)
    return step


def job_config(preset: str, batch: int, lr: float, device: torch.device, precision: str, zero_stage: int,
               extra: tuple[str, ...] = ()):
    """The train job's config for one worker: the model, batch, optimizer and DeepSpeed settings."""
    from pipeline.config import load_config
    from pipeline.train import TrainJobConfig
    return load_config(TrainJobConfig, {"data": {"root": "memory://unused"}}, [
        f"model.preset={preset}", f"train.global_batch={batch}", "compute.workers=1",
        f"compute.device={device.type}", f"deepspeed.precision={precision}", f"deepspeed.zero_stage={zero_stage}",
        f"optim.lr={lr:.12f}", "optim.warmup_steps=0", "launcher=torchrun", *extra])


def deepspeed_step_fn(job, mcfg: enat.ENATConfig, tokens, labels):
    """The train job's step on its DeepSpeed engine, built as the job builds it (one process)."""
    device = tokens.device
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    from pipeline.train import TrainState, engine_ema_update
    from pipeline.train.launch import init_worker
    from pipeline.train.loop import train_step
    assert init_worker(job, 0).type == device.type
    state = TrainState.build(job, mcfg, device, 0)

    def step(reuse: bool):
        train_step(job, state, tokens, labels, reuse=reuse)
        engine_ema_update(state.engine, state.ema, job.train.ema_rate)    # as the job: after each update
    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", help="path to a LeapLabTHU/ENAT checkout")
    ap.add_argument("--preset", default="enat-s")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-deepspeed", action="store_true")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"], help="ours and the engine")
    ap.add_argument("--zero-stage", type=int, default=1, help="the engine's ZeRO stage")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="a train-config override for the engine (e.g. deepspeed.extra=...)")
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = enat.ENATConfig.preset(args.preset)
    if args.tiny:
        args.preset = "enat-s"
        cfg = enat.ENATConfig(2, 1, 64, 4, seq_len=64)
        args.batch, args.repeat = 4, 2
    device = torch.device(args.device)
    tokens = torch.randint(0, cfg.codebook_size, (args.batch, cfg.seq_len)).to(device)
    labels = torch.randint(0, cfg.num_classes + 1, (args.batch,)).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"# train step: {args.preset if not args.tiny else 'tiny'} {cfg.encoder_depth}/{cfg.decoder_depth} "
          f"dim {cfg.dim}, batch {args.batch}, ours {args.precision}, {where}, torch {torch.__version__}")
    steps = {}
    if args.official:
        from benchmarks.official import load_official
        steps["official"] = official_step_fn(load_official(args.official), cfg, tokens, labels, 1e-4)
    steps["ours"] = ours_step_fn(cfg, tokens, labels, 1e-4, args.precision)
    if not args.no_deepspeed:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        job = job_config(args.preset, args.batch, 1e-4, device, args.precision, args.zero_stage, tuple(args.set))
        steps["ours + deepspeed"] = deepspeed_step_fn(job, cfg, tokens, labels)
    times = interleaved(steps, args.repeat, device)
    rows = {k: statistics.median(v) for k, v in times.items()}
    base = rows.get("official")
    print(f"{'step':<18} {'s/step':>8} {'best':>8} {'img/s':>8} {'vs official':>12}")
    for k, v in rows.items():
        print(f"{k:<18} {v:8.3f} {min(times[k]):8.3f} {args.batch / v:8.2f} "
              f"{(f'{base / v:.2f}x' if base else '-'):>12}")
    if "ours + deepspeed" in rows:
        print(f"DeepSpeed engine (ZeRO-{args.zero_stage}, {args.precision}) overhead over the plain step "
              f"(ours, {args.precision}): {100 * (rows['ours + deepspeed'] / rows['ours'] - 1):+.1f}%")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
