"""The trained state of one worker: the DeepSpeed engine, the EMA model, the RNG streams and the data position.

Checkpoint layout (one folder per checkpoint, stable names ``step_000010000``):
    <DeepSpeed files>            every rank's engine.save_checkpoint (model + ZeRO optimizer shards)
    ema.pt                       the EMA weights, plain state dict in the official key layout
                                 (``ENAT.from_official`` loads it for sampling)
    config.json                  the resolved train config, the model config, the step, the MLflow run id
    manifest.json                every file's size and sha256, written last (pipeline.train.checkpoints)
client_state (inside the DeepSpeed files): step, data position, RNG states, MLflow run id.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

import enat
from enat.objective import warmup_constant
from pipeline.commits import unit_seed
from pipeline.config import config_to_dict
from pipeline.train.config import TrainJobConfig, batch_split


def deepspeed_config(cfg: TrainJobConfig) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the train config (one source of truth)."""
    micro, accum = batch_split(cfg)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10 ** 9,  # we log ourselves
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    if cfg.deepspeed.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.deepspeed.precision == "fp16":
        # official: fp16 autocast with a dynamic loss scaler (accelerate's GradScaler)
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    if cfg.deepspeed.extra:
        ds = _deep_merge(ds, cfg.deepspeed.extra)
    return ds


def _deep_merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_optimizer(params, cfg: TrainJobConfig) -> torch.optim.AdamW:
    """The official optimizer (AdamW, its betas/eps/weight decay on all parameters), with torch's fused
    kernel (CPU and CUDA alike).

    differs from official (for-loop AdamW): the same update, computed in one pass per tensor with no
    temporaries. Under ZeRO the optimizer steps DeepSpeed's flat fp32 partition, one tensor of all the
    weights, where the for-loop AdamW writes ~5 full-size intermediates per step (on the CPU each a
    fresh mmap and page faults). The two agree to float rounding (tests/test_equiv_train.py)."""
    return torch.optim.AdamW(params, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay, fused=True)


# ----------------------------------------------------------------------------------------------------
# RNG streams


# the per-rank streams, each seeded with rank_seed(train.seed, rank, stream)
INIT_STREAM, OBJECTIVE_STREAM = 0, 1


def rank_seed(seed: int, rank: int, stream: int) -> int:
    """The seed of one of ``rank``'s RNG streams (INIT_STREAM: torch's default generator, i.e. the
    initial weights and dropout; OBJECTIVE_STREAM: the objective's masks): a pure function of
    (seed, rank, stream) through :func:`pipeline.commits.unit_seed`."""
    return unit_seed(seed, 2 * rank + stream)


def generators(seed: int, rank: int, device: torch.device | str) -> tuple[torch.Generator, torch.Generator]:
    """-> (the objective's generator on `device`, per rank; the reuse coin's generator, the same on
    every rank). The objective draws masks on the tokens' device, so its generator lives there; the
    coin decides a Python branch, so it is drawn on the CPU (no host sync in the step loop)."""
    gen = torch.Generator(device).manual_seed(rank_seed(seed, rank, OBJECTIVE_STREAM))
    shared = torch.Generator("cpu").manual_seed(seed)
    return gen, shared


def rng_state(gen: torch.Generator, shared: torch.Generator) -> dict:
    """Every RNG state a resume restores (a CUDA generator's state is a CPU ByteTensor too)."""
    state = {"objective": gen.get_state(), "shared": shared.get_state(), "torch": torch.get_rng_state()}
    if gen.device.type == "cuda":  # dropout draws from the device's default generator
        state["cuda"] = torch.cuda.get_rng_state(gen.device)
    return state


def set_rng_state(gen: torch.Generator, state: dict) -> None:
    try:
        gen.set_state(state["objective"])
    except RuntimeError as e:
        raise RuntimeError(f"resume: the checkpoint's objective RNG state does not fit a generator on "
                           f"{gen.device} (trained on another device type?): {e}") from e
    torch.set_rng_state(state["torch"])
    if gen.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], gen.device)


# ----------------------------------------------------------------------------------------------------
# The EMA


@torch.no_grad()
def engine_ema_update(engine, ema: enat.ENAT, rate: float) -> None:
    """p_ema = rate * p_ema + (1 - rate) * p (official utils.ema) with p DeepSpeed's fp32 master weight.

    The EMA is a plain float32 module on every rank (DeepSpeed has none; the reuse branch needs its full
    weights). With bf16/fp16 the engine's module holds rounded copies; the official EMA reads the fp32
    weights, so this reads the masters, gathered from their ZeRO-1/2/3 partitions (a collective: every
    rank calls it, parameter by parameter, one full tensor at a time). fp32 engines without separate
    masters (stage 0) train the module's weights themselves.
    """
    if engine.zero_optimization_stage() < 3 and all(p.dtype == torch.float32 for p in engine.module.parameters()):
        # fp32 under ZeRO-0/1/2: the module's weights are the masters (DeepSpeed copies the updated fp32
        # partitions back into them), so read them in place: exact, and no gather per parameter
        enat.ema_update(ema, engine.module, rate)
        return
    names, dst = zip(*ema.named_parameters())
    src = dict(engine.module.named_parameters())
    masters = _local_fp32_masters(engine, [src[n] for n in names])
    if masters is None:
        from deepspeed.utils import safe_get_full_fp32_param
        masters = []
        for name in names:
            p = src[name]
            master = safe_get_full_fp32_param(p)
            if master is None:
                if p.dtype != torch.float32:
                    raise RuntimeError(f"EMA: DeepSpeed keeps no fp32 master weight for {name} ({p.dtype}); "
                                       "train with deepspeed.zero_stage >= 1")
                master = p
            masters.append(master)
    enat.ema_update_tensors(list(dst), [m.to(d.device).reshape(d.shape) for m, d in zip(masters, dst)], rate)


