"""The shared world: every YAML in infra/configs/ run end to end on the session's two-node Ray cluster, with
data, weights and checkpoints only on the S3 test server and every run tracked by the session's `mlflow
server` — tokenize → train (a training worker killed and resumed) → register → sample → fid-stats, as a
user of the paper's setup chains them on a cluster. Many tests assert on this one world.

Only sizes are overridden (resolution, model dims, steps, batch and sample counts, workers, GPUs per
worker = 0) and locations are pointed at the test services; everything else the config names stays as
written: bf16, the ZeRO stage, the VQGAN tokenizer (random weights, MAGE f16 architecture, at 64 / 128 px),
flips, label / caption drop, the sampler preset, the decode precision, the reader kind.
`test_overrides_only_change_sizes_and_locations` holds the overrides to that rule.

ImageNet is laid out as ILSVRC2012 ships (class folders for train, a flat val/ with LOC_val_solution.csv),
COCO as the 2014 release (captions JSON), with a real (tiny, random) CLIP text tower. The ImageNet-256
chain runs one worker per node; its tokenize and sample stages are real entrypoints started as Ray
drivers from a scratch directory that nothing may write into.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from tests.datasets import make_coco, make_imagenet_like, tiny_clip
from tests.helpers import fid_recipe_state_dict, is_loopback, listeners, upload_dir
from tests.services import HANG_GUARD_S, REPO, child_env, new_bucket

CONFIGS = REPO / "infra" / "configs"

# What the test may change: sizes, devices, and where things are. Anything else must stay as configured.
SIZE_KEYS = {
    "image.resolution", "tokenize.samples_per_shard", "tokenize.batch_size", "tokenize.rows_per_entry",
    "compute.workers", "compute.gpus_per_worker", "compute.cpus_per_worker", "compute.max_failures",
    "compute.png_threads", "compute.progress",
    "model.encoder_depth", "model.decoder_depth", "model.dim", "model.num_heads",
    "train.global_batch", "train.steps", "train.log_every", "optim.warmup_steps", "output.checkpoint_every",
    "mlflow.system_metrics", "mlflow.grid_classes", "data.batches_per_epoch", "data.num_workers",
    "data.shuffle_buffer", "plan.num_samples", "plan.unit_size", "plan.batch_size", "output.grid",
    "inception.batch_size", "fid.is_splits",
}
LOCATION_KEYS = {
    "source.root", "output.uri", "tokenizer.weights", "text.weights", "storage.endpoint_url", "data.root",
    "mlflow.tracking_uri", "model.checkpoint", "inception.weights", "fid.reference", "train.run_name",
}
TINY_MODEL = ["model.encoder_depth=1", "model.decoder_depth=1", "model.dim=32", "model.num_heads=2"]
STAGES = {"tokenize": ("tokenize-",), "train": ("train-",), "sample": ("sample-",)}
ONE_PER_NODE = ["compute.workers=2", "compute.cpus_per_worker=2"]   # 2 CPUs per node: one worker on each
STEPS, EVERY = 6, 3          # ImageNet-256: checkpoints at steps 3 and 6; the killed run loses a worker after 3
_RUNS: dict[str, list[str]] = {}


def _config(name: str) -> dict:
    import yaml
    return yaml.safe_load((CONFIGS / name).read_text())


def _names(prefix: str) -> list[str]:
    return sorted(p.name for p in CONFIGS.glob(f"{prefix}*.yaml"))


def _run(job: str, name: str, overrides: list[str]):
    """`python -m jobs.<job> --config infra/configs/<name> overrides…` in this process (a driver on the cluster)."""
    import importlib
    _RUNS.setdefault(name, []).extend(overrides)
    return importlib.import_module(f"jobs.{job}").main(["--config", str(CONFIGS / name), *overrides])


def _driver(world, job: str, name: str, overrides: list[str]) -> str:
    """The same, as its own process: a Ray driver joining the cluster, started from the empty scratch dir."""
    _RUNS.setdefault(name, []).extend(overrides)
    proc = subprocess.run([sys.executable, "-m", f"jobs.{job}", "--config", str(CONFIGS / name), *overrides],
                          cwd=world["scratch"], env=world["driver_env"], capture_output=True, text=True,
                          timeout=HANG_GUARD_S)
    assert proc.returncode == 0, f"{job} {name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_endpoint, mlflow_server, ray_cluster):
    """One bucket with ImageNet-like and COCO data, a tiny CLIP, Inception weights and an FID reference."""
    from enat import FIDInception

    b = new_bucket(moto_endpoint, "world")
    tmp = tmp_path_factory.mktemp("world")
    imagenet = make_imagenet_like(tmp / "imagenet", train_per_class=2, val=3)
    upload_dir(b.fs, imagenet.root, f"{b.bucket}/imagenet")
    coco = tmp / "coco"
    make_coco(coco, "train2014", n=6, seed=1)
    make_coco(coco, "val2014", n=3, seed=2)
    upload_dir(b.fs, coco, f"{b.bucket}/coco")
    tiny_clip(tmp / "clip")
    upload_dir(b.fs, tmp / "clip", f"{b.bucket}/weights/clip")
    buf = io.BytesIO()
    layout = [(k, tuple(v.shape)) for k, v in FIDInception().state_dict().items()]
    torch.save(fid_recipe_state_dict(layout, 0), buf)
    b.fs.pipe_file(f"{b.bucket}/weights/inception.pt", buf.getvalue())
    ref = io.BytesIO()
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    b.fs.pipe_file(f"{b.bucket}/weights/fid_stats.npz", ref.getvalue())
    scratch = tmp / "scratch"                                  # the drivers' cwd: empty, read by nobody
    scratch.mkdir()
    return {"bucket": b.bucket, "fs": b.fs, "storage": b.storage, "endpoint": moto_endpoint, "mlflow": mlflow_server,
            "imagenet": imagenet, "url": b.url, "cluster": ray_cluster, "scratch": scratch,
            "driver_env": ray_cluster.driver_env(child_env())}


def test_every_config_has_a_stage():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    staged = sorted(n for prefixes in STAGES.values() for p in prefixes for n in _names(p))
    assert names == staged, f"configs no stage runs: {set(names) - set(staged)}"


# ---------------------------------------------------------------------------------------------------
# tokenize


def _tokenize_overrides(world, name: str) -> list[str]:
    cfg = _config(name)
    res = 128 if cfg["image"]["resolution"] == 512 else 64     # the same f16 grid ratio, at CPU size
    src = "coco" if cfg["source"]["kind"] == "coco" else "imagenet"
    over = [f"source.root={world['url'](src)}", f"output.uri={world['url']('tokens', name[:-5])}",
            f"storage.endpoint_url={world['endpoint']}", "tokenizer.weights=null", f"image.resolution={res}",
            "tokenize.samples_per_shard=4", "tokenize.batch_size=4", "compute.gpus_per_worker=0",
            "compute.progress=false", f"mlflow.tracking_uri={world['mlflow']}"]
    if cfg.get("text"):
        over.append(f"text.weights={world['url']('weights', 'clip')}")
    return over + (ONE_PER_NODE if "256" in name else ["compute.workers=1"])


@pytest.fixture(scope="module")
def tokenized(world):
    out = {}
    for name in _names("tokenize-"):
        if "256" in name:
            _driver(world, "tokenize", name, _tokenize_overrides(world, name))
        else:
            _run("tokenize", name, _tokenize_overrides(world, name))
        ds = json.loads(world["fs"].cat_file(f"{world['bucket']}/tokens/{name[:-5]}/dataset.json"))
        out[name] = (world["url"]("tokens", name[:-5]), ds)
    return out


def test_tokenize_configs(tokenized, world):
    for name, (root, ds) in tokenized.items():
        cfg = _config(name)
        assert ds["tokenizer"]["kind"] == cfg["tokenizer"]["kind"] == "vqgan"
        grid = (128 if cfg["image"]["resolution"] == 512 else 64) // 16
        assert ds["seq_len"] == grid * grid and ds["codebook_size"] == 1024
        for split in cfg["source"]["splits"]:
            assert ds["splits"][split]["samples"] > 0, (name, split)
            assert ds["splits"][split]["flips"] == split.startswith("train"), (name, split)  # flips: train
        if cfg["source"]["kind"] == "imagefolder":
            # the flat val/ took the train split's class indices from LOC_val_solution.csv
            assert ds["classes"] == world["imagenet"].classes
        else:
            assert ds["text"]["dim"] == 32 and ds["source"]["crop"] == "uvit"


def test_tokenize_runs_log_source_and_output(tokenized, world):
    import mlflow
    client = mlflow.MlflowClient(world["mlflow"])
    exp = client.get_experiment_by_name("enat")
    for name, (root, ds) in tokenized.items():
        (run,) = client.search_runs([exp.experiment_id], f"tags.output_uri = '{root}'")
        contexts = sorted((i.dataset.name, {t.value for t in i.tags}.pop()) for i in run.inputs.dataset_inputs)
        splits = _config(name)["source"]["splits"]
        assert contexts == sorted([(f"source/{s}", "source") for s in splits] +
                                  [(f"tokens/{s}", "output") for s in splits]), contexts
        out = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
        for split in splits:
            assert out[f"tokens/{split}"].digest == ds["splits"][split]["digest"][:36]


# ---------------------------------------------------------------------------------------------------
# train


def _tokens_for(train_cfg: dict, tokenized: dict) -> str:
    """The test's copy of the tokens the train config reads: the tokenize config writing the same URL."""
    want = train_cfg["data"]["root"].rstrip("/")
    for name, (root, _) in tokenized.items():
        if _config(name)["output"]["uri"].rstrip("/") == want:
            return root
    raise AssertionError(f"no tokenize config writes {want}")


