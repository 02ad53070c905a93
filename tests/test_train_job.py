"""jobs.train without Ray: the torchrun launcher (resume from the newest intact checkpoint, damaged ones
named and skipped; ZeRO-3 with gradient accumulation on two processes), config errors before any worker, presets and the DeepSpeed JSON. Training
under Ray Train (two nodes, S3, the MLflow server, a worker killed and resumed) is the shared world's:
tests/test_world.py."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import enat
from pipeline.config import ConfigError
from tests.services import HANG_GUARD_S, child_env, free_port
from tests.train_data import write_shapes_dataset

COMMON = ["model.preset=enat-s", "model.encoder_depth=2", "model.decoder_depth=1", "model.dim=64",
          "model.num_heads=4", "optim.lr=0.002", "optim.warmup_steps=5", "train.global_batch=32",
          "train.steps=40", "train.ema_rate=0.9", "train.log_every=5", "deepspeed.precision=fp32",
          "compute.workers=2", "output.checkpoint_every=10", "mlflow.system_metrics=false"]


def _train(argv):
    from jobs.train import main
    return main(argv)


@pytest.mark.parametrize("override,match", [
    (["train.global_batch=33"], "global_batch"),
    (["optim.lr=-1"], "lr"),
    (["model.preset=enat-xl"], "unknown ENAT preset"),
    (["train.stepz=3"], "stepz"),
    (["deepspeed.zero_stage=4"], "zero_stage"),
    (["deepspeed.precision=fp16", "deepspeed.zero_stage=0"], "fp16 needs ZeRO stage >= 1"),
    (["optim.lr=fast"], "optim.lr"),
])
def test_bad_config_fails_before_any_worker(tmp_path, override, match):
    root = str(tmp_path / "tok")
    with pytest.raises((ConfigError, ValueError), match=match):
        _train(COMMON + [f"data.root={root}"] + override)


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.root: .*dataset.json: not found"):
        _train(COMMON + [f"data.root={tmp_path / 'nope'}"])


def test_official_lr_schedule_and_deepspeed_json():
    from pipeline.config import load_config
    from pipeline.train import TrainJobConfig, deepspeed_config
    f = enat.warmup_constant(5000)          # the one warmup (tests/test_objective.py pins it to official)
    assert [f(k) for k in (0, 1, 2, 5001, 10 ** 6)] == [0.0, 0.0, 1 / 5000, 1.0, 1.0]
    cfg = load_config(TrainJobConfig, {"data": {"root": "x"}}, ["compute.workers=16", "deepspeed.micro_batch=64"])
    ds = deepspeed_config(cfg)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2048, 64, 2)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 1
    assert cfg.data.p_uncond == 0.15 and cfg.optim.betas == (0.99, 0.99) and cfg.optim.weight_decay == 0.03
    assert cfg.train.ema_rate == 0.9999 and cfg.train.steps == 500_000 and cfg.optim.warmup_steps == 5000


@pytest.mark.parametrize("old,new", [("scaling.num_workers=2", "compute.workers"),
                                     ("scaling.use_gpu=true", "compute.gpus_per_worker"),
                                     ("checkpoint.every=10", "output.checkpoint_every")])
def test_old_override_is_rejected_naming_the_new_key(tmp_path, old, new):
    with pytest.raises(ConfigError, match=f"renamed to {new}"):
        _train([f"data.root={tmp_path / 'tok'}", old])


def test_old_section_in_yaml_is_rejected_naming_the_new_key(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(f"data: {{root: {tmp_path / 'tok'}}}\ncheckpoint: {{uri: s3://ckpt}}\n")
    with pytest.raises(ConfigError, match="checkpoint.uri: renamed to output.uri"):
        _train(["--config", str(path)])


@pytest.mark.parametrize("preset,yaml_name", [("imagenet-256", "train-imagenet256-enat-l.yaml"),
                                              ("imagenet-512", "train-imagenet512-enat-l.yaml"),
                                              ("coco-256", "train-coco-enat-b.yaml")])
def test_presets_are_the_recipes_of_infra_configs(preset, yaml_name):
    """`--preset NAME` parses for train and gives infra/configs' recipe (which adds storage locations and,
    for ImageNet 256, the H100's peak TFLOP/s)."""
    from dataclasses import replace

    from jobs.train import parse_args
    from pipeline.config import load_config
    from pipeline.train import TrainJobConfig
    cfg = parse_args(["--preset", preset, "data.root=s3://tok", "output.uri=s3://ckpt"])
    ref = load_config(TrainJobConfig, Path(__file__).resolve().parents[1] / "infra" / "configs" / yaml_name)
    ref = replace(ref, data=replace(ref.data, root="s3://tok"), output=replace(ref.output, uri="s3://ckpt"),
                  mlflow=replace(ref.mlflow, peak_tflops=0.0))
    assert cfg == ref
    assert cfg.compute.gpus_per_worker == 1 and cfg.deepspeed.precision == "bf16"


def test_preset_imagenet_256_with_overrides():
    from jobs.train import parse_args
    cfg = parse_args(["--preset", "imagenet-256", "data.root=s3://tok", "compute.workers=8"])
    assert (cfg.train.global_batch, cfg.optim.lr, cfg.train.steps, cfg.model.preset) == (2048, 4e-4, 500_000, "enat-l")
    assert cfg.compute.workers == 8 and cfg.data.p_uncond == 0.15 and cfg.mlflow.experiment == "enat/imagenet256"


