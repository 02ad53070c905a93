"""What rank 0 reports: the MLflow run (resumed across restarts), step metrics and the sample grid."""
from __future__ import annotations

import time
from typing import Optional

import torch

import enat
from pipeline import storage, tracking
from pipeline.commits import fingerprint
from pipeline.config import config_to_dict
from pipeline.models import TokenizerSection, build_tokenizer, decode_images
from pipeline.shards import SplitInfo
from pipeline.train.config import TrainJobConfig
from pipeline.train.engine import deepspeed_config


def start_tracking(cfg: TrainJobConfig, mcfg: enat.ENATConfig, run_id: Optional[str]) -> Optional[tracking.Run]:
    """Rank 0's MLflow run (None with mlflow.enabled=false): the one recorded in the checkpoint, else an
    unfinished run of the same run name (a re-submitted job that died before its first checkpoint),
    else a new one. Logs the config, the model config and the DeepSpeed JSON as parameters."""
    if not cfg.mlflow.enabled:
        return None
    experiment = cfg.mlflow.experiment or "enat"
    if run_id is None:
        run_id = tracking.find_running_run(cfg.mlflow.tracking_uri, experiment, "enat_run_name", cfg.train.run_name)
    run = tracking.start_run(cfg.mlflow.tracking_uri, experiment,
                             run_name=cfg.mlflow.run_name or cfg.train.run_name, run_id=run_id,
                             tags={"enat_run_name": cfg.train.run_name, "enat_job": "train"},
                             system_metrics=cfg.mlflow.system_metrics)
    run.log_params({**config_to_dict(cfg), "model_config": mcfg.to_dict(), "deepspeed_config": deepspeed_config(cfg)})
    return run


def flops_per_image(mcfg: enat.ENATConfig) -> float:
    """Training FLOPs per image (forward + backward ~ 3x forward; the reuse branch adds an EMA forward
    half of the time), from the linear layers: 2 * params-in-blocks * tokens, plus attention."""
    D, L = mcfg.dim, mcfg.seq_len + (mcfg.text_len if mcfg.text_conditioned else 0)
    per_token = 2 * mcfg.depth * (22 * D * D) + 2 * (2 * D * D + D * (mcfg.codebook_size + 1))
    attn = 2 * mcfg.depth * 2 * L * D
    fwd = L * (per_token + attn)
    return 3 * fwd + 0.5 * fwd


