"""The Ray session every job shares: connect to a cluster, or start an embedded local Ray on loopback."""
from __future__ import annotations

import contextlib
import os

from pipeline.config import RayConfig

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def worker_env() -> dict[str, str]:
    """Env vars every Ray worker needs: loopback flags and a PYTHONPATH that finds this project."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH", "")
    parts = [root] + [p for p in path.split(os.pathsep) if p and p != root]
    return {**LOOPBACK_ENV, "PYTHONPATH": os.pathsep.join(parts)}


def _loopback_only() -> None:
    """Make the embedded Ray bind every listener to 127.0.0.1, even if ``ray`` is already imported.

    Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER once, at import (ray/_private/ray_constants.py
    ENABLE_RAY_CLUSTER), and ``services.get_node_ip_address`` consults that constant when the node
    starts: with it off the node address is the loopback IP and GCS, raylet, agents and workers bind
    there (ecosystem §8.5). The env var reaches the processes the node starts; the constant covers a
    ``ray`` imported before this call (``python -m jobs.…`` imports it early, so does a notebook).
    """
    os.environ.update(LOOPBACK_ENV)
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def init_ray(cfg: RayConfig = RayConfig()) -> bool:
    """Connect to Ray or start an embedded local one on 127.0.0.1; True if this call started it.

    Under ``ray job submit`` (RAY_ADDRESS set) or with ``ray.address`` it connects; otherwise it
    starts a local Ray whose every listener is on loopback (:func:`_loopback_only`).
    """
    import ray

    if ray.is_initialized():
        return False
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:  # the cluster's / job's runtime_env (working_dir, env_vars) applies as submitted
        ray.init(address=address)
    else:
        _loopback_only()
        # address='local': always a new embedded Ray, never a cluster someone started on this machine
        ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                 object_store_memory=cfg.object_store_memory, include_dashboard=False,
                 runtime_env={"env_vars": worker_env()})
    return True


@contextlib.contextmanager
def ray_session(cfg: RayConfig = RayConfig()):
    """`init_ray` for the duration of a job: shuts Ray down afterwards only if this call started it."""
    started = init_ray(cfg)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
