"""Distributed ENAT training: DeepSpeed engines under Ray Train (or a torchrun/deepspeed launcher).

One train loop (`train_loop`) serves both launchers; what differs is a small context object:
`RayContext` (Ray Train: ranks from the train context, checkpoints reported with `ray.train.report`,
resume from `ray.train.get_checkpoint()`) and `LocalContext` (torchrun / the `deepspeed` launcher:
ranks from the environment, checkpoints written to the checkpoint URL through fsspec). Only rank 0 talks
to MLflow. The recipe defaults are the paper's (enat-facts §5).

Checkpoint layout (one folder per checkpoint, stable names `step_000010000`):
    <DeepSpeed files>            every rank's engine.save_checkpoint (model + ZeRO optimizer shards)
    ema.pt                       the EMA weights, plain state dict in the official key layout
                                 (`ENAT.from_official` loads it for sampling)
    config.json                  the resolved train config and the model config
client_state (inside the DeepSpeed files): step, data position, RNG states, MLflow run id.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Literal, Optional

import torch

import enat
from enat.objective import ObjectiveConfig, warmup_constant
from pipeline import storage
from pipeline.config import RayConfig, ReaderConfig, StorageConfig, config_to_dict, location

# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainReaderConfig(ReaderConfig):
    """The token reader with the official training defaults: label/caption drop p_uncond 0.15
    (official CFGDataset) and a random plain/flipped choice per sample and epoch."""

    p_uncond: float = 0.15


@dataclass(frozen=True)
class ModelSection:
    """The architecture: a preset (enat-facts §3) with optional overrides (tiny models for tests).

    seq_len, codebook_size and num_classes come from the token dataset's dataset.json.
    """

    preset: str = "enat-l"
    encoder_depth: Optional[int] = None
    decoder_depth: Optional[int] = None
    dim: Optional[int] = None
    num_heads: Optional[int] = None
    text_dim: Optional[int] = None      # text conditioning (COCO): taken from the dataset when it has text

    def __post_init__(self) -> None:
        if self.preset not in enat.ENATConfig.presets():
            raise ValueError(f"preset: unknown ENAT preset {self.preset!r}; known: {', '.join(enat.ENATConfig.presets())}")


@dataclass(frozen=True)
class OptimSection:
    """AdamW with linear warmup then constant lr (official: betas 0.99/0.99, wd 0.03 on all params)."""

    lr: float = 4e-4                    # at global batch 2048 (256 px); 1e-4 at 512 for 512 px
    betas: tuple[float, float] = (0.99, 0.99)
    weight_decay: float = 0.03
    eps: float = 1e-8
    warmup_steps: int = 5000
    grad_clip: float = 0.0              # 0 = no clipping (official: the grad norm is only logged)

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas: must lie in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise ValueError("warmup_steps, grad_clip and weight_decay must be >= 0")


@dataclass(frozen=True)
class DeepSpeedSection:
    zero_stage: int = 1                 # 1: ENAT-L fits per GPU and the reuse branch needs full EMA weights
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    micro_batch: Optional[int] = None   # per worker and micro-step; default: global_batch / workers
    extra: Optional[dict] = None        # merged into the generated DeepSpeed JSON (expert knobs)

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch: must be >= 1, got {self.micro_batch}")
        if self.precision == "fp16" and self.zero_stage == 0:
            raise ValueError("deepspeed.zero_stage: fp16 needs ZeRO stage >= 1 (the EMA follows DeepSpeed's "
                             "fp32 master weights, which its stage-0 fp16 optimizer does not expose); "
                             "set deepspeed.zero_stage=1")


@dataclass(frozen=True)
class ScalingSection:
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2               # Ray Train restarts lost workers this many times

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"num_workers: must be >= 1, got {self.num_workers}")


@dataclass(frozen=True)
class CheckpointSection:
    uri: str = location("runs/checkpoints")       # storage URL (s3://..., file://..., a path); run_name is appended
    every: int = 1000                   # steps; also one at the end
    keep_last: int = 3


@dataclass(frozen=True)
class MLflowSection:
    tracking_uri: Optional[str] = location(None)  # default: $MLFLOW_TRACKING_URI, else a local sqlite store
    experiment: str = "enat"
    system_metrics: bool = True
    grid_every: int = 0                 # steps between sample grids (0: only at the end)
    grid_classes: tuple[int, ...] = tuple(range(8))
    peak_tflops: float = 0.0            # per device; MFU is logged when set (e.g. 989 for H100 bf16 dense)


@dataclass(frozen=True)
class TrainSection:
    run_name: str = "enat"
    global_batch: int = 2048
    steps: int = 500_000
    ema_rate: float = 0.9999
    seed: int = 1234
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.global_batch < 1 or self.steps < 1 or self.log_every < 1:
            raise ValueError("global_batch, steps and log_every must be >= 1")
        if not 0 <= self.ema_rate < 1:
            raise ValueError(f"ema_rate: must lie in [0, 1), got {self.ema_rate}")
        if not self.run_name or "/" in self.run_name:
            raise ValueError(f"run_name: must be a non-empty name without '/', got {self.run_name!r}")


@dataclass(frozen=True)
class TrainJobConfig:
    """`python -m jobs.train --config x.yaml [section.field=value ...]`."""

    data: TrainReaderConfig = field(default_factory=TrainReaderConfig)
    model: ModelSection = field(default_factory=ModelSection)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    mlflow: MLflowSection = field(default_factory=MLflowSection)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    launcher: Literal["ray", "torchrun"] = "ray"

    def __post_init__(self) -> None:
        if not self.data.root:
            raise ValueError("data.root: the token dataset URL (written by `enat tokenize`) is required")
        micro, accum = batch_split(self)
        if micro * accum * self.scaling.num_workers != self.train.global_batch:
            raise ValueError(
                f"train.global_batch: {self.train.global_batch} is not micro_batch ({micro}) x gradient "
                f"accumulation ({accum}) x workers ({self.scaling.num_workers}); pick a global batch "
                "divisible by the worker count, or set deepspeed.micro_batch to a divisor")


def batch_split(cfg: TrainJobConfig) -> tuple[int, int]:
    """-> (micro batch per worker, gradient accumulation steps) that make up the global batch."""
    per_worker = cfg.train.global_batch // cfg.scaling.num_workers
    micro = cfg.deepspeed.micro_batch or per_worker
    return micro, max(1, per_worker // micro)


def deepspeed_config(cfg: TrainJobConfig) -> dict[str, Any]:
    """The DeepSpeed JSON, generated from the train config (one source of truth)."""
    micro, accum = batch_split(cfg)
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "gradient_clipping": cfg.optim.grad_clip,
        "steps_per_print": 10 ** 9,        # we log ourselves
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


def model_config(cfg: TrainJobConfig, dataset: dict) -> enat.ENATConfig:
    """The preset with overrides, sized to the token dataset (grid, codebook, classes, text)."""
    base = enat.ENATConfig.preset(cfg.model.preset)
    over = {k: v for k, v in asdict(cfg.model).items() if k != "preset" and v is not None}
    over.update(seq_len=int(dataset["seq_len"]), codebook_size=int(dataset["codebook_size"]))
    if dataset.get("num_classes"):
        over["num_classes"] = int(dataset["num_classes"])
    text = dataset.get("text")
    if text:
        over.setdefault("text_dim", int(text["dim"]))
        over["text_len"] = int(text.get("length", 77))
    return replace(base, **over)


# ----------------------------------------------------------------------------------------------------
# Contexts: Ray Train vs a plain launcher
# ----------------------------------------------------------------------------------------------------


class RayContext:
    """Ranks and checkpoints through Ray Train."""

    def __init__(self) -> None:
        import ray.train
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    def restore(self) -> Optional[str]:
        """A local directory holding the latest reported checkpoint, or None."""
        import ray.train
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return ckpt.to_directory()

    def report(self, metrics: dict, ckpt_dir: Optional[str], name: Optional[str]) -> None:
        import ray.train
        from ray.train import Checkpoint
        if ckpt_dir is None:
            ray.train.report(metrics)
        else:
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(ckpt_dir), checkpoint_dir_name=name)


class LocalContext:
    """torchrun / deepspeed launcher: ranks from the environment, checkpoints straight to storage."""

    def __init__(self, cfg: TrainJobConfig) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.cfg = cfg
        self.root = storage.join(cfg.checkpoint.uri, cfg.train.run_name)

    def _fs(self):
        return storage.filesystem(self.root, self.cfg.storage)

    def restore(self) -> Optional[str]:
        fs, path = self._fs()
        storage.invalidate(fs, path)
        names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in (fs.ls(path, detail=False) if fs.exists(path) else [])
                       if p.rstrip("/").rsplit("/", 1)[-1].startswith("step_"))
        complete = [n for n in names if fs.exists(f"{path}/{n}/COMPLETE")]
        if not complete:
            return None
        local = tempfile.mkdtemp(prefix="enat-restore-")
        fs.get(f"{path}/{complete[-1]}/", local + "/", recursive=True)
        return local

    def report(self, metrics: dict, ckpt_dir: Optional[str], name: Optional[str]) -> None:
        if ckpt_dir is None:
            return
        import torch.distributed as dist
        fs, path = self._fs()
        fs.put(ckpt_dir.rstrip("/") + "/", f"{path}/{name}/", recursive=True)
        if dist.is_initialized():
            dist.barrier()
        if self.rank == 0:   # a checkpoint counts only once every rank uploaded its files
            fs.pipe(f"{path}/{name}/COMPLETE", b"")
            keep = self.cfg.checkpoint.keep_last
            storage.invalidate(fs, path)
            old = sorted(p for p in fs.ls(path, detail=False) if p.rstrip("/").rsplit("/", 1)[-1].startswith("step_"))
            for p in old[:-keep] if keep > 0 else []:
                fs.rm(p, recursive=True)


# ----------------------------------------------------------------------------------------------------
# The train loop (runs on every worker)
# ----------------------------------------------------------------------------------------------------


def generators(seed: int, rank: int, device: torch.device | str) -> tuple[torch.Generator, torch.Generator]:
    """-> (the objective's generator on `device`, per rank; the reuse coin's generator, the same on
    every rank). The objective draws masks on the tokens' device, so its generator lives there; the
    coin decides a Python branch, so it is drawn on the CPU (no host sync in the step loop)."""
    gen = torch.Generator(device).manual_seed(seed * 1000 + rank)
    shared = torch.Generator("cpu").manual_seed(seed)
    return gen, shared


def _rng_state(gen: torch.Generator, shared: torch.Generator) -> dict:
    """Every RNG state a resume restores (a CUDA generator's state is a CPU ByteTensor too)."""
    state = {"objective": gen.get_state(), "shared": shared.get_state(), "torch": torch.get_rng_state()}
    if gen.device.type == "cuda":   # dropout draws from the device's default generator
        state["cuda"] = torch.cuda.get_rng_state(gen.device)
    return state


def _set_rng_state(gen: torch.Generator, state: dict) -> None:
    try:
        gen.set_state(state["objective"])
    except RuntimeError as e:
        raise RuntimeError(f"resume: the checkpoint's objective RNG state does not fit a generator on "
                           f"{gen.device} (trained on another device type?): {e}") from e
    torch.set_rng_state(state["torch"])
    if gen.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], gen.device)