class Meter:
    """Losses and throughput since the last log line, averaged over every rank when logged."""

    def __init__(self, cfg: TrainJobConfig, mcfg: enat.ENATConfig, rank: int, world_size: int,
                 device: torch.device):
        self.cfg, self.mcfg, self.rank, self.world, self.device = cfg, mcfg, rank, world_size, device
        self.flops_img = flops_per_image(mcfg)
        self.t_last, self.images, self.losses = time.time(), 0, []

    def add(self, loss: torch.Tensor, batch_size: int) -> None:
        """One micro-step of this rank."""
        self.losses.append(loss.detach().float())
        self.images += batch_size * self.world

    def log(self, tracker: Optional[tracking.Run], engine, step: int, epoch: int, last_metrics: dict) -> None:
        """Every rank (the loss is all-reduced); rank 0 prints the line and logs it to MLflow."""
        import torch.distributed as dist
        dt = time.time() - self.t_last
        loss = torch.stack(self.losses).mean()
        if dist.is_initialized():
            dist.all_reduce(loss)
            loss /= self.world
        m = {"loss": loss.item(), "lr": float(engine.get_lr()[0]), "img_per_s": self.images / dt,
             "tokens_per_s": self.images * self.mcfg.seq_len / dt, "epoch": float(epoch),
             "mask_acc": last_metrics["mask_acc"].item(),
             "tflops_per_device": self.flops_img * self.images / dt / self.world / 1e12}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            m["grad_norm"] = float(grad_norm)
        if self.cfg.mlflow.peak_tflops:
            m["mfu"] = m["tflops_per_device"] / self.cfg.mlflow.peak_tflops
        if self.device.type == "cuda":
            m["gpu_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
        if self.rank == 0:
            print(f"[train] step {step}/{self.cfg.train.steps} " + " ".join(f"{k} {v:.4g}" for k, v in m.items()),
                  flush=True)
        if tracker:
            tracker.log_metrics(m, step)
        self.t_last, self.images, self.losses = time.time(), 0, []


@torch.no_grad()
def log_grid(tracker: tracking.Run, ema: enat.ENAT, mcfg: enat.ENATConfig, cfg: TrainJobConfig, dataset: dict,
             step: int, prompts: Optional[dict] = None) -> None:
    """A sample grid from the EMA model, decoded through the dataset's tokenizer: 4 samples of each of
    ``mlflow.grid_classes`` (class models), or of each fixed caption of ``prompts`` (text models; the
    captions are logged beside the grid as ``samples/captions.json``)."""
    if mcfg.text_conditioned and not prompts:
        return
    t = dataset["tokenizer"]
    section = TokenizerSection(kind=t["kind"], weights=t.get("weights"), preset=t.get("preset") or "mage-f16",
                               seed=t.get("seed") or 0)
    try:
        tok = build_tokenizer(section, cfg.storage)[0]
    except Exception as e:  # a grid is a convenience: never fail training over it
        print(f"[train] no sample grid: {e}", flush=True)
        return
    device = next(ema.parameters()).device
    if mcfg.text_conditioned:
        cond = prompts["context"].to(device).float().repeat_interleave(4, dim=0)
        tracker.log_dict({"step": step, "captions": prompts["captions"], "samples_per_caption": 4},
                         "samples/captions.json")
    else:
        classes = [c for c in cfg.mlflow.grid_classes if c < mcfg.num_classes] or [0]
        cond = torch.tensor(classes, device=device).repeat_interleave(4)
    toks = enat.generate(ema, cond, enat.SamplerConfig(), generator=torch.Generator(device).manual_seed(0))
    g = mcfg.grid
    imgs = decode_images(tok.to(device), toks.view(-1, g, g), None).clamp(0, 1).cpu()
    tracker.log_grid(imgs, nrow=4, key="samples", step=step)


def grid_prompts(cfg: TrainJobConfig, batch: dict) -> Optional[dict]:
    """The text grid's fixed captions: the first non-empty captions of the first batch (and their
    features), so every grid of a run shows the same prompts."""
    if "caption" not in batch:
        return None
    keep = [i for i, c in enumerate(batch["caption"]) if c][:cfg.mlflow.grid_captions]
    if not keep:
        return None
    return {"captions": [batch["caption"][i] for i in keep], "context": batch["context"][keep].clone()}


def log_dataset(tracker: tracking.Run, cfg: TrainJobConfig, split: SplitInfo) -> None:
    """The token split as the run's training input (MLflow lineage): where it is, the digest of its
    manifest (every shard's sha256), its size and the tokenizer that made it."""
    ds = split.dataset
    tok = ds.get("tokenizer") or {}
    digest = fingerprint([row["sha256"] for row in split.shards])
    tracker.log_dataset(f"{cfg.data.root.rstrip('/').rsplit('/', 1)[-1]}/{cfg.data.split}", cfg.data.root, digest,
                        "train", {"split": cfg.data.split, "num_samples": split.samples,
                                  "resolution": ds.get("resolution"), "seq_len": ds.get("seq_len"),
                                  "tokenizer": {k: tok.get(k) for k in ("kind", "preset", "weights_sha256")},
                                  "source": (ds.get("source") or {}).get("root")})


def finish(tracker: tracking.Run, cfg: TrainJobConfig, mcfg: enat.ENATConfig, split: SplitInfo, step: int,
           ckpt_name: Optional[str]) -> None:
    """Tag the run with the final EMA checkpoint, register it in the model registry (``mlflow.register``)
    and end the run."""
    final = storage.join(cfg.output.uri, cfg.train.run_name, ckpt_name or "", "ema.pt")
    tracker.set_tags({"final_ema_checkpoint": storage.redact(final), "final_step": str(step)})
    if cfg.mlflow.register and ckpt_name:
        name = cfg.mlflow.model_name or cfg.train.run_name
        version = tracker.register_checkpoint(name, final, step, registry_metadata(cfg, mcfg, split),
                                              tuple(cfg.mlflow.aliases))
        print(f"[train] registered models:/{name}/{version} -> {storage.redact(final)}", flush=True)
    tracker.end()


def registry_metadata(cfg: TrainJobConfig, mcfg: enat.ENATConfig, split: SplitInfo) -> dict:
    """What a registered version records besides its weights: the model config, the tokenizer and the
    token dataset it was trained on."""
    tok = split.dataset.get("tokenizer") or {}
    return {"model_config": mcfg.to_dict(),
            "tokenizer": {k: tok.get(k) for k in ("kind", "preset", "weights", "weights_sha256")},
            "dataset": {"uri": cfg.data.root, "split": cfg.data.split,
                        "digest": fingerprint([row["sha256"] for row in split.shards])}}