def _kill_a_training_worker_after(cluster, ckpt_dir: str, fs, killed: list) -> threading.Thread:
    """SIGKILL one Ray Train worker of this cluster (not of any other Ray on the machine) once the
    checkpoint folder `ckpt_dir` is committed on storage (its manifest.json written)."""
    import psutil

    def run():
        deadline = time.time() + HANG_GUARD_S
        while time.time() < deadline and not killed:
            fs.invalidate_cache()
            if fs.exists(f"{ckpt_dir}/manifest.json"):
                for p in psutil.Process(cluster.pid).children(recursive=True):
                    try:
                        if any("RayTrainWorker" in c for c in p.cmdline()):
                            p.kill()
                            killed.append(p.pid)
                            break
                    except psutil.NoSuchProcess:
                        pass
            time.sleep(0.1)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.fixture(scope="module")
def trained(world, tokenized):
    """Every train config once; ImageNet-256 twice (one worker per node): uninterrupted, and again under
    another run name with one training worker SIGKILLed after the step-3 checkpoint."""
    out = {}
    for name in _names("train-"):
        cfg = _config(name)
        run_name = cfg["train"]["run_name"]
        root = _tokens_for(cfg, tokenized)
        over = [f"data.root={root}", f"storage.endpoint_url={world['endpoint']}", *TINY_MODEL,
                "train.global_batch=4", "train.log_every=1", "compute.gpus_per_worker=0",
                f"output.uri={world['url']('ckpt')}", f"mlflow.tracking_uri={world['mlflow']}",
                "mlflow.system_metrics=false", "mlflow.grid_classes=[0]"]
        if cfg["data"].get("kind") == "stream":
            over += ["data.batches_per_epoch=2", "data.num_workers=1", "data.shuffle_buffer=4"]
        if "256" in name:
            over += [*ONE_PER_NODE, f"train.steps={STEPS}", f"output.checkpoint_every={EVERY}"]
            result = _run("train", name, over + ["compute.max_failures=0"])
            assert result.error is None, (name, result.error)
            killed = []
            guard = _kill_a_training_worker_after(
                world["cluster"], f"{world['bucket']}/ckpt/{run_name}-killed/step_{EVERY:09d}", world["fs"], killed)
            again = _run("train", name, over + ["compute.max_failures=1", f"train.run_name={run_name}-killed"])
            guard.join(1)
            assert killed, "no training worker was killed (test setup)"
            assert again.error is None, again.error
            # the user deletes the newest checkpoint folder: the rerun resumes from the one before (Ray Train
            # keeps no checkpoint record of its own that could point at the deleted folder) and writes it again
            world["fs"].rm(f"{world['bucket']}/ckpt/{run_name}-killed/step_{STEPS:09d}", recursive=True)
            rerun = _run("train", name, over + ["compute.max_failures=0", f"train.run_name={run_name}-killed"])
            assert rerun.error is None, rerun.error
        else:
            result = _run("train", name, over + ["compute.workers=1", "compute.cpus_per_worker=1", "train.steps=2",
                                                 "output.checkpoint_every=2", "compute.max_failures=0"])
            assert result.error is None, (name, result.error)
        steps = STEPS if "256" in name else 2
        out[name] = (run_name, world["url"]("ckpt", run_name, f"step_{steps:09d}"), steps)
    return out


