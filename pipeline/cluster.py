"""Where jobs run: the Ray session (a cluster, or an embedded local Ray on loopback), the worker's
device, and the one actor-pool runner with progress and rate that every unit-of-work job uses."""
from __future__ import annotations

import collections
import contextlib
import ctypes
import functools
import os
import sys
import time
import warnings
from typing import Any, Callable, Optional, Sequence

from pipeline.sections import ComputeSection, RayConfig

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
# Ray Train replaces `print` in its workers with one that logs through the worker's logger and, when
# sys.stdout is wrapped (DeepSpeed and MLflow wrap it), also prints: every line of a training worker
# reached the terminal twice. Off, a worker's print is an ordinary print that Ray forwards once.
WORKER_ENV = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}


# True while this process runs the embedded local Ray it started (see init_ray)
_EMBEDDED = False


def worker_env(verbose: bool = False) -> dict[str, str]:
    """Env vars every Ray worker needs: loopback flags, plain prints, MLflow's INFO lines only with
    ``verbose``, a PYTHONPATH that finds this project."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("PYTHONPATH", "")
    parts = [root] + [p for p in path.split(os.pathsep) if p and p != root]
    return {**LOOPBACK_ENV, **WORKER_ENV, "MLFLOW_LOGGING_LEVEL": "INFO" if verbose else "WARNING",
            "PYTHONPATH": os.pathsep.join(parts)}


def actor_restarts() -> dict[str, Any]:
    """Ray Data map arguments for our actor pools. On a cluster, Ray's defaults: a lost actor is restarted
    (a preempted node). In the embedded local Ray nothing is preempted, a dead actor is a bug or an OOM
    kill best reported, and with restarts on Ray logs an ERROR for every pool (its actors' constructor
    arguments live in the object store: ray-project/ray#53727); our jobs resume by unit anyway."""
    return {"max_restarts": 0} if _EMBEDDED else {}


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


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _session_token() -> None:
    """Token authentication for the embedded Ray, with the token in this process's environment (inherited
    by the processes Ray starts) instead of the file ``~/.ray/auth_token`` Ray would otherwise write into
    the user's home; an explicit RAY_AUTH_MODE / RAY_AUTH_TOKEN is left as it is."""
    import secrets

    if "RAY_AUTH_MODE" in os.environ or "RAY_AUTH_TOKEN" in os.environ:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    Config.initialize("")  # Ray read RAY_AUTH_MODE when it was imported: read it again
    AuthenticationTokenLoader.instance().reset_cache()


def _ray_logging(verbose: bool) -> dict[str, Any]:
    """ray.init arguments for Ray's own log lines: on the terminal only with ``verbose``; they are always
    in the session's log directory. Our workers' prints still reach the terminal (log_to_driver)."""
    import logging

    import ray

    level = "INFO" if verbose else "WARNING"
    return {"logging_level": getattr(logging, level), "logging_config": ray.LoggingConfig(log_level=level)}


def _quiet_ray_data(verbose: bool) -> None:
    """Ray Data logs its execution plans and, on a non-interactive terminal, a progress block every 10 s
    to the console; without ``verbose`` only its file handler (``ray-data.log`` in the session's log
    directory) keeps them: the job shows its own progress bar."""
    import logging

    from ray.data._internal.logging import SessionFileHandler  # importing ray.data sets its loggers up

    for h in logging.getLogger("ray.data").handlers:
        if not isinstance(h, SessionFileHandler):
            h.setLevel(logging.INFO if verbose else logging.ERROR)


def init_ray(cfg: RayConfig = RayConfig(), dashboard: bool = True) -> bool:
    """Connect to Ray or start an embedded local one on 127.0.0.1; True if this call started it.

    Under ``ray job submit`` (RAY_ADDRESS set) or with ``ray.address`` it connects; otherwise it
    starts a local Ray whose every listener is on loopback (:func:`_loopback_only`), with token
    authentication (:func:`_session_token`) and, with ``dashboard``, the dashboard on 127.0.0.1 (Ray
    Train's controller queries actor states through it; without it, it warns every few seconds). Jobs
    without Ray Train (tokenize, sample) start theirs without: ~2.5 s less start-up here.
    """
    import ray

    global _EMBEDDED
    if ray.is_initialized():
        return False
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "INFO" if cfg.verbose else "WARNING")  # before mlflow's import
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:  # the cluster's / job's runtime_env (working_dir, env_vars) applies as submitted
        ray.init(address=address, **_ray_logging(cfg.verbose))
    else:
        _loopback_only()
        _session_token()
        # The GCS port is chosen here so that the workers can be told which cluster is theirs: Ray Train's
        # controller queries actor states through the state API, which otherwise finds "the latest" Ray
        # running on the machine (another user's, another job's). One machine: no node is preempted, so
        # Ray Train's preemption watcher has nothing to watch.
        port = _free_port()
        env = {**worker_env(cfg.verbose), "RAY_ADDRESS": f"127.0.0.1:{port}",
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
        saved = os.environ.get("RAY_GCS_SERVER_PORT")
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        try:
            # address='local': always a new embedded Ray, never a cluster someone started on this machine
            ray.init(address="local", num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus,
                     object_store_memory=cfg.object_store_memory, include_dashboard=dashboard,
                     dashboard_host="127.0.0.1", runtime_env={"env_vars": env}, **_ray_logging(cfg.verbose))
        finally:
            if saved is None:
                os.environ.pop("RAY_GCS_SERVER_PORT", None)
            else:
                os.environ["RAY_GCS_SERVER_PORT"] = saved
        _EMBEDDED = True
    _quiet_ray_data(cfg.verbose)
    if not cfg.verbose:
        node = ray._private.worker._global_node
        logs = node.get_logs_dir_path() if node is not None else "the Ray session's logs/ directory"
        print(f"[ray] Ray's own logs: {logs} (--verbose shows them here)", flush=True)
    return True


@contextlib.contextmanager
def ray_session(cfg: RayConfig = RayConfig(), dashboard: bool = False):
    """`init_ray` for the duration of a job: shuts Ray down afterwards only if this call started it.
    ``dashboard``: an embedded Ray starts its dashboard (Ray Train needs it)."""
    global _EMBEDDED
    started = init_ray(cfg, dashboard)
    try:
        yield
    finally:
        if started:
            import ray

            ray.shutdown()
            _EMBEDDED = False


def keep_freed_memory(limit: int = 2**33) -> bool:
    """Ask glibc to keep freed blocks up to ``limit`` bytes in the process instead of returning them to
    the OS (``mallopt`` M_MMAP_THRESHOLD / M_TRIM_THRESHOLD / M_TOP_PAD). True if glibc accepted it.

    Why: a CPU encoder allocates and frees activation-sized tensors (134 MB per 256-px VQGAN image at
    full resolution) for every conv, GroupNorm and swish, and glibc's default serves each from a fresh
    mmap, so every one page-faults in again: ~35% of the VQGAN encoder's CPU time here. With the blocks
    kept, the same encode takes ~0.65x the CPU time (codes bit-identical: only where memory comes from
    changes). The cost: the worker's RSS stays at its peak. Process-wide, so only for worker processes
    that do nothing else (`pick_device` calls it in CPU workers); a no-op off glibc.
    """
    return _mallopt(min(limit, 2**31 - 1), 2**31 - 1, 64 * 2**20)


def default_freed_memory() -> bool:
    """Undo :func:`keep_freed_memory`: glibc's thresholds back to (about) their defaults and the kept
    memory returned to the OS. glibc's default mmap threshold is dynamic (128 KiB, rising to at most
    32 MiB as large blocks are freed); once set it stays fixed, so this sets the value the dynamic one
    settles at for activation-sized blocks (32 MiB; trim 64 MiB). For benchmarks that run code the way
    its own scripts run it beside ours, in one process."""
    ok = _mallopt(32 * 2**20, 64 * 2**20, 128 * 2**10)
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0) >= 0) and ok


