"""Training-step speed side by side with the official step, in one process.

    python benchmarks/train_throughput.py --official /path/to/LeapLabTHU-ENAT-checkout
    python benchmarks/train_throughput.py --tiny          # seconds-long smoke run (no official code)
    python benchmarks/train_throughput.py --official ENAT --device cuda --preset enat-l --batch 128 --precision bf16

Same model (ENAT-S by default), same batch (16), same random tokens, reuse training on (p 0.5 with EMA
features), one step = masking + forward + backward + AdamW + EMA update:
  official   the official DiT and NATSchedule.sample, the LSimple steps of train.py (its reuse branch
             with mask_by_confidence, the full-logit loss) and utils.ema's update, written out here
             because train.py / utils.py import accelerate and torchvision at module level;
  ours       enat.lsimple + torch AdamW + enat.ema_update;
  deepspeed  ours inside a single-process DeepSpeed engine (ZeRO-1; gloo on CPU, nccl on CUDA) with the
             train job's EMA update (from DeepSpeed's fp32 masters): the engine's overhead over the plain
             optimizer step.
`--precision` bf16/fp16 runs ours under that autocast (fp16 with a grad scaler) and the engine with
DeepSpeed's bf16/fp16; the official step runs fp16 autocast + GradScaler on a GPU (as its train.py under
accelerate's fp16 mixed precision) and fp32 on the CPU.
Each figure is the median over `--repeat` steps after warm-up. Prints figures only.
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


def median_step(step, repeat: int, device: torch.device, warmup: int = 2) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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

    def step():
        net.train()
        opt.zero_grad()
        _, lab, xn = sched.sample(tokens)
        prev = None
        with amp():
            if torch.rand(1).item() < 0.5:
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


def ours_step_fn(cfg: enat.ENATConfig, tokens, labels, lr: float, engine: bool, precision: str = "fp32"):
    device = tokens.device
    model = enat.ENAT(cfg).train().to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.03, betas=(0.99, 0.99))
    gen = torch.Generator(device).manual_seed(0)                  # draws happen on the tokens' device
    if engine:
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
        import deepspeed
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
        ds = {"train_batch_size": tokens.shape[0], "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
        if precision == "bf16":
            ds["bf16"] = {"enabled": True}
        elif precision == "fp16":
            ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
        eng, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
        from pipeline.train import engine_ema_update

        def step():
            loss, _ = enat.lsimple(eng, tokens, labels, ema, generator=gen)
            eng.backward(loss)
            eng.step()
            engine_ema_update(eng, ema, 0.9999)      # as the train job: from DeepSpeed's fp32 masters
        return step

    amp, scaler = _amp(device, precision)

    def step():
        opt.zero_grad(set_to_none=True)
        with amp():
            loss, _ = enat.lsimple(model, tokens, labels, ema, generator=gen)
        _backward_step(loss, opt, scaler)
        enat.ema_update(ema, model, 0.9999)
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
    ap.add_argument("--tiny", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = enat.ENATConfig.preset(args.preset)
    if args.tiny:
        cfg = enat.ENATConfig(2, 1, 64, 4, seq_len=64)
        args.batch, args.repeat = 4, 2
    device = torch.device(args.device)
    tokens = torch.randint(0, cfg.codebook_size, (args.batch, cfg.seq_len)).to(device)
    labels = torch.randint(0, cfg.num_classes + 1, (args.batch,)).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"# train step: {args.preset if not args.tiny else 'tiny'} {cfg.encoder_depth}/{cfg.decoder_depth} "
          f"dim {cfg.dim}, batch {args.batch}, ours {args.precision}, {where}, torch {torch.__version__}")
    rows = {}
    if args.official:
        from benchmarks.official import load_official
        rows["official"] = median_step(official_step_fn(load_official(args.official), cfg, tokens, labels, 1e-4),
                                       args.repeat, device)
    rows["ours"] = median_step(ours_step_fn(cfg, tokens, labels, 1e-4, False, args.precision), args.repeat, device)
    if not args.no_deepspeed:
        rows["ours + deepspeed"] = median_step(ours_step_fn(cfg, tokens, labels, 1e-4, True, args.precision),
                                               args.repeat, device)
    base = rows.get("official")
    print(f"{'step':<18} {'s/step':>8} {'img/s':>8} {'vs official':>12}")
    for k, v in rows.items():
        print(f"{k:<18} {v:8.3f} {args.batch / v:8.2f} {(f'{base / v:.2f}x' if base else '-'):>12}")
    if "ours + deepspeed" in rows:
        print(f"DeepSpeed engine overhead over the plain optimizer step: "
              f"{100 * (rows['ours + deepspeed'] / rows['ours'] - 1):+.1f}%")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
