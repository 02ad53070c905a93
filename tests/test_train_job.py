"""jobs.train end to end on CPU: 2 Ray Train workers x gloo x DeepSpeed (ZeRO-1 and ZeRO-2) on a tiny
ENAT over token shards on the S3-API test server, tracked by a real `mlflow server`; a worker killed
mid-run is restarted and resumes from the latest checkpoint with a continuous loss curve."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import enat
from pipeline.config import ConfigError
from tests.conftest import free_port, service_env
from tests.train_data import write_shapes_dataset

COMMON = ["model.preset=enat-s", "model.encoder_depth=2", "model.decoder_depth=1", "model.dim=64",
          "model.num_heads=4", "optim.lr=0.002", "optim.warmup_steps=5", "train.global_batch=32",
          "train.steps=40", "train.ema_rate=0.9", "train.log_every=5", "deepspeed.precision=fp32",
          "compute.workers=2", "output.checkpoint_every=10", "mlflow.system_metrics=false"]


def _loss_curve(tracking_uri: str, run_name: str) -> dict[int, float]:
    import mlflow
    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("enat-test")
    run = client.search_runs([exp.experiment_id], f"tags.enat_run_name = '{run_name}'")[0]
    curve = {}
    for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp):
        curve[m.step] = m.value               # a step logged again after a restart: keep the latest
    return curve, run, client


def _train(argv):
    from jobs.train import main
    return main(argv)


def test_two_workers_zero1_on_s3_with_mlflow_server(ray_local, s3_bucket, mlflow_server):
    root = s3_bucket.url("tok")
    write_shapes_dataset(root, storage_cfg=s3_bucket.storage)
    result = _train(COMMON + [f"data.root={root}", f"storage.endpoint_url={s3_bucket.endpoint}",
                              "deepspeed.zero_stage=1", "train.run_name=zero1", f"mlflow.tracking_uri={mlflow_server}",
                              "mlflow.experiment=enat-test", f"output.uri={s3_bucket.url('ckpt')}",
                              "output.keep_last=2"])
    assert result.error is None
    curve, run, client = _loss_curve(mlflow_server, "zero1")
    assert sorted(curve) == list(range(5, 45, 5))
    assert curve[40] < curve[5] - 0.2, curve                            # it learns
    assert run.data.params["deepspeed.zero_stage"] == "1"
    assert run.data.params["model_config.dim"] == "64"
    assert {"lr", "img_per_s", "tokens_per_s", "grad_norm", "tflops_per_device"} <= set(run.data.metrics)
    arts = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
    assert "samples/grid.png" in arts                                   # the sample grid
    assert run.data.tags["final_ema_checkpoint"].endswith("step_000000040/ema.pt")
    # checkpoints on S3: stable names, keep last 2, the EMA export loads as an official checkpoint
    names = sorted(p.rsplit("/", 1)[-1] for p in s3_bucket.fs.ls(f"{s3_bucket.bucket}/ckpt/zero1")
                   if "step_" in p)
    assert names == ["step_000000030", "step_000000040"]
    ema = s3_bucket.fs.cat_file(f"{s3_bucket.bucket}/ckpt/zero1/step_000000040/ema.pt")
    import io
    cfg = enat.ENATConfig(2, 1, 64, 4, seq_len=16, codebook_size=16, num_classes=10)
    model = enat.ENAT.from_official(io.BytesIO(ema), cfg)
    toks = enat.generate(model, torch.arange(4))
    assert toks.shape == (4, 16)
    pytest.zero1_curve = curve


def test_worker_killed_mid_run_resumes_with_continuous_loss(ray_local, tmp_path, monkeypatch):
    """Also: relative local paths (data.root=tok, output.uri=ckpt) are resolved on the driver, so Ray Train's
    workers, whose working directory differs, and the restarted ones read and write the same files."""
    driver_cwd = tmp_path / "driver"
    driver_cwd.mkdir()
    write_shapes_dataset(str(driver_cwd / "tok"))
    ckpt = driver_cwd / "ckpt"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    killed = []

    def killer():
        import psutil
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            if (ckpt / "zero2" / "step_000000020").exists():
                for p in psutil.process_iter(["cmdline"]):
                    if any("RayTrainWorker" in c for c in (p.info["cmdline"] or [])):
                        p.kill()                                          # SIGKILL a training worker
                        killed.append(p.pid)
                        break
            time.sleep(0.2)
    t = threading.Thread(target=killer, daemon=True)
    t.start()
    monkeypatch.chdir(driver_cwd)                                   # Ray's workers run elsewhere
    result = _train(COMMON + ["data.root=tok", "deepspeed.zero_stage=2", "train.run_name=zero2",
                              f"mlflow.tracking_uri={uri}", "mlflow.experiment=enat-test",
                              "output.uri=ckpt", "compute.max_failures=2"])
    t.join(1)
    assert killed, "no worker was killed (test setup)"
    assert result.error is None
    curve, run, _ = _loss_curve(uri, "zero2")
    assert sorted(curve) == list(range(5, 45, 5))                        # the run finished all 40 steps
    assert (ckpt / "zero2" / "step_000000040" / "ema.pt").exists()
    # the same seeds and data order as the ZeRO-1 run, so the curves agree within numerical noise,
    # before and after the restart
    ref = getattr(pytest, "zero1_curve", None)
    if ref is not None:
        for s in curve:
            assert abs(curve[s] - ref[s]) < 0.05 * ref[s], (s, curve[s], ref[s])


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
    write_shapes_dataset(root)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    code = ("from jobs.train import main; import sys; main(sys.argv[1:])")
    args = COMMON + [f"data.root={root}", "compute.workers=1", "train.steps=12", "launcher=torchrun",
                     f"output.uri={tmp_path / 'ckpt'}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"]
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, **service_env()}, cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (tmp_path / "ckpt" / "enat" / "step_000000012" / "COMPLETE").exists()
    # a second invocation resumes from step 12 and trains to 16
    r = subprocess.run([sys.executable, "-c", code, *args[:-4], "train.steps=16", *args[-3:]],
                       capture_output=True, text=True, timeout=300, env={**os.environ, **service_env()},
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr[-3000:]
    # 12 steps of 32 are one epoch of the 400 samples: the resume starts the next epoch, no replay
    assert "resumed from step 12 (epoch 1, batch 0)" in r.stdout
    assert (tmp_path / "ckpt" / "enat" / "step_000000016" / "ema.pt").exists()


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
                       capture_output=True, text=True, timeout=400, cwd=str(Path(__file__).resolve().parents[1]),
                       env={**os.environ, **service_env(), "DS_ACCELERATOR": "cpu"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "step 6/6" in r.stdout
    ckpt = tmp_path / "ckpt" / "enat" / "step_000000006"
    assert (ckpt / "COMPLETE").exists()
    ema = torch.load(ckpt / "ema.pt")
    assert ema["blocks.0.attn.q.weight"].shape == (64, 64)             # full (gathered) EMA weights