@functools.lru_cache(maxsize=None)
def _libc() -> Optional[ctypes.CDLL]:
    """glibc, loaded once (the benchmarks switch the allocator before every timed call); None off Linux."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _mallopt(mmap_threshold: int, trim_threshold: int, top_pad: int) -> bool:
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # malloc.h
    ok = bool(libc.mallopt(m_mmap_threshold, ctypes.c_int(mmap_threshold)))
    ok = bool(libc.mallopt(m_trim_threshold, ctypes.c_int(trim_threshold))) and ok
    return bool(libc.mallopt(m_top_pad, ctypes.c_int(top_pad))) and ok


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
        keep_freed_memory()  # a CPU worker only computes: reuse freed activations instead of page-faulting
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
    with warnings.catch_warnings():
        # max_restarts is Ray Data's documented switch (actor_pool_map_operator.py) and has no named
        # parameter yet; Ray 2.60 warns about every map argument passed by keyword this way
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map(worker, fn_constructor_args=ctor_args, compute=pool, num_cpus=compute.cpus_per_worker,
                    num_gpus=compute.gpus_per_worker or None, **actor_restarts())
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
    preflight(cfg)
    with ray_session(cfg.ray):
        summary = run(cfg, log=lambda m: print(m, flush=True))
    print(f"[{what}] summary: " + redact(json.dumps(summary)), flush=True)
    return summary


def preflight(cfg: Any) -> None:
    """Checks on the driver, before Ray or any worker starts, of what a user can get wrong and no retry
    mends: the MLflow server answers (a worker would otherwise retry for minutes, then be restarted)."""
    m = getattr(cfg, "mlflow", None)
    if m is not None and m.enabled:
        from pipeline import tracking

        tracking.check_reachable(m.tracking_uri)


# errors whose message says what to fix; anything else is a bug and keeps its traceback
_USER_ERRORS = ("UserError", "ConfigError", "FileNotFoundError", "PermissionError", "EndpointConnectionError",
                "NoCredentialsError", "AuthenticationError")


def user_error(exc: BaseException) -> Optional[str]:
    """The one-line message of a user-caused error (a bad config value, a missing file, an unreachable
    endpoint), also when it reaches the driver wrapped in Ray's task / actor errors; None for anything else."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if any(t.__name__ in _USER_ERRORS for t in type(e).__mro__):
            from pipeline.storage import redact

            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if type(e).__name__ == "EndpointConnectionError":
                text = f"storage.endpoint_url: cannot reach the object store ({text}); check the endpoint"
            return redact(text)
        # Ray wraps: a task's `cause`, Ray Train's ControllerError and WorkerGroupError
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None), getattr(e, "controller_failure", None),
                 *(getattr(e, "worker_failures", None) or {}).values()]
    return None


def cli(main: Callable[..., Any], argv: Sequence[str], what: str) -> int:
    """Run a job's ``main`` as a command: a user-caused error ends it with one readable line (exit 2)
    instead of a traceback; other errors keep theirs."""
    try:
        main(list(argv))
    except Exception as e:
        message = user_error(e)
        if message is None:
            raise
        print(f"enat {what}: error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0