def _with_position(reader) -> Iterator[tuple[dict, tuple[int, int]]]:
    """One epoch of `reader`'s batches, each with the data position after it: (epoch, micro-batch) of
    the next batch, and (epoch + 1, 0) after an epoch's last batch, so a resume from a checkpoint
    taken there starts the next epoch instead of replaying this one (a stream's length is known only
    when it ends: the next batch is fetched before the current one is handed out)."""
    it = iter(reader)
    batch = next(it, None)
    while batch is not None:
        pos = (reader.epoch, reader.step)
        nxt = next(it, None)
        if nxt is None:                       # the reader moved on to (epoch + 1, 0)
            pos = (reader.epoch, reader.step)
        yield batch, pos
        batch = nxt


def _flops_per_image(mcfg: enat.ENATConfig) -> float:
    """Training FLOPs per image (forward + backward ~ 3x forward; the reuse branch adds an EMA forward
    half of the time), from the linear layers: 2 * params-in-blocks * tokens, plus attention."""
    D, L = mcfg.dim, mcfg.seq_len + (mcfg.text_len if mcfg.text_conditioned else 0)
    per_token = 2 * mcfg.depth * (22 * D * D) + 2 * (2 * D * D + D * (mcfg.codebook_size + 1))
    attn = 2 * mcfg.depth * 2 * L * D
    fwd = L * (per_token + attn)
    return 3 * fwd + 0.5 * fwd


