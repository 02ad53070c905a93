"""Every YAML in infra/configs/ runs end to end on CPU, as a user of the paper's setup runs it.

Only sizes are overridden (resolution, model dims, steps, batch and sample counts, workers, GPUs per
worker = 0) and locations are pointed at the test services (the S3 test server, the mlflow server);
everything else the config names stays as written: bf16, the ZeRO stage, the VQGAN tokenizer (random
weights, MAGE f16 architecture, at 64 / 128 px), flips, label / caption drop, the sampler preset, the
decode precision. `test_overrides_only_change_sizes_and_locations` holds the overrides to that rule.

The configs chain as they do on a cluster: tokenize → train on those tokens → sample the trained EMA.
ImageNet is laid out as ILSVRC2012 ships (class folders for train, a flat val/ with LOC_val_solution.csv),
COCO as the 2014 release (captions JSON), with a real (tiny, random) CLIP text tower.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from tests.conftest import REPO, make_coco, upload_dir
from tests.datasets import make_imagenet_like
from tests.helpers import fid_recipe_state_dict

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
    "mlflow.tracking_uri", "model.checkpoint", "inception.weights", "fid.reference",
}
TINY_MODEL = ["model.encoder_depth=1", "model.decoder_depth=1", "model.dim=32", "model.num_heads=2"]
STAGES = {"tokenize": ("tokenize-",), "train": ("train-",), "sample": ("sample-",)}


def _config(name: str) -> dict:
    import yaml
    return yaml.safe_load((CONFIGS / name).read_text())


def _run(job: str, name: str, overrides: list[str]):
    """`python -m jobs.<job> --config infra/configs/<name> overrides…` in this process (shared Ray)."""
    import importlib
    _RUNS.setdefault(name, []).extend(overrides)
    return importlib.import_module(f"jobs.{job}").main(["--config", str(CONFIGS / name), *overrides])


_RUNS: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def world(tmp_path_factory, moto_endpoint, mlflow_server, ray_local):
    """One bucket with ImageNet-like and COCO data, a tiny CLIP, Inception weights and FID references."""
    from pipeline.sections import StorageConfig
    from pipeline.storage import filesystem
    from tests.test_tokenize_job import _tiny_clip
    from enat import FIDInception

    import uuid
    bucket = f"real-{uuid.uuid4().hex[:10]}"
    storage = StorageConfig(endpoint_url=moto_endpoint)
    fs, _ = filesystem(f"s3://{bucket}", storage)
    fs.mkdir(bucket)
    tmp = tmp_path_factory.mktemp("real")
    imagenet = make_imagenet_like(tmp / "imagenet", train_per_class=2, val=3)
    upload_dir(fs, imagenet.root, f"{bucket}/imagenet")
    coco = tmp / "coco"
    make_coco(coco, "train2014", n=6, seed=1)
    make_coco(coco, "val2014", n=3, seed=2)
    upload_dir(fs, coco, f"{bucket}/coco")
    _tiny_clip(tmp / "clip")
    upload_dir(fs, tmp / "clip", f"{bucket}/weights/clip")
    buf = io.BytesIO()
    layout = [(k, tuple(v.shape)) for k, v in FIDInception().state_dict().items()]
    torch.save(fid_recipe_state_dict(layout, 0), buf)
    fs.pipe_file(f"{bucket}/weights/inception.pt", buf.getvalue())
    ref = io.BytesIO()
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    fs.pipe_file(f"{bucket}/weights/fid_stats.npz", ref.getvalue())
    return {"bucket": bucket, "fs": fs, "storage": storage, "endpoint": moto_endpoint, "mlflow": mlflow_server,
            "imagenet": imagenet, "url": lambda *p: "/".join([f"s3://{bucket}", *p])}


def _names(prefix: str) -> list[str]:
    return sorted(p.name for p in CONFIGS.glob(f"{prefix}*.yaml"))


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
            "tokenize.samples_per_shard=4", "tokenize.batch_size=4", "compute.workers=1",
            "compute.gpus_per_worker=0", "compute.progress=false", f"mlflow.tracking_uri={world['mlflow']}"]
    if cfg.get("text"):
        over.append(f"text.weights={world['url']('weights', 'clip')}")
    return over


@pytest.fixture(scope="module")
def tokenized(world):
    out = {}
    for name in _names("tokenize-"):
        _run("tokenize", name, _tokenize_overrides(world, name))
        fs = world["fs"]
        ds = json.loads(fs.cat_file(f"{world['bucket']}/tokens/{name[:-5]}/dataset.json"))
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


# ---------------------------------------------------------------------------------------------------
# train


def _tokens_for(train_cfg: dict, tokenized: dict) -> str:
    """The test's copy of the tokens the train config reads: the tokenize config writing the same URL."""
    want = train_cfg["data"]["root"].rstrip("/")
    for name, (root, _) in tokenized.items():
        if _config(name)["output"]["uri"].rstrip("/") == want:
            return root
    raise AssertionError(f"no tokenize config writes {want}")


@pytest.fixture(scope="module")
def trained(world, tokenized):
    out = {}
    for name in _names("train-"):
        cfg = _config(name)
        root = _tokens_for(cfg, tokenized)
        over = [f"data.root={root}", f"storage.endpoint_url={world['endpoint']}", *TINY_MODEL,
                "train.global_batch=4", "train.steps=2", "train.log_every=1", "compute.workers=1",
                "compute.gpus_per_worker=0", "compute.cpus_per_worker=1", "compute.max_failures=0",
                f"output.uri={world['url']('ckpt')}", "output.checkpoint_every=2",
                f"mlflow.tracking_uri={world['mlflow']}", "mlflow.system_metrics=false", "mlflow.grid_classes=[0]"]
        if cfg["data"].get("kind") == "stream":
            over += ["data.batches_per_epoch=2", "data.num_workers=1", "data.shuffle_buffer=4"]
        result = _run("train", name, over)
        assert result.error is None, (name, result.error)
        out[name] = (cfg["train"]["run_name"], world["url"]("ckpt", cfg["train"]["run_name"], "step_000000002"))
    return out


