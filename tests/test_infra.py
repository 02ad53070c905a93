"""infra/: every file parses and says what the code expects (schema, versions, config fields)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import yaml

from pipeline.config import load_config
from pipeline.sample import SampleJobConfig
from pipeline.tokenize import TokenizeJobConfig
from pipeline.train import TrainJobConfig, deepspeed_config

INFRA = Path(__file__).resolve().parents[1] / "infra"
JOBS = {"tokenize": TokenizeJobConfig, "train": TrainJobConfig, "sample": SampleJobConfig}


@pytest.mark.parametrize("path", sorted((INFRA / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_job_configs_load_with_their_job(path):
    cls = JOBS[path.name.split("-")[0]]
    cfg = load_config(cls, path)                           # unknown / ill-typed fields fail here
    if cls is TrainJobConfig:
        assert cfg.deepspeed.precision == "bf16" and cfg.compute.gpus_per_worker == 1


def test_paper_recipe_in_the_enat_l_train_config():
    cfg = load_config(TrainJobConfig, INFRA / "configs" / "train-imagenet256-enat-l.yaml")
    assert (cfg.train.global_batch, cfg.optim.lr, cfg.train.steps, cfg.optim.betas) == (2048, 4e-4, 500_000, (0.99, 0.99))
    assert cfg.train.global_batch // cfg.compute.workers == 128


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json_matches_the_generator(stage):
    ds = json.loads((INFRA / "deepspeed" / f"zero{stage}-bf16.json").read_text())
    cfg = load_config(TrainJobConfig, {"data": {"root": "x"}},
                      [f"deepspeed.zero_stage={stage}", "compute.workers=16", "deepspeed.micro_batch=128"])
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


# ---------------------------------------------------------------------------------------------------
# Every job config fits the cluster that runs it: its actors / workers, each with its GPUs and CPUs,
# pack onto the nodes the manifest declares (a pool that cannot fill waits forever).

# what the AWS launcher's instance types offer Ray (GPUs and vCPUs detected on the node)
INSTANCES = {"p5.48xlarge": {"GPU": 8, "CPU": 192}, "m7i.4xlarge": {"GPU": 0, "CPU": 16}}


def _cpus(text) -> float:
    text = str(text)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _k8s_node(params: dict, container: dict) -> dict[str, float]:
    """One Ray node of a KubeRay group: rayStartParams win, else the container limits."""
    limits = container["resources"]["limits"]
    return {"CPU": _cpus(params.get("num-cpus", limits.get("cpu", 0))),
            "GPU": float(params.get("num-gpus", limits.get("nvidia.com/gpu", 0)))}


def kuberay_nodes(spec: dict) -> list[dict[str, float]]:
    head = spec["headGroupSpec"]
    nodes = [_k8s_node(head.get("rayStartParams", {}), head["template"]["spec"]["containers"][0])]
    for group in spec["workerGroupSpecs"]:
        node = _k8s_node(group.get("rayStartParams", {}), group["template"]["spec"]["containers"][0])
        nodes += [dict(node) for _ in range(int(group["replicas"]))]
    return nodes


def launcher_nodes(c: dict) -> list[dict[str, float]]:
    """The AWS cluster at full size: the head plus every worker type at its max_workers (≤ the global cap)."""
    nodes, left = [], int(c["max_workers"])
    for name, t in c["available_node_types"].items():
        node = {**INSTANCES[t["node_config"]["InstanceType"]], **t.get("resources", {})}
        count = 1 if name == c["head_node_type"] else min(int(t.get("max_workers", 0)), left)
        left -= 0 if name == c["head_node_type"] else count
        nodes += [{k: float(v) for k, v in node.items()} for _ in range(count)]
    return nodes


def job_bundles(cfg) -> list[dict[str, float]]:
    """The resources a job holds at once: one bundle per actor / Ray Train worker (+ one decode task)."""
    c = cfg.compute
    bundles = [{"CPU": c.cpus_per_worker, "GPU": c.gpus_per_worker}] * c.workers
    if isinstance(cfg, TokenizeJobConfig) and (c.decode_on == "tasks" or (c.decode_on == "auto" and c.gpus_per_worker)):
        bundles.append({"CPU": c.decode_cpus, "GPU": 0.0})  # at least one decode task must run
    return bundles


def unplaced(bundles, nodes) -> list[dict[str, float]]:
    """First-fit decreasing packing of the bundles onto the nodes; returns what does not fit."""
    free = [dict(n) for n in nodes]
    left = []
    for b in sorted(bundles, key=lambda b: (b["GPU"], b["CPU"]), reverse=True):
        node = next((n for n in free if all(n.get(k, 0.0) >= v for k, v in b.items())), None)
        if node is None:
            left.append(b)
            continue
        for k, v in b.items():
            node[k] -= v
    return left


def _load_job_config(path: Path):
    return load_config(JOBS[path.name.split("-")[0]], path)


@pytest.mark.parametrize("path", sorted((INFRA / "kuberay").glob("rayjob-*.yaml")), ids=lambda p: p.name)
def test_rayjob_config_fits_its_cluster(path):
    doc = yaml.safe_load(path.read_text())
    cfg_path = INFRA.parent / doc["spec"]["entrypoint"].split("--config ")[1].split()[0].replace("/app/", "")
    cfg = _load_job_config(cfg_path)
    nodes = kuberay_nodes(doc["spec"]["rayClusterSpec"])
    left = unplaced(job_bundles(cfg), nodes)
    assert not left, (f"{path.name}: {cfg_path.name} holds {job_bundles(cfg)}; {left} do not fit on the nodes "
                      f"{nodes}: raise the worker group's replicas or lower the config's compute.workers")


@pytest.mark.parametrize("cluster", ["kuberay/raycluster.yaml", "cluster/aws-gpu.yaml"])
@pytest.mark.parametrize("path", sorted((INFRA / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_fits_the_shared_clusters(path, cluster):
    doc = yaml.safe_load((INFRA / cluster).read_text())
    nodes = kuberay_nodes(doc["spec"]) if doc.get("kind") == "RayCluster" else launcher_nodes(doc)
    cfg = _load_job_config(path)
    assert not unplaced(job_bundles(cfg), nodes), f"{path.name} does not fit infra/{cluster} ({nodes})"


def test_fit_check_catches_an_oversized_pool():
    spec = yaml.safe_load((INFRA / "kuberay" / "rayjob-tokenize.yaml").read_text())["spec"]["rayClusterSpec"]
    spec["workerGroupSpecs"][0]["replicas"] = 1                      # 8 GPUs for 16 one-GPU actors
    cfg = _load_job_config(INFRA / "configs" / "tokenize-imagenet256.yaml")
    assert len(unplaced(job_bundles(cfg), kuberay_nodes(spec))) == 8


def test_512_configs_carry_the_paper_settings():
    tok = _load_job_config(INFRA / "configs" / "tokenize-imagenet512.yaml")
    assert tok.image.resolution == 512 and tok.tokenizer.preset == "mage-f16" and tok.tokenize.flips == "train"
    train = _load_job_config(INFRA / "configs" / "train-imagenet512-enat-l.yaml")
    assert (train.model.preset, train.optim.lr, train.train.global_batch) == ("enat-l-512", 1e-4, 512)
    assert train.data.root == tok.output.uri                      # trains on what the tokenizer wrote
    sample = _load_job_config(INFRA / "configs" / "sample-imagenet512-enat-l.yaml")
    s = sample.sampler.resolve()
    assert (s.steps, s.cfg_scale, s.mask_temp, s.sample_temp) == (8, 3.5, 1.5, 4.0)   # enat-facts §6
    assert sample.plan.batch_size == 25 and sample.plan.num_samples == 50_000           # the paper's 50K
    assert sample.fid.reference.endswith("fid_stats_imagenet512_guided_diffusion.npz")
    assert "enat-l-512" in sample.model.checkpoint
