"""The session's services, one of each for the whole test run (every xdist worker shares them): a moto S3
server, a real `mlflow server` whose artifacts go to that S3 server, and a two-node Ray cluster, all on
127.0.0.1.

A service starts the first time a test asks for it, under a file lock in the session's shared temporary
root (the folder above each xdist worker's own), and writes its addresses there; every later ask, from any
worker, reads them. Each service runs in its own process group, recorded beside its addresses, and the
controlling pytest process stops every group at the end of the session (:func:`stop_all`, called from
``pytest_unconfigure``): no worker owns a service another worker still uses.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Set for the whole test session before anything imports Ray or botocore (conftest.py applies it): Ray
# stays on 127.0.0.1, sends no usage stats, and the shared cluster runs without token auth (its drivers,
# in-process or not, carry the same setting); AWS credentials are fake ones, so no test can ever reach a
# real account, and the user's AWS config files are ignored.
TEST_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # ecosystem §8.5: keep Ray on 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    # one OpenMP thread per process: the suite runs two pytest workers, a Ray cluster and job subprocesses
    # on two cores; more threads per process only oversubscribe them
    "OMP_NUM_THREADS": "1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
UNSET = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS")
# A start, a job or a child process that takes longer than this is a hang, not a slow or busy machine:
# it fails naming what hung (a service and its log; subprocess's TimeoutExpired names the command).
HANG_GUARD_S = 1200
START_GUARD_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torch_extensions_dir() -> str:
    """Where DeepSpeed's CPU op was JIT-built by infra/setup.sh: TORCH_EXTENSIONS_DIR, else torch's default
    for this interpreter (``<root>/py311_cpu``; setup.sh builds there)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return os.environ["TORCH_EXTENSIONS_DIR"]
    import torch
    from torch.utils.cpp_extension import get_default_build_root
    cu = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return os.path.join(get_default_build_root(), f"{py}_{cu}")


def session_env() -> dict[str, str]:
    """TEST_ENV plus what every process of the session must share. PATH starts with this venv's bin:
    the venv's ninja (DeepSpeed's dependency) builds DeepSpeed's CPU op, as in infra/setup.sh. With a
    system ninja of another version first on some processes' PATH, the two alternated in one build folder
    and each rebuilt the op (25-47 s of compiling, ~4 times per suite run: two command hashes in its
    .ninja_log)."""
    path = os.environ.get("PATH", "")
    if not path.startswith(f"{BIN}{os.pathsep}"):
        path = f"{BIN}{os.pathsep}{path}"
    return {**TEST_ENV, "PATH": path, "TORCH_EXTENSIONS_DIR": torch_extensions_dir()}


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the test settings, this repo importable, and ``extra``."""
    env = {**os.environ, **session_env()}
    for var in UNSET:
        env.pop(var, None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(extra)
    return env


def shared_root(basetemp: Path) -> Path:
    """The folder every process of this session sees: an xdist worker's basetemp is ``<root>/popen-gwN``."""
    root = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
    path = root / "services"
    path.mkdir(exist_ok=True)
    return path


def ensure(root: Path, name: str, start: Callable[[Path], dict]) -> dict:
    """The addresses of service `name`, starting it (``start(workdir) -> info`` with a ``pgid``) if no
    process of this session has yet."""
    from filelock import FileLock

    info_path = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if info_path.exists():
            return json.loads(info_path.read_text())
        work = root / name
        work.mkdir(exist_ok=True)
        info = start(work)
        info_path.write_text(json.dumps(info))
        return info


def stop_all(root: Path) -> None:
    """Stop every service group this session started (SIGTERM, then SIGKILL after a grace period)."""
    infos = [json.loads(p.read_text()) for p in sorted(root.glob("*.json"))]
    for info in infos:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(info["pgid"], signal.SIGTERM)
    deadline = time.time() + 30
    for info in infos:
        while time.time() < deadline and _alive(info["pgid"]):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(info["pgid"], signal.SIGKILL)


def _alive(pgid: int) -> bool:
    with contextlib.suppress(ChildProcessError):  # reap the group's leader if this process started it
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _spawn(args: list[str], work: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(work / "service.log", "wb")
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True)


def _wait(name: str, proc: subprocess.Popen, work: Path, ready: Callable[[], bool]) -> None:
    deadline = time.time() + START_GUARD_S
    while not ready():
        if proc.poll() is not None or time.time() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"{name} did not start (log {work / 'service.log'}):\n"
                               + (work / "service.log").read_text()[-3000:])
        time.sleep(0.1)


def _answers(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            return False
    return check


# ---------------------------------------------------------------------------------------------------
# the services


def start_moto(work: Path) -> dict:
    port = free_port()
    proc = _spawn([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], work, child_env())
    url = f"http://127.0.0.1:{port}"
    _wait("moto_server", proc, work, _answers(url + "/"))
    return {"pgid": proc.pid, "url": url}


@dataclass
class S3Bucket:
    endpoint: str
    bucket: str
    storage: "object"  # pipeline.sections.StorageConfig
    fs: "object"  # s3fs.S3FileSystem

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])


def new_bucket(endpoint: str, prefix: str = "test") -> S3Bucket:
    """A fresh bucket on the S3 test server at `endpoint`."""
    from pipeline.sections import StorageConfig
    from pipeline.storage import filesystem

    cfg = StorageConfig(endpoint_url=endpoint)
    bucket = f"{prefix}-{uuid.uuid4().hex[:12]}"
    fs, _ = filesystem(f"s3://{bucket}", cfg)
    fs.mkdir(bucket)
    return S3Bucket(endpoint, bucket, cfg, fs)



def start_mlflow(work: Path, s3_endpoint: str) -> dict:
    """`mlflow server` (ecosystem §8.2): sqlite backend, artifacts proxied to a bucket of the S3 test
    server, no job runner, one worker."""
    import s3fs

    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).mkdir(bucket)
    port = free_port()
    env = child_env(MLFLOW_S3_ENDPOINT_URL=s3_endpoint, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = _spawn([str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                   "--artifacts-destination", f"s3://{bucket}/runs", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"], work, env)
    url = f"http://127.0.0.1:{port}"
    _wait("mlflow server", proc, work, _answers(url + "/health"))
    return {"pgid": proc.pid, "url": url}


def start_ray_cluster(work: Path) -> dict:
    """Two Ray nodes on loopback (tests/helpers.py serve_two_node_cluster): a head (with the dashboard
    and job agent: Ray Train's state queries, `ray job submit`) and a worker node, 2 CPUs each, custom
    resources node_a / node_b, separate processes and working directories."""
    head, worker = work / "head-node", work / "worker-node"
    head.mkdir(exist_ok=True)
    worker.mkdir(exist_ok=True)
    info = work / "cluster.json"
    code = "import sys; from tests.helpers import serve_two_node_cluster; serve_two_node_cluster(*sys.argv[1:])"
    env = child_env()  # (PATH starts with this venv's bin: a submitted job's `python` is the head's)
    proc = _spawn([sys.executable, "-c", code, str(info), str(head), str(worker)], work, env)
    _wait("two-node Ray", proc, work, info.exists)
    return {"pgid": proc.pid, **json.loads(info.read_text()), "head_dir": str(head), "worker_dir": str(worker)}
