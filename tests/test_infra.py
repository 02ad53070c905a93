"""infra/: every file parses and says what the code expects (schema, versions, config fields)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.config import TokenizeJobConfig, load_config
from pipeline.sampling import SampleJobConfig
from pipeline.training import TrainJobConfig, deepspeed_config

INFRA = Path(__file__).resolve().parents[1] / "infra"
JOBS = {"tokenize": TokenizeJobConfig, "train": TrainJobConfig, "sample": SampleJobConfig}


@pytest.mark.parametrize("path", sorted((INFRA / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_load_with_their_job(path):
    cls = JOBS[path.name.split("-")[0]]
    cfg = load_config(cls, path)                           # unknown / ill-typed fields fail here
    if cls is TrainJobConfig:
        assert cfg.deepspeed.precision == "bf16" and cfg.scaling.use_gpu


def test_paper_recipe_in_the_enat_l_train_config():
    cfg = load_config(TrainJobConfig, INFRA / "configs" / "train-imagenet256-enat-l.yaml")
    assert (cfg.train.global_batch, cfg.optim.lr, cfg.train.steps, cfg.optim.betas) == (2048, 4e-4, 500_000, (0.99, 0.99))
    assert cfg.train.global_batch // cfg.scaling.num_workers == 128


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json_matches_the_generator(stage):
    ds = json.loads((INFRA / "deepspeed" / f"zero{stage}-bf16.json").read_text())
    cfg = load_config(TrainJobConfig, {"data": {"root": "x"}},
                      [f"deepspeed.zero_stage={stage}", "scaling.num_workers=16", "deepspeed.micro_batch=128"])
    assert ds == deepspeed_config(cfg)


@pytest.mark.parametrize("path", sorted((INFRA / "kuberay").glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifests(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
    spec = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["template"]["spec"]["containers"]
    for group in spec["workerGroupSpecs"]:
        res = group["template"]["spec"]["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
    if doc["kind"] == "RayJob":
        module = doc["spec"]["entrypoint"].split()[2]
        cfg_path = doc["spec"]["entrypoint"].split("--config ")[1].replace("/app/", "")
        assert (INFRA.parent / cfg_path).exists(), cfg_path
        assert (INFRA.parent / (module.replace(".", "/") + ".py")).exists()
        assert "MLFLOW_TRACKING_URI" in yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["env_vars"]


def test_cluster_launcher_and_mlflow_and_dockerfile():
    c = yaml.safe_load((INFRA / "cluster" / "aws-gpu.yaml").read_text())
    assert {"cluster_name", "provider", "available_node_types", "head_node_type"} <= set(c)
    assert c["head_node_type"] in c["available_node_types"]
    docs = list(yaml.safe_load_all((INFRA / "mlflow" / "mlflow.yaml").read_text()))
    dep = next(d for d in docs if d["kind"] == "Deployment")
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--artifacts-destination s3://" in args and "--allowed-hosts" in args and ":*" in args
    assert "postgresql" in (INFRA / "mlflow" / "mlflow.yaml").read_text()
    docker = (INFRA / "docker" / "Dockerfile").read_text()
    assert 'pip install -e "' in docker and "--no-build-isolation" in docker and "deepspeed" in docker


def test_guide_commands_reference_real_files_and_subcommands():
    import re

    from jobs.cli import COMMANDS
    guide = (INFRA.parent / "docs" / "guide-imagenet256.md").read_text()
    blocks = "\n".join(re.findall(r"```bash\n(.*?)```", guide, flags=re.S))
    for path in re.findall(r"(infra/[\w./-]+\.(?:yaml|sh|json)|infra/docker/Dockerfile)", blocks):
        assert (INFRA.parent / path).exists(), path
    for sub in re.findall(r"enat submit -- ([\w-]+)", blocks):
        assert sub in COMMANDS, sub
    for sub in re.findall(r"^enat ([\w-]+)", blocks, flags=re.M):
        assert sub in COMMANDS, sub