def _local_fp32_masters(engine, params: list) -> Optional[list]:
    """ZeRO-1/2 (and DeepSpeed's bf16 optimizer) in a data-parallel world of one: each parameter's fp32
    master is one whole fragment of this rank's flat fp32 partition, so read it in place (the same
    values `safe_get_full_fp32_param` returns, without its zero-filled buffer and all-reduce per
    parameter). None (use the collective path) with more ranks, under ZeRO-3, or where a parameter has
    no whole local fragment. The choice depends only on the world size, the same on every rank, so no
    rank skips a collective the others make."""
    import torch.distributed as dist
    if engine.zero_optimization_stage() >= 3 or (dist.is_initialized() and dist.get_world_size() != 1):
        return None
    out = []
    for p in params:
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None or mapping.lp_fragment_address.numel != p.numel():
            return None
        out.append(mapping.get_hp_fragment())
    return out


# ----------------------------------------------------------------------------------------------------
# The worker's state: build, restore, save


@dataclass
class TrainState:
    """What one worker trains and what a checkpoint restores. (epoch, epoch_batch) is the data position
    of the next batch: the epoch and the micro-batches of this rank into it."""

    engine: Any
    ema: enat.ENAT
    gen: torch.Generator
    shared_gen: torch.Generator
    rank: int
    step: int = 0
    epoch: int = 0
    epoch_batch: int = 0
    run_id: Optional[str] = None

    @classmethod
    def build(cls, cfg: TrainJobConfig, mcfg: enat.ENATConfig, device: torch.device, rank: int,
              null_text: Optional[np.ndarray] = None) -> "TrainState":
        """The model, its EMA (a copy of DeepSpeed's fp32 masters) and the DeepSpeed engine (AdamW, warmup)."""
        import deepspeed

        torch.manual_seed(rank_seed(cfg.train.seed, rank, INIT_STREAM))
        model = enat.ENAT(mcfg)
        ema = copy.deepcopy(model).eval().requires_grad_(False)
        if mcfg.text_conditioned:
            empty = torch.from_numpy(null_text.astype("float32"))
            model.set_null_text(empty)
            ema.set_null_text(empty)
        opt = make_optimizer(model.parameters(), cfg)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_constant(cfg.optim.warmup_steps))
        if cfg.deepspeed.zero_stage == 3:
            # the head reads the tied word embeddings and its bias outside their modules' forward
            deepspeed.zero.register_external_parameter(model, model.x_embedder.word_embeddings.weight)
            deepspeed.zero.register_external_parameter(model, model.mlm_layer.bias)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                               config=deepspeed_config(cfg))
        ema.to(device)
        # as official (`ema_update(0)`): the EMA starts as a copy of the trained weights, here DeepSpeed's
        # fp32 masters (with bf16/fp16 they are the rounded initial weights)
        engine_ema_update(engine, ema, 0.0)
        gen, shared_gen = generators(cfg.train.seed, rank, device)
        return cls(engine, ema, gen, shared_gen, rank)

    def restore(self, directory: str, accum: int) -> None:
        """Load a checkpoint folder: weights, optimizer, EMA, step, data position, RNG states, run id."""
        _, client = self.engine.load_checkpoint(directory, tag="ckpt")
        self.ema.load_state_dict(torch.load(os.path.join(directory, "ema.pt"), map_location=self.gen.device,
                                           weights_only=True))
        self.step, self.epoch = client["step"], client["epoch"]
        # checkpoints written before "epoch_batch" recorded optimizer steps into the epoch
        self.epoch_batch = client["epoch_batch"] if "epoch_batch" in client else client["epoch_step"] * accum
        self.run_id = client.get("mlflow_run_id")
        if self.rank < len(client["rng"]):
            set_rng_state(self.gen, client["rng"][self.rank])
        self.shared_gen.set_state(client["rng"][0]["shared"])

    def save(self, ctx, cfg: TrainJobConfig, mcfg: enat.ENATConfig) -> str:
        """Every rank: DeepSpeed checkpoint into a fresh local dir, then report it (Ray merges the ranks'
        files); -> the checkpoint's name."""
        import torch.distributed as dist
        name = f"step_{self.step:09d}"
        rngs = [None] * ctx.world_size
        if dist.is_initialized():
            dist.all_gather_object(rngs, rng_state(self.gen, self.shared_gen))
        else:
            rngs = [rng_state(self.gen, self.shared_gen)]
        d = tempfile.mkdtemp(prefix=f"enat-{name}-")
        client = {"step": self.step, "epoch": self.epoch, "epoch_batch": self.epoch_batch, "rng": rngs,
                  "mlflow_run_id": self.run_id}
        self.engine.save_checkpoint(d, tag="ckpt", client_state=client)
        if self.rank == 0:
            torch.save(self.ema.state_dict(), os.path.join(d, "ema.pt"))
            with open(os.path.join(d, "config.json"), "w") as f:
                json.dump({"train": config_to_dict(cfg), "model": mcfg.to_dict(), "step": self.step,
                           "mlflow_run_id": self.run_id}, f, indent=2)
        if dist.is_initialized():
            dist.barrier()
        ctx.report({"step": self.step}, d, name)
        shutil.rmtree(d, ignore_errors=True)
        return name