def train_loop(config: dict) -> None:
    """Per-worker entry (Ray Train's `train_loop_per_worker`, or called directly under torchrun)."""
    from pipeline.config import load_config
    cfg = load_config(TrainJobConfig, config["config"])
    ctx = LocalContext(cfg) if cfg.launcher == "torchrun" else RayContext()
    _train(cfg, ctx)


def _train(cfg: TrainJobConfig, ctx) -> None:
    import deepspeed
    import torch.distributed as dist

    from pipeline.readers import make_reader
    from pipeline.shards import open_split

    rank, world = ctx.rank, ctx.world_size
    use_cuda = torch.cuda.is_available() and cfg.scaling.use_gpu
    device = torch.device(f"cuda:{ctx.local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")

    dataset = open_split(cfg.data.root, cfg.data.split, cfg.storage).dataset
    mcfg = model_config(cfg, dataset)
    micro, accum = batch_split(cfg)
    torch.manual_seed(cfg.train.seed + rank)
    model = enat.ENAT(mcfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)           # official: ema_update(0) = copy
    if mcfg.text_conditioned:
        empty = _empty_context(cfg, dataset)
        model.set_null_text(empty)
        ema.set_null_text(empty)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas,
                            eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay)
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

    # data position: (epoch, micro-batches of this rank into it) of the next batch
    step, epoch, epoch_batch, run_id = 0, 0, 0, None
    restore_dir = ctx.restore()
    if restore_dir is not None:
        _, client = engine.load_checkpoint(restore_dir, tag="ckpt")
        ema.load_state_dict(torch.load(os.path.join(restore_dir, "ema.pt"), map_location=device))
        step, epoch = client["step"], client["epoch"]
        # checkpoints written before "epoch_batch" recorded optimizer steps into the epoch
        epoch_batch = client["epoch_batch"] if "epoch_batch" in client else client["epoch_step"] * accum
        run_id = client.get("mlflow_run_id")
        if rank < len(client["rng"]):
            _set_rng_state(gen, client["rng"][rank])
        shared_gen.set_state(client["rng"][0]["shared"])
        if rank == 0:
            print(f"[train] resumed from step {step} (epoch {epoch}, batch {epoch_batch})", flush=True)

    tracker = None
    if rank == 0:
        tracker = _start_tracking(cfg, run_id)
        run_id = tracker.run_id
        tracker.log_params({**config_to_dict(cfg), "model_config": mcfg.to_dict(),
                            "deepspeed_config": deepspeed_config(cfg)})
    # each rank reads its own slice; (epoch, batch) is the whole data position, so resume is exact
    reader = make_reader(replace(cfg.data, batch_size=micro), rank=rank, world_size=world,
                         storage_cfg=cfg.storage, epoch=epoch, step=epoch_batch)
    flops_img = _flops_per_image(mcfg)
    t_last, imgs_since, losses = time.time(), 0, []
    ckpt_name, micro_i = None, 0
    while step < cfg.train.steps:
        for batch, position in _with_position(reader):
            tokens = batch["tokens"].to(device, non_blocking=True)
            cond = batch["context"].to(device) if mcfg.text_conditioned else batch["label"].to(device)
            engine.train()
            # differs from official (one coin per process): all ranks take the reuse branch together.
            # DeepSpeed ZeRO reduces gradients in buckets in the order they become ready, so every
            # rank must run the same graph (the official DDP has static buckets).
            reuse = bool(torch.rand(1, generator=shared_gen).item() < cfg.objective.reuse_prob)
            loss, metrics = enat.lsimple(engine, tokens, cond, ema, cfg.objective, gen, reuse=reuse)
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
            micro_i += 1
            imgs_since += tokens.shape[0] * world
            if micro_i % accum:
                continue
            step += 1
            epoch, epoch_batch = position
            engine_ema_update(engine, ema, cfg.train.ema_rate)
            last = step >= cfg.train.steps
            if step % cfg.train.log_every == 0 or last:
                dt = time.time() - t_last
                loss_v = torch.stack(losses).mean()
                if dist.is_initialized():
                    dist.all_reduce(loss_v)
                    loss_v /= world
                m = {"loss": loss_v.item(), "lr": float(engine.get_lr()[0]), "img_per_s": imgs_since / dt,
                     "tokens_per_s": imgs_since * mcfg.seq_len / dt, "epoch": float(epoch),
                     "mask_acc": metrics["mask_acc"].item(),
                     "tflops_per_device": flops_img * imgs_since / dt / world / 1e12}
                gn = engine.get_global_grad_norm()
                if gn is not None:
                    m["grad_norm"] = float(gn)
                if cfg.mlflow.peak_tflops:
                    m["mfu"] = m["tflops_per_device"] / cfg.mlflow.peak_tflops
                if use_cuda:
                    m["gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2 ** 30
                if tracker:
                    tracker.log_metrics(m, step)
                    print(f"[train] step {step}/{cfg.train.steps} " + " ".join(
                        f"{k} {v:.4g}" for k, v in m.items()), flush=True)
                t_last, imgs_since, losses = time.time(), 0, []
            if tracker and cfg.mlflow.grid_every and (step % cfg.mlflow.grid_every == 0 or last):
                _log_grid(tracker, ema, mcfg, cfg, dataset, step)
            if step % cfg.checkpoint.every == 0 or last:
                ckpt_name = f"step_{step:09d}"
                _save(engine, ema, ctx, cfg, mcfg, step, epoch, epoch_batch, (gen, shared_gen), run_id, ckpt_name,
                      {"step": step})
            if last:
                break
    if tracker:
        if not cfg.mlflow.grid_every:
            _log_grid(tracker, ema, mcfg, cfg, dataset, step)
        final = storage.join(cfg.checkpoint.uri, cfg.train.run_name, ckpt_name or "", "ema.pt")
        tracker.set_tags({"final_ema_checkpoint": storage.redact(final), "final_step": str(step)})
        tracker.end()


def _empty_context(cfg: TrainJobConfig, dataset: dict) -> torch.Tensor:
    import io
    import numpy as np
    name = dataset["text"].get("empty_context", "empty_context.npy")
    fs, path = storage.filesystem(storage.join(cfg.data.root, name), cfg.storage)
    return torch.from_numpy(np.load(io.BytesIO(fs.cat_file(path))).astype("float32"))


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
    from deepspeed.utils import safe_get_full_fp32_param
    src = dict(engine.module.named_parameters())
    for name, p_ema in ema.named_parameters():
        p = src[name]
        master = safe_get_full_fp32_param(p)
        if master is None:
            if p.dtype != torch.float32:
                raise RuntimeError(f"EMA: DeepSpeed keeps no fp32 master weight for {name} ({p.dtype}); "
                                   "train with deepspeed.zero_stage >= 1")
            master = p
        p_ema.mul_(rate).add_(master.to(p_ema.device).reshape(p_ema.shape), alpha=1 - rate)


def _save(engine, ema, ctx, cfg: TrainJobConfig, mcfg, step, epoch, epoch_batch, gens, run_id, name, metrics) -> None:
    """Every rank: DeepSpeed checkpoint into a fresh local dir, then report it (Ray merges the ranks' files)."""
    import torch.distributed as dist
    rngs = [None] * ctx.world_size
    if dist.is_initialized():
        dist.all_gather_object(rngs, _rng_state(*gens))
    else:
        rngs = [_rng_state(*gens)]
    d = tempfile.mkdtemp(prefix=f"enat-{name}-")
    client = {"step": step, "epoch": epoch, "epoch_batch": epoch_batch, "rng": rngs, "mlflow_run_id": run_id}
    engine.save_checkpoint(d, tag="ckpt", client_state=client)
    if ctx.rank == 0:
        torch.save(ema.state_dict(), os.path.join(d, "ema.pt"))
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"train": config_to_dict(cfg), "model": mcfg.to_dict(), "step": step}, f, indent=2)
    if dist.is_initialized():
        dist.barrier()
    ctx.report(metrics, d, name)
    shutil.rmtree(d, ignore_errors=True)