def test_torchrun_launcher_without_ray(tmp_path, monkeypatch):
    root = str(tmp_path / "tok")
    write_shapes_dataset(root, n=192, per_shard=96)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    code = ("from jobs.train import main; import sys; main(sys.argv[1:])")
    args = COMMON + [f"data.root={root}", "compute.workers=1", "train.steps=6", "launcher=torchrun",
                     f"output.uri={tmp_path / 'ckpt'}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=HANG_GUARD_S,
                       env={**child_env()}, cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "ckpt" / "enat" / "step_000000006" / "manifest.json").exists()
    # a second invocation resumes from step 6 and trains to 8
    r = subprocess.run([sys.executable, "-c", code, *args[:-4], "train.steps=8", *args[-3:]],
                       capture_output=True, text=True, timeout=HANG_GUARD_S, env={**child_env()},
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr[-3000:]
    # 6 steps of 32 are one epoch of the 192 samples: the resume starts the next epoch, no replay
    assert "resumed from step 6 (epoch 1, batch 0)" in r.stdout
    assert (tmp_path / "ckpt" / "enat" / "step_000000008" / "ema.pt").exists()


def test_zero3_with_gradient_accumulation_two_processes(tmp_path):
    """ZeRO-3 (parameters partitioned: the EMA update gathers them) with 2 micro-steps per step, on two
    processes started by torch's own launcher (the no-Ray path)."""
    root = str(tmp_path / "tok")
    write_shapes_dataset(root)
    args = COMMON + [f"data.root={root}", "launcher=torchrun", "deepspeed.zero_stage=3", "deepspeed.micro_batch=8",
                     "train.steps=6", "output.checkpoint_every=6", f"output.uri={tmp_path / 'ckpt'}",
                     f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db", "train.log_every=3"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), "-m", "jobs.train", *args],
                       capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=str(Path(__file__).resolve().parents[1]),
                       env={**child_env(), "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 6/6" in r.stdout
    ckpt = tmp_path / "ckpt" / "enat" / "step_000000006"
    assert (ckpt / "manifest.json").exists()
    ema = torch.load(ckpt / "ema.pt")
    assert ema["blocks.0.attn.q.weight"].shape == (64, 64)             # full (gathered) EMA weights


def _torchrun_job(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**child_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}
    return subprocess.run([sys.executable, "-m", "jobs.train", *args], capture_output=True, text=True,
                          timeout=HANG_GUARD_S, env=env, cwd=str(Path(__file__).resolve().parents[1]))


def test_damaged_or_missing_checkpoints_fall_back_to_the_newest_intact_one(tmp_path):
    """Checkpoints at steps 2, 4, 6 (each committed by its manifest). The newest one's ema.pt cut in half and
    the one before it without its DeepSpeed model states: the rerun names both and resumes from step 2,
    and its step-6 EMA equals the uninterrupted run's. An explicit output.resume_from sets newer ones
    aside; with every checkpoint damaged the job ends in one line (exit 2) instead of starting over."""
    root = str(tmp_path / "tok")
    write_shapes_dataset(root, n=64, per_shard=32)
    ckpt = tmp_path / "ckpt" / "enat"
    args = COMMON + [f"data.root={root}", "compute.workers=1", "launcher=torchrun", "train.global_batch=16",
                     "train.steps=6", "output.checkpoint_every=2", "output.keep_last=0", "train.log_every=1",
                     f"output.uri={tmp_path / 'ckpt'}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    r = _torchrun_job(args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == ["step_000000002", "step_000000004", "step_000000006"], names
    reference = torch.load(ckpt / "step_000000006" / "ema.pt", weights_only=True)

    ema = ckpt / "step_000000006" / "ema.pt"
    ema.write_bytes(ema.read_bytes()[: ema.stat().st_size // 2])
    (ckpt / "step_000000004" / "ckpt" / "mp_rank_00_model_states.pt").unlink()
    r = _torchrun_job(args, tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step_000000006: ema.pt has" in r.stdout and "truncated or replaced" in r.stdout, r.stdout
    assert "step_000000004: ckpt/mp_rank_00_model_states.pt is missing" in r.stdout, r.stdout
    assert "resumed from step 2" in r.stdout, r.stdout
    again = torch.load(ckpt / "step_000000006" / "ema.pt", weights_only=True)
    for k in reference:  # one rank, fp32, the same kernels: the resumed run recomputes the same steps
        torch.testing.assert_close(again[k], reference[k], rtol=1e-5, atol=1e-7)

    # an explicit resume point: step 4 again, and step 6 (another history now) is set aside, not deleted
    r = _torchrun_job(args[:-2] + ["train.steps=5", "output.resume_from=step_000000004", *args[-2:]], tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resumed from step 4" in r.stdout, r.stdout
    assert (ckpt / "step_000000006" / "manifest.superseded.json").exists()
    assert not (ckpt / "step_000000006" / "manifest.json").exists()
    assert (ckpt / "step_000000005" / "manifest.json").exists()

    # every committed checkpoint damaged (one flipped bit each): one line naming the run, exit 2
    for name in ("step_000000002", "step_000000004", "step_000000005"):
        f = ckpt / name / "ema.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 1
        f.write_bytes(bytes(data))
    r = _torchrun_job(args, tmp_path)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("enat train: error: output.resume_from: no intact checkpoint in "), last
    assert "step_000000005: ema.pt: sha256 differs from the manifest" in last, last