def _run_of(client, cfg: dict, run_name: str):
    exp = client.get_experiment_by_name(cfg["mlflow"]["experiment"])
    return client.search_runs([exp.experiment_id], f"tags.enat_run_name = '{run_name}'")[0]


def _losses(client, run) -> dict[int, float]:
    curve = {}
    for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.timestamp):
        curve[m.step] = m.value                 # a step logged again after a restart: the latest
    return curve


def test_train_configs(trained, tokenized, world):
    import mlflow
    client = mlflow.MlflowClient(world["mlflow"])
    for name, (run_name, ckpt, steps) in trained.items():
        cfg = _config(name)
        run = _run_of(client, cfg, run_name)
        p = run.data.params
        # what the config names is what ran
        assert p["deepspeed.precision"] == cfg["deepspeed"]["precision"] == "bf16"
        assert p["deepspeed.zero_stage"] == str(cfg["deepspeed"]["zero_stage"])
        assert p["model.preset"] == cfg["model"]["preset"]
        assert float(p["data.p_uncond"]) == cfg["data"]["p_uncond"] and p["data.flip"] == cfg["data"]["flip"]
        assert p["data.kind"] == cfg["data"]["kind"]
        assert float(p["optim.lr"]) == cfg["optim"]["lr"] and p["train.ema_rate"] == str(cfg["train"]["ema_rate"])
        assert p["model_config.dim"] == "32"
        assert sorted(_losses(client, run)) == list(range(1, steps + 1))
        assert all(np.isfinite(v) for v in _losses(client, run).values())
        assert {"lr", "img_per_s", "tokens_per_s", "grad_norm", "tflops_per_device"} <= set(run.data.metrics)
        assert run.data.tags["final_ema_checkpoint"] == ckpt + "/ema.pt"
        assert world["fs"].exists(ckpt.replace("s3://", "") + "/ema.pt"), ckpt
        # lineage: the token split it trained on, with the digest of its shards
        from pipeline.commits import fingerprint
        from pipeline.shards import open_split
        split = open_split(_tokens_for(cfg, tokenized), cfg["data"]["split"], world["storage"])
        inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}
        (train_input,) = [i for i in inputs.values() if {t.value for t in i.tags} == {"train"}]
        assert train_input.dataset.digest == fingerprint([r["sha256"] for r in split.shards])[:36]
        assert json.loads(train_input.dataset.profile)["num_samples"] == split.samples
        # the final EMA weights are a registered model version that points at them (nothing copied)
        version = min(client.search_model_versions(f"name = '{run_name}'"), key=lambda v: int(v.version))
        assert version.run_id == run.info.run_id and version.tags["checkpoint"] == ckpt + "/ema.pt"
        assert version.tags["step"] == str(steps) and version.tags["model_config.dim"] == "32"
        assert version.tags["tokenizer.kind"] == "vqgan" and version.tags["dataset.uri"] == _tokens_for(cfg, tokenized)
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/checkpoint.json"]
        assert "samples/grid.png" in [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        if cfg["model"]["preset"] == "enat-b-coco":  # a text model: the grid of fixed captions, logged with it
            captions = client.download_artifacts(run.info.run_id, "samples/captions.json")
            assert json.loads(open(captions).read())["captions"]


def test_checkpoints_on_s3_keep_the_configured_number_and_load_as_official(trained, world):
    import enat
    name = "train-imagenet256-enat-l.yaml"
    run_name, ckpt, _ = trained[name]
    keep = _config(name)["output"]["keep_last"]
    fs = world["fs"]
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{world['bucket']}/ckpt/{run_name}") if "step_" in p)
    assert names == [f"step_{s:09d}" for s in range(EVERY, STEPS + 1, EVERY)][-keep:]
    cfg = json.loads(fs.cat_file(ckpt.replace("s3://", "") + "/config.json"))
    model = enat.ENAT.from_official(io.BytesIO(fs.cat_file(ckpt.replace("s3://", "") + "/ema.pt")),
                                    enat.ENATConfig(**cfg["model"]))
    assert enat.generate(model, torch.arange(2)).shape == (2, model.config.seq_len)


def test_training_ran_one_worker_per_node(trained, world):
    from collections import defaultdict

    from ray.util.state import list_actors
    placed: dict[str, set[str]] = defaultdict(set)
    for a in list_actors(address=f"http://{world['cluster'].dashboard}", detail=True, limit=10_000,
                         raise_on_missing_output=False):
        placed[a.class_name].add(a.node_id)
    assert placed["RayTrainWorker"] == set(world["cluster"].nodes.values()), placed


def test_a_killed_training_worker_resumes_equal_to_the_uninterrupted_run(trained, world):
    """Ray Train restarts the worker group from the step-3 checkpoint on S3: the data position, the random
    streams, the optimizer and the EMA carry over, so every step after the restart logs the loss of the
    uninterrupted run (within float32 reduction noise of the bf16 model: 1e-3 relative) and the final EMA
    weights agree to the same tolerance."""
    import mlflow
    name = "train-imagenet256-enat-l.yaml"
    cfg = _config(name)
    client = mlflow.MlflowClient(world["mlflow"])
    run_name, ckpt, _ = trained[name]
    ref = _losses(client, _run_of(client, cfg, run_name))
    killed_run = _run_of(client, cfg, f"{run_name}-killed")
    got = _losses(client, killed_run)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    # the restart after the kill and the rerun after the newest folder was deleted both resumed from step 3:
    # steps 1..3 were trained (and logged) once
    history = [m.step for m in client.get_metric_history(killed_run.info.run_id, "loss")]
    assert [history.count(s) for s in range(1, EVERY + 1)] == [1] * EVERY, sorted(history)
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=1e-3), (s, got[s], ref[s])
    fs = world["fs"]
    a = torch.load(io.BytesIO(fs.cat_file(ckpt.replace("s3://", "") + "/ema.pt")), weights_only=True)
    b = torch.load(io.BytesIO(fs.cat_file(ckpt.replace("s3://", "").replace(run_name, f"{run_name}-killed")
                                          + "/ema.pt")), weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-5)