@torch.no_grad()
def _log_grid(tracker, ema: enat.ENAT, mcfg: enat.ENATConfig, cfg: TrainJobConfig, dataset: dict, step: int) -> None:
    """A sample grid from the EMA model, decoded through the dataset's tokenizer (class models)."""
    if mcfg.text_conditioned:
        return
    try:
        tok = _dataset_tokenizer(cfg, dataset)
    except Exception as e:   # a grid is a convenience: never fail training over it
        print(f"[train] no sample grid: {e}", flush=True)
        return
    device = next(ema.parameters()).device
    classes = [c for c in cfg.mlflow.grid_classes if c < mcfg.num_classes] or [0]
    labels = torch.tensor(classes, device=device).repeat_interleave(4)
    toks = enat.generate(ema, labels, enat.SamplerConfig(), generator=torch.Generator(device).manual_seed(0))
    g = mcfg.grid
    imgs = tok.to(device).decode(toks.view(-1, g, g)).clamp(0, 1).cpu()
    tracker.log_grid(imgs, nrow=4, key="samples", step=step)


def _dataset_tokenizer(cfg: TrainJobConfig, dataset: dict):
    from pipeline.config import TokenizerConfig
    from pipeline.tokenize import build_tokenizer
    t = dataset["tokenizer"]
    tcfg = TokenizerConfig(kind=t["kind"], weights=t.get("weights"), preset=t.get("preset") or "mage-f16",
                           seed=t.get("seed") or 0)
    return build_tokenizer(tcfg, cfg.storage)[0]


