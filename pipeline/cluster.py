"""Where jobs run: the Ray session (a cluster, or an embedded local Ray on loopback), the worker's
device, and the one actor-pool runner with progress and rate that every unit-of-work job uses."""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
from typing import Any, Callable, Optional, Sequence

from pipeline.sections import ComputeSection, RayConfig

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


def pick_device(compute: ComputeSection) -> Any:
    """The worker's torch device: cuda when asked (``compute.device=cuda``) or when the worker holds a
    GPU (``auto``); on CPU, one torch thread per reserved CPU (more workers scale it). Raises
    ``RuntimeError`` when cuda is asked for and the worker sees none."""
    import torch

    want_cuda = compute.device == "cuda" or (compute.device == "auto" and compute.gpus_per_worker > 0
                                             and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise RuntimeError("compute.device=cuda but this worker sees no CUDA device")
    if not want_cuda:
        torch.set_num_threads(max(1, int(compute.cpus_per_worker)))
    return torch.device("cuda" if want_cuda else "cpu")


# a Ray Data task stage before the actors: (function, its keyword arguments, Ray resource arguments)
Stage = tuple[Callable[..., dict], dict, dict]


def run_pool(rows: list[dict], worker: type, ctor_args: tuple, compute: ComputeSection, *, what: str,
             total: int = 0, count: str = "samples", stages: Sequence[Stage] = (), in_flight: int = 1,
             postfix: Optional[Callable[[dict], dict]] = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``rows`` (one unit of work each) through ``stages`` of tasks, then a pool of ``worker`` actors
    (``compute.workers`` of them) on the current Ray cluster, with a progress bar and rate on the driver.

    Each output row must hold ``count`` (items done) and may hold ``*_s`` timings (summed into
    ``worker_seconds``). Returns {run_s, first_unit_s, steady_per_s (after the first unit, i.e. without
    start-up and model loading), worker_seconds}.
    """
    import ray

    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    for fn, kwargs, resources in stages:
        ds = ds.map(fn, fn_kwargs=kwargs, **resources)
    pool = ray.data.ActorPoolStrategy(size=compute.workers, max_concurrent_calls_per_actor=in_flight,
                                      enable_true_multi_threading=in_flight > 1)
    ds = ds.map(worker, fn_constructor_args=ctor_args, compute=pool, num_cpus=compute.cpus_per_worker,
                num_gpus=compute.gpus_per_worker or None)
    bar = None
    if compute.progress:
        from tqdm import tqdm

        bar = tqdm(total=total or None, unit="img", desc=what, dynamic_ncols=True, file=sys.stderr)
    done, t0 = 0, time.perf_counter()
    t_first = first_n = None
    secs: collections.Counter = collections.Counter()
    try:
        for r in ds.iter_rows():
            done += int(r[count])
            secs.update({k[:-2]: float(v) for k, v in r.items() if k.endswith("_s")})
            if t_first is None:
                t_first, first_n = time.perf_counter(), done
            if bar is not None:
                bar.update(int(r[count]))
                if postfix is not None:
                    bar.set_postfix(**postfix(r))
    finally:
        if bar is not None:
            bar.close()
    t_end = time.perf_counter()
    steady = (done - first_n) / (t_end - t_first) if t_first is not None and done > first_n and t_end > t_first \
        else None
    log(f"[{what}] {len(rows)} units, {done} images in {t_end - t0:.1f} s")
    return {"run_s": round(t_end - t0, 3), "first_unit_s": None if t_first is None else round(t_first - t0, 3),
            "steady_per_s": None if steady is None else round(steady, 3),
            "worker_seconds": {k: round(v, 3) for k, v in secs.items()}}


def run_job(cfg: Any, what: str, run: Callable[..., dict]) -> dict:
    """A job's main: print the resolved config (credentials redacted), run ``run(cfg, log=...)`` in a Ray
    session, print the summary."""
    import json

    from pipeline.config import dump_config
    from pipeline.storage import redact

    print(f"[{what}] config:\n" + redact(dump_config(cfg)), flush=True)
    with ray_session(cfg.ray):
        summary = run(cfg, log=lambda m: print(m, flush=True))
    print(f"[{what}] summary: " + redact(json.dumps(summary)), flush=True)
    return summary