def test_a_damaged_shard_ends_the_run_at_once_in_one_line(trained, tokenized, world, capfd):
    """A token shard on S3 with one flipped bit, read by the memory reader on both nodes: the run ends at
    once (no max_failures restart: the same bytes would fail again) in one line naming the shard, exit 2."""
    from jobs.train import main
    from pipeline.cluster import cli
    name = "train-imagenet256-enat-l.yaml"
    cfg = _config(name)
    fs, src = world["fs"], _tokens_for(cfg, tokenized).replace("s3://", "")
    dst = f"{world['bucket']}/damaged-tokens"
    fs.copy(src, dst, recursive=True)
    shard = sorted(p for p in fs.find(f"{dst}/{cfg['data']['split']}") if p.endswith(".tar"))[0]
    data = bytearray(fs.cat_file(shard))
    data[len(data) // 2] ^= 1
    fs.pipe_file(shard, bytes(data))
    capfd.readouterr()
    rc = cli(main, ["--config", str(CONFIGS / name), f"data.root=s3://{dst}", f"storage.endpoint_url={world['endpoint']}",
                    *TINY_MODEL, *ONE_PER_NODE, "train.global_batch=4", "compute.gpus_per_worker=0",
                    "compute.max_failures=2", f"output.uri={world['url']('ckpt')}", "train.run_name=damaged",
                    "mlflow.enabled=false"], "train")
    out, err = capfd.readouterr()
    assert rc == 2, (out[-3000:], err[-3000:])
    assert err.strip().splitlines()[-1] == f"enat train: error: s3://{shard}: sha256 differs from the manifest " \
                                            f"(corrupt or replaced shard)", err[-3000:]
    assert "Traceback" not in out + err and "Error in training function" not in out + err, (out + err)[-3000:]
    # one attempt: each of the two ranks said it once (a restart would have said it again)
    lines = [ln for ln in out.splitlines() if "error: s3://" in ln]
    assert len(lines) <= 2 and not any("repeated" in ln for ln in lines), lines


def test_register_any_checkpoint_and_move_an_alias(trained, world):
    """`enat register <checkpoint folder> --alias candidate`: a new version of the training run's model,
    logged into the training run, pointing at that folder's ema.pt; models:/<name>@candidate resolves to it."""
    import mlflow

    from jobs import register
    from pipeline import tracking

    run_name, ckpt, steps = trained["train-imagenet512-enat-l.yaml"]
    out = register.main([ckpt, "--alias", "candidate", "--tracking-uri", world["mlflow"],
                         "--endpoint-url", world["endpoint"]])
    assert out["name"] == run_name and int(out["version"]) >= 2
    model = tracking.resolve_model(world["mlflow"], f"models:/{run_name}@candidate")
    assert (model["version"], model["checkpoint"], model["step"]) == (out["version"], ckpt + "/ema.pt", steps)
    assert mlflow.MlflowClient(world["mlflow"]).get_run(model["run_id"]).data.tags["enat_run_name"] == run_name


# ---------------------------------------------------------------------------------------------------
# sample, fid-stats


@pytest.fixture(scope="module")
def sampled(world, trained):
    out = {}
    for name in _names("sample-"):
        cfg = _config(name)
        run_name = cfg["model"]["checkpoint"].split("/")[-3]          # …/<run>/step_…/ema.pt
        train_name = next(n for n, (r, _, _) in trained.items() if r == run_name)
        checkpoint = f"{trained[train_name][1]}/ema.pt"
        if "256" in name:  # through the model registry: models:/<training run name>/<version>
            import mlflow
            (version,) = mlflow.MlflowClient(world["mlflow"]).search_model_versions(f"name = '{run_name}'")
            checkpoint = f"models:/{run_name}/{version.version}"
        uri = world["url"]("samples", name[:-5])
        over = [f"model.checkpoint={checkpoint}", f"storage.endpoint_url={world['endpoint']}",
                "tokenizer.weights=null", f"inception.weights={world['url']('weights', 'inception.pt')}",
                f"fid.reference={world['url']('weights', 'fid_stats.npz')}", f"output.uri={uri}",
                "plan.num_samples=6", "plan.unit_size=3", "plan.batch_size=3", "fid.is_splits=2", "output.grid=6",
                "compute.gpus_per_worker=0", "compute.png_threads=1", "compute.progress=false",
                f"mlflow.tracking_uri={world['mlflow']}"]
        if "256" in name:
            _driver(world, "sample", name, over + ONE_PER_NODE)
            out[name] = json.loads(world["fs"].cat_file(uri.replace("s3://", "") + "/results.json"))
        else:
            out[name] = _run("sample", name, over + ["compute.workers=1", "compute.cpus_per_worker=1"])
    return out


def test_sample_configs(sampled, world):
    for name, summary in sampled.items():
        cfg = _config(name)
        assert summary["num_samples"] == 6, summary
        assert np.isfinite(summary["fid"]) and np.isfinite(summary["is"]), summary
        plan = json.loads(world["fs"].cat_file(f"{world['bucket']}/samples/{name[:-5]}/plan.json"))
        sampler = plan["config"]["sampler"]
        assert sampler["preset"] == cfg["sampler"]["preset"] and sampler["precision"] == cfg["sampler"]["precision"]
        assert plan["config"]["tokenizer"]["precision"] == cfg["tokenizer"]["precision"] == "fp16"
        if "256" in name:  # the FID is on the training run at the checkpoint's step and on the model version
            import mlflow
            client = mlflow.MlflowClient(world["mlflow"])
            (version,) = client.search_model_versions(f"name = '{cfg['model']['checkpoint'].split('/')[-3]}'")
            fid = client.get_metric_history(version.run_id, "fid")
            assert [(m.step, m.value) for m in fid] == [(STEPS, pytest.approx(summary["fid"]))]
            assert float(client.get_model_version(version.name, version.version).tags["fid"]) == \
                pytest.approx(summary["fid"])
            sample_run = client.search_runs([client.get_run(version.run_id).info.experiment_id],
                                            f"tags.model_version = '{version.version}'")[0]
            assert sample_run.data.tags["mlflow.parentRunId"] == version.run_id
            assert {"fid-reference"} <= {i.dataset.name for i in sample_run.inputs.dataset_inputs}


def test_fid_stats_of_the_samples_equal_the_sample_jobs_own(sampled, world):
    """`enat fid-stats` over the ImageNet-256 samples' webdataset tars on S3: the same images through the
    same Inception give the sample job's own merged statistics. The sample job feeds the Inception the
    decoded float images (official ENAT, inception.uint8=false), fid-stats their PNGs, so the inputs
    differ by the uint8 rounding (≤ 0.5/255 per pixel): the mean features move by ~1e-3 of their scale and
    the Fréchet distance between the two is ~1e-5 of either's to N(0, I); a misread, missing or foreign
    image moves the mean by ~1/6 (one of six samples)."""
    import enat
    from jobs.fid_stats import main as fid_stats_main

    fs, b = world["fs"], world["bucket"]
    out = world["url"]("stats", "samples-256")
    res = fid_stats_main([f"source.root={world['url']('samples', 'sample-imagenet256-enat-l', 'images')}",
                          "source.kind=webdataset", "source.resolution=64", "source.batch_size=4",
                          f"inception.weights={world['url']('weights', 'inception.pt')}", f"output.uri={out}",
                          f"storage.endpoint_url={world['endpoint']}", "compute.progress=false"])
    assert res["n"] == 6 and res["rejected"] == 0
    got = np.load(io.BytesIO(fs.cat_file(f"{b}/stats/samples-256/fid_stats.npz")))
    own = np.load(io.BytesIO(fs.cat_file(f"{b}/samples/sample-imagenet256-enat-l/fid_stats.npz")))
    np.testing.assert_allclose(got["mu"], own["mu"], rtol=1e-2, atol=1e-2 * np.abs(own["mu"]).max())
    fid_self = enat.frechet_distance(got["mu"], got["sigma"], own["mu"], own["sigma"])
    fid_ref = enat.frechet_distance(got["mu"], got["sigma"], np.zeros(2048), np.eye(2048))
    assert fid_self < 1e-3 * fid_ref, (fid_self, fid_ref)


def test_drivers_wrote_nothing_beside_them_and_every_listener_is_loopback(sampled, world):
    assert not list(world["scratch"].iterdir()), list(world["scratch"].iterdir())
    bad = [l for l in listeners(world["cluster"].pid) if not is_loopback(l["ip"])]
    assert not bad, f"listeners beyond loopback: {bad}"


def test_overrides_only_change_sizes_and_locations(sampled):
    """Runs last: every override the stages above used is a size or a location."""
    assert set(_RUNS) == {p.name for p in CONFIGS.glob("*.yaml")}
    for name, overrides in _RUNS.items():
        keys = {o.split("=", 1)[0] for o in overrides}
        assert keys <= SIZE_KEYS | LOCATION_KEYS, (name, keys - SIZE_KEYS - LOCATION_KEYS)