# ----------------------------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------------------------


def run_ray(cfg: TrainJobConfig) -> Any:
    """Run training under Ray Train; returns Ray's Result. Resumes automatically from the latest
    checkpoint of the same run name in storage, and restarts lost workers (`scaling.max_failures`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipeline.cluster import worker_env
    fs, path = storage.filesystem(cfg.checkpoint.uri, cfg.storage)
    storage_fs = None
    if not storage.is_local(fs):
        import pyarrow.fs as pafs
        storage_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    else:
        path = os.path.abspath(path)
    env = {**worker_env()}
    if not cfg.scaling.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": config_to_dict(cfg)},
        torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last or None),
                             worker_runtime_env={"env_vars": env}),
    )
    return trainer.fit()


def _start_tracking(cfg: TrainJobConfig, run_id: Optional[str]):
    """Rank 0's MLflow run: the one recorded in the checkpoint, else an unfinished run of the same
    run name (a re-submitted job that died before its first checkpoint), else a new one."""
    from pipeline import tracking
    if run_id is None:
        import mlflow
        mlflow.set_tracking_uri(tracking.tracking_uri(cfg.mlflow.tracking_uri))
        exp = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
        if exp is not None:
            found = mlflow.MlflowClient().search_runs(
                [exp.experiment_id], f"tags.enat_run_name = '{cfg.train.run_name}' and attributes.status = 'RUNNING'",
                max_results=1, order_by=["attributes.start_time DESC"])
            run_id = found[0].info.run_id if found else None
    return tracking.start_run(cfg.mlflow.tracking_uri, cfg.mlflow.experiment, run_name=cfg.train.run_name,
                              run_id=run_id, tags={"enat_run_name": cfg.train.run_name, "enat_job": "train"},
                              system_metrics=cfg.mlflow.system_metrics)
