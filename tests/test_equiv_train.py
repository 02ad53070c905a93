"""The train job's fast engine path against the plain one (issue 14, target 2).

- the job's optimizer (torch's fused AdamW, `make_optimizer`) against the for-loop AdamW the official
  code runs, over a few real training steps;
- the whole engine step (DeepSpeed ZeRO-1, fp32, one process, built by `TrainState.build`, stepped by
  `train_step` + `engine_ema_update`) against the plain step (ENAT + for-loop AdamW + warmup LambdaLR +
  `enat.ema_update`): the same parameters and EMA after a few steps;
- the EMA's in-place read of DeepSpeed's fp32 masters in a world of one (bf16, ZeRO-1/2) against the
  collective `safe_get_full_fp32_param` it replaces: bit for bit.

Every step takes the reuse branch: on a step without it the `prev` projection has no gradient, which
torch's AdamW skips while DeepSpeed's flat partition steps it with a zero gradient (moments decay, weight
decay applies) -- a difference of DeepSpeed's, not of the fast path, reported in issue 14.

Tolerances: the fused kernel evaluates the same AdamW formula in another order (float32 rounding, a few
ulps per step); everything else is exact.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

import enat
from tests.services import free_port

STEPS = 4
# |w| ~ 0.02-1, lr 1e-3: the two AdamW orders differ by float32 rounding only; a wrong beta, eps, weight
# decay or bias correction moves the weights by ~lr (1e-3) per step
TOL = 2e-6
# the engine steps one flat partition, the plain path each tensor: the fused kernel's vector lanes and
# scalar tail fall on other elements (FMA or not), a few ulps that Adam's normalisation carries into the
# weights; still 50x below what a wrong setting does in one step
ENGINE_TOL = 2e-5


@pytest.fixture
def world_of_one(monkeypatch):
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)
    assert not dist.is_initialized() or dist.get_world_size() == 1


def _job(precision: str = "fp32", stage: int = 1, lr: float = 1e-3, warmup: int = 2):
    from pipeline.config import load_config
    from pipeline.models import model_config
    from pipeline.train import TrainJobConfig
    cfg = load_config(TrainJobConfig, {"data": {"root": "memory://unused"}}, [
        "model.preset=enat-s", "model.encoder_depth=1", "model.decoder_depth=1", "model.dim=32",
        "model.num_heads=2", f"deepspeed.precision={precision}", f"deepspeed.zero_stage={stage}",
        f"optim.lr={lr:.15f}", f"optim.warmup_steps={warmup}", "train.global_batch=4", "train.ema_rate=0.9",
        "compute.workers=1", "compute.device=cpu", "launcher=torchrun"])
    return cfg, model_config(cfg.model)


def _batch(mcfg, step: int):
    g = torch.Generator().manual_seed(100 + step)
    return (torch.randint(0, mcfg.codebook_size, (4, mcfg.seq_len), generator=g),
            torch.randint(0, mcfg.num_classes + 1, (4,), generator=g))


def _plain(cfg, mcfg, fused: bool):
    """The plain path: the job's initial weights, for-loop (or fused) AdamW, the job's warmup, enat.ema_update."""
    from pipeline.train.engine import INIT_STREAM, generators, rank_seed
    from enat.objective import warmup_constant
    torch.manual_seed(rank_seed(cfg.train.seed, 0, INIT_STREAM))
    model = enat.ENAT(mcfg).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, fused=fused, foreach=False if not fused else None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(cfg.optim.warmup_steps))
    gen, _ = generators(cfg.train.seed, 0, "cpu")
    torch.manual_seed(7)                                      # the embedding dropout's draws
    for k in range(STEPS):
        tokens, labels = _batch(mcfg, k)
        opt.zero_grad(set_to_none=True)
        loss, _ = enat.lsimple(model, tokens, labels, ema, cfg.objective, gen, reuse=True)
        loss.backward()
        opt.step()
        sched.step()
        enat.ema_update(ema, model, cfg.train.ema_rate)
    return dict(model.named_parameters()), dict(ema.named_parameters())


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[n].detach().float() - b[n].detach().float()).abs().max().item() for n in a)


def test_fused_adamw_matches_the_for_loop_adamw():
    """make_optimizer's fused kernel trains the same weights as the official for-loop AdamW."""
    from pipeline.train.engine import make_optimizer
    cfg, mcfg = _job()
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg)
    assert opt.defaults["fused"] and opt.defaults["betas"] == cfg.optim.betas
    assert opt.defaults["weight_decay"] == cfg.optim.weight_decay and opt.defaults["eps"] == cfg.optim.eps
    (w_loop, e_loop), (w_fused, e_fused) = _plain(cfg, mcfg, fused=False), _plain(cfg, mcfg, fused=True)
    start, _ = _plain(*_job(lr=1e-12), fused=False)
    assert _max_diff(w_loop, start) > 1e-3                    # the weights really trained
    assert _max_diff(w_loop, w_fused) <= TOL
    assert _max_diff(e_loop, e_fused) <= TOL


def test_engine_step_matches_the_plain_step(world_of_one):
    """DeepSpeed ZeRO-1 fp32 in a world of one, built and stepped as the job does, trains the same weights
    and EMA as the plain path (for-loop AdamW, no engine)."""
    from pipeline.train import TrainState, engine_ema_update
    from pipeline.train.launch import init_worker
    from pipeline.train.loop import train_step
    cfg, mcfg = _job()
    device = init_worker(cfg, 0)
    state = TrainState.build(cfg, mcfg, device, 0)
    torch.manual_seed(7)
    for k in range(STEPS):
        tokens, labels = _batch(mcfg, k)
        train_step(cfg, state, tokens, labels, reuse=True)
        engine_ema_update(state.engine, state.ema, cfg.train.ema_rate)
    weights, ema = _plain(cfg, mcfg, fused=False)
    assert _max_diff(dict(state.engine.module.named_parameters()), weights) <= ENGINE_TOL
    assert _max_diff(dict(state.ema.named_parameters()), ema) <= ENGINE_TOL


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_ema_reads_the_same_fp32_masters_as_deepspeed(stage, world_of_one):
    """bf16: in a world of one the EMA reads each parameter's fp32 master in place (ZeRO-1/2), exactly
    what DeepSpeed's collective safe_get_full_fp32_param assembles; ZeRO-3 keeps the collective path."""
    from deepspeed.utils import safe_get_full_fp32_param
    from pipeline.train import TrainState, engine_ema_update
    from pipeline.train.engine import _local_fp32_masters
    from pipeline.train.launch import init_worker
    from pipeline.train.loop import train_step
    cfg, mcfg = _job("bf16", stage, warmup=0)
    state = TrainState.build(cfg, mcfg, init_worker(cfg, 0), 0)
    tokens, labels = _batch(mcfg, 0)
    train_step(cfg, state, tokens, labels, reuse=True)
    params = [p for _, p in state.engine.module.named_parameters()]
    local = _local_fp32_masters(state.engine, params)
    full = [safe_get_full_fp32_param(p) for p in params]
    if stage == 3:
        assert local is None
    else:
        assert local is not None
        for p, a, b in zip(params, local, full):
            assert a.dtype == torch.float32 and torch.equal(a.reshape(p.shape), b)
    # the EMA update: rate * ema + (1 - rate) * master, master the collective read
    expect = {n: e.clone().mul_(0.9).add_(m.reshape(e.shape), alpha=1 - 0.9)
              for (n, e), m in zip(state.ema.named_parameters(), full)}
    engine_ema_update(state.engine, state.ema, 0.9)
    for n, e in state.ema.named_parameters():
        assert torch.equal(e, expect[n]), n
