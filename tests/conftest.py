"""Fixtures: the session's shared services (tests/services.py: one S3 test server, one `mlflow server`, one
two-node Ray cluster, all on 127.0.0.1), fresh buckets and dataset folders, and how tests are handed to
the two xdist workers.

Scheduling (pyproject.toml: ``--dist loadgroup --no-loadscope-reorder``): every test that uses the Ray
cluster runs on one worker, in file order, so that one driver at a time submits to it (a test that kills a
training worker kills its own; Ray Train and Ray Data never compete for the cluster's 4 CPUs); every
other file is one unit on whichever worker is free. The cluster's tests go out first, then the files
marked ``long`` (a whole job of their own, such as the README's demo), then the rest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import services
from tests.datasets import CocoData, ImageFolderData, make_coco, make_image_folder
from tests.services import TEST_ENV, S3Bucket, new_bucket

os.environ.update(TEST_ENV)  # before torch is imported (OMP_NUM_THREADS)
os.environ.update(services.session_env())
for _var in services.UNSET:
    os.environ.pop(_var, None)


def _root(tmp_path_factory) -> Path:
    return services.shared_root(tmp_path_factory.getbasetemp())


def pytest_unconfigure(config):
    """The controlling process (not an xdist worker) stops every service of the session."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is None or hasattr(config, "workerinput"):
        return
    root = factory.getbasetemp() / "services"
    if root.exists():
        services.stop_all(root)


# ---------------------------------------------------------------------------------------------------
# object storage and tracking


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory) -> str:
    """URL of the session's moto S3 server."""
    return services.ensure(_root(tmp_path_factory), "moto", services.start_moto)["url"]


@pytest.fixture
def s3_bucket(moto_endpoint) -> S3Bucket:
    """A fresh bucket on the S3 test server, with the StorageConfig and an s3fs client for it."""
    return new_bucket(moto_endpoint)


@pytest.fixture
def s3_upload():
    from tests.helpers import upload_dir
    return upload_dir


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, moto_endpoint) -> str:
    """URL of the session's `mlflow server` (sqlite backend, artifacts proxied to the S3 test server)."""
    return services.ensure(_root(tmp_path_factory), "mlflow",
                           lambda work: services.start_mlflow(work, moto_endpoint))["url"]


# ---------------------------------------------------------------------------------------------------
# Ray


@dataclass
class RayCluster:
    address: str  # GCS address (RAY_ADDRESS for job drivers)
    dashboard: str  # host:port of the head's dashboard (state API, job submission)
    nodes: dict  # "node_a" (head) / "node_b" (worker) -> Ray node id
    head_dir: Path  # working directory of the head node's processes
    worker_dir: Path  # working directory of the worker node's processes
    pid: int  # the process that owns both nodes (its descendants are the cluster)

    def driver_env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` for a job started as its own Ray driver on this cluster."""
        return {**base, "RAY_ADDRESS": self.address}


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """The session's two-node Ray cluster (2 CPUs per node), this process connected to it as a driver:
    jobs run in-process use it as a job under ``ray job submit`` would (their runtime env: the test
    settings, this repo on PYTHONPATH, RAY_ADDRESS for Ray Train's state queries)."""
    import ray

    from pipeline.cluster import worker_env

    info = services.ensure(_root(tmp_path_factory), "ray", services.start_ray_cluster)
    cluster = RayCluster(info["address"], info["dashboard"], info["nodes"], Path(info["head_dir"]),
                         Path(info["worker_dir"]), info["pgid"])
    if not ray.is_initialized():
        env = {**TEST_ENV, **worker_env(), "RAY_ADDRESS": cluster.address}
        ray.init(address=cluster.address, runtime_env={"env_vars": env}, log_to_driver=False)
    yield cluster
    ray.shutdown()


# ---------------------------------------------------------------------------------------------------
# datasets and child processes


@pytest.fixture
def image_folder(tmp_path) -> ImageFolderData:
    return make_image_folder(tmp_path / "imagenet")


@pytest.fixture
def make_folder():
    """The image-folder generator (``make_folder(root, split=…, per_class=…, bad=…, seed=…)``)."""
    return make_image_folder


@pytest.fixture
def coco_data(tmp_path) -> CocoData:
    return make_coco(tmp_path / "coco")


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child processes (jobs, simulated ranks): the test env + this repo importable."""
    return services.child_env()


# ---------------------------------------------------------------------------------------------------
# scheduling and GPU tests


def _on_cluster(item) -> bool:
    return "ray_cluster" in item.fixturenames


def pytest_itemcollected(item):
    """The group of each test (the module docstring), set as it is collected: xdist's worker reads the
    groups in its own pytest_collection_modifyitems."""
    if not any(True for _ in item.iter_markers("xdist_group")):
        group = "cluster" if _on_cluster(item) else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session):
    """One clear line if xdist's groups did not take (a pytest / xdist pairing that drops them would split
    the cluster's tests over both workers: two drivers on one cluster)."""
    items = session.items
    if getattr(session.config.option, "loadgroup", False) and items and "@" not in items[0].nodeid:
        raise pytest.UsageError("xdist --dist loadgroup did not group the tests (pytest >= 9.2 with "
                                "pytest-xdist 3.8?): install the versions pyproject.toml's test extra pins")


def pytest_collection_modifyitems(config, items):
    """The order of the module docstring. Tests marked `gpu` are skipped where CUDA is absent, unless
    ENAT_TEST_DEVICE=cpu asks to run them on the CPU (the smoke run of benchmarks/gpu_check.sh)."""
    def rank(item) -> int:
        return 0 if _on_cluster(item) else 1 if item.get_closest_marker("long") else 2

    items.sort(key=rank)  # stable: file order within each rank
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available() or os.environ.get("ENAT_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