def test_train_configs(trained, tokenized, world):
    import mlflow
    client = mlflow.MlflowClient(world["mlflow"])
    for name, (run_name, ckpt) in trained.items():
        cfg = _config(name)
        exp = client.get_experiment_by_name(cfg["mlflow"]["experiment"])
        run = client.search_runs([exp.experiment_id], f"tags.enat_run_name = '{run_name}'")[0]
        p = run.data.params
        # what the config names is what ran
        assert p["deepspeed.precision"] == cfg["deepspeed"]["precision"] == "bf16"
        assert p["deepspeed.zero_stage"] == str(cfg["deepspeed"]["zero_stage"])
        assert p["model.preset"] == cfg["model"]["preset"]
        assert float(p["data.p_uncond"]) == cfg["data"]["p_uncond"] and p["data.flip"] == cfg["data"]["flip"]
        assert float(p["optim.lr"]) == cfg["optim"]["lr"] and p["train.ema_rate"] == str(cfg["train"]["ema_rate"])
        history = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in history) == [1, 2] and all(np.isfinite(m.value) for m in history)
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
        (version,) = client.search_model_versions(f"name = '{run_name}'")
        assert version.run_id == run.info.run_id and version.tags["checkpoint"] == ckpt + "/ema.pt"
        assert version.tags["step"] == "2" and version.tags["model_config.dim"] == "32"
        assert version.tags["tokenizer.kind"] == "vqgan" and version.tags["dataset.uri"] == _tokens_for(cfg, tokenized)
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/checkpoint.json"]
        grid = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        assert "samples/grid.png" in grid
        if cfg["model"]["preset"] == "enat-b-coco":  # a text model: the grid of fixed captions, logged with it
            captions = client.download_artifacts(run.info.run_id, "samples/captions.json")
            assert json.loads(open(captions).read())["captions"]


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
# sample


@pytest.fixture(scope="module")
def sampled(world, trained):
    out = {}
    for name in _names("sample-"):
        cfg = _config(name)
        run_name = cfg["model"]["checkpoint"].split("/")[-3]          # …/<run>/step_…/ema.pt
        train_name = next(n for n, (r, _) in trained.items() if r == run_name)
        checkpoint = f"{trained[train_name][1]}/ema.pt"
        if "256" in name:  # through the model registry: models:/<training run name>/<version>
            import mlflow
            (version,) = mlflow.MlflowClient(world["mlflow"]).search_model_versions(f"name = '{run_name}'")
            checkpoint = f"models:/{run_name}/{version.version}"
        over = [f"model.checkpoint={checkpoint}", f"storage.endpoint_url={world['endpoint']}",
                "tokenizer.weights=null", f"inception.weights={world['url']('weights', 'inception.pt')}",
                f"fid.reference={world['url']('weights', 'fid_stats.npz')}",
                f"output.uri={world['url']('samples', name[:-5])}", "plan.num_samples=6", "plan.unit_size=3",
                "plan.batch_size=3", "fid.is_splits=2", "output.grid=6", "compute.workers=1", "compute.gpus_per_worker=0",
                "compute.cpus_per_worker=1", "compute.png_threads=1", "compute.progress=false",
                f"mlflow.tracking_uri={world['mlflow']}"]
        out[name] = _run("sample", name, over)
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
            model = summary["model"]
            fid = client.get_metric_history(model["run_id"], "fid")
            assert [(m.step, m.value) for m in fid] == [(2, summary["fid"])]
            assert float(client.get_model_version(model["name"], model["version"]).tags["fid"]) == summary["fid"]
            sample_run = client.search_runs([client.get_run(model["run_id"]).info.experiment_id],
                                            f"tags.model_version = '{model['version']}'")[0]
            assert sample_run.data.tags["mlflow.parentRunId"] == model["run_id"]
            assert {"fid-reference"} <= {i.dataset.name for i in sample_run.inputs.dataset_inputs}


def test_overrides_only_change_sizes_and_locations(sampled):
    """Runs last: every override the stages above used is a size or a location."""
    assert set(_RUNS) == {p.name for p in CONFIGS.glob("*.yaml")}
    for name, overrides in _RUNS.items():
        keys = {o.split("=", 1)[0] for o in overrides}
        assert keys <= SIZE_KEYS | LOCATION_KEYS, (name, keys - SIZE_KEYS - LOCATION_KEYS)


def test_register_any_checkpoint_and_move_an_alias(trained, world):
    """`enat register <checkpoint folder> --alias candidate`: a new version of the training run's model,
    logged into the training run, pointing at that folder's ema.pt; models:/<name>@candidate resolves to it."""
    from jobs import register
    from pipeline import tracking

    run_name, ckpt = next(iter(trained.values()))
    out = register.main([ckpt, "--alias", "candidate", "--tracking-uri", world["mlflow"],
                         "--endpoint-url", world["endpoint"]])
    assert out["name"] == run_name and int(out["version"]) >= 2
    model = tracking.resolve_model(world["mlflow"], f"models:/{run_name}@candidate")
    assert (model["version"], model["checkpoint"], model["step"]) == (out["version"], ckpt + "/ema.pt", 2)
    import mlflow
    assert mlflow.MlflowClient(world["mlflow"]).get_run(model["run_id"]).data.tags["enat_run_name"] == run_name
