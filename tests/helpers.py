"""Small shared builders for the tests (tiny random models of the real architecture)."""
from __future__ import annotations

import math
import os
import signal
import time

import torch

import enat
from tests.services import HANG_GUARD_S, torch_extensions_dir


def tiny_config(**kw) -> enat.ENATConfig:
    base = dict(encoder_depth=2, decoder_depth=1, dim=32, num_heads=4, seq_len=16, codebook_size=24,
                num_classes=10)
    base.update(kw)
    return enat.ENATConfig(**base)


def random_model(config: enat.ENATConfig, seed: int = 0, std: float = 0.2) -> enat.ENAT:
    """A model with *every* parameter random (the official init zeroes adaLN, which hides paths)."""
    torch.manual_seed(seed)
    m = enat.ENAT(config)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * std)
    return m.eval()


def fid_recipe_state_dict(layout, seed: int) -> dict:
    """Seeded, well-scaled random weights for pytorch-fid's Inception layout [(key, shape), ...]: He-normal
    conv / fc weights, BN gamma and running_var in [0.5, 1.5), beta, running_mean and fc bias N(0, 0.1^2),
    so activations stay O(1) through the 94 conv+BN layers. tests/golden/make_fid_golden.py builds the
    golden file from the same function."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in sorted(layout):
        shape = tuple(shape)
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(0, dtype=torch.int64)
        elif key.endswith(("running_var", "bn.weight")):
            sd[key] = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("running_mean", "bn.bias", "fc.bias")):
            sd[key] = torch.randn(shape, generator=g) * 0.1
        else:
            sd[key] = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
    return sd


def upload_dir(fs, local, dest: str) -> None:
    """Copy a local folder tree to an object-store prefix (``dest`` without scheme)."""
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{dest}/{p.relative_to(local).as_posix()}", p.read_bytes())


def kill_after_commits(proc, parts, n: int, log_path, what: str, timeout: float = HANG_GUARD_S) -> int:
    """SIGKILL the job started as `proc` (its own process group: the driver and the Ray it started) once
    `parts` holds n commit records (*.json); returns how many were committed."""
    deadline = time.time() + timeout
    try:
        while len(list(parts.glob("*.json"))) < n:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, f"no {what} committed in time"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return len(list(parts.glob("*.json")))


# ---------------------------------------------------------------------------------------------------
# Listening sockets and a two-node Ray cluster on loopback


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4-mapped loopback (::ffff:127.0.0.1, which Python < 3.13 calls global)."""
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def listeners(pid: int) -> list[dict]:
    """Every TCP LISTEN socket of process `pid` and its descendants: [{proc, pid, ip, port}]."""
    import psutil

    root = psutil.Process(pid)
    found = []
    for p in [root, *root.children(recursive=True)]:
        try:
            conns, name = p.net_connections(kind="tcp"), p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        found += [{"proc": name, "pid": p.pid, "ip": c.laddr.ip, "port": c.laddr.port}
                  for c in conns if c.status == psutil.CONN_LISTEN]
    return found


def serve_two_node_cluster(info_path: str, head_dir: str, worker_dir: str, cpus: int = 2) -> None:
    """Run a head and a worker Ray node on 127.0.0.1 until SIGTERM (tests/services.py start_ray_cluster).

    `ray.cluster_utils.Cluster` starts each node's own GCS/raylet/object store as separate processes;
    `ray start --address` refuses to join with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (ecosystem §8.5),
    and with it on Ray replaces 127.0.0.1 by the routable address. Each raylet is started from its
    own directory, so the workers of the two nodes have different working directories; each node has
    its own raylet, object store and sockets, inside the one session directory Ray keeps per cluster. Writes {"address", "dashboard", "nodes": {"node_a"|"node_b": node id}}.
    """
    import json
    import signal

    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    ray_constants.ENABLE_RAY_CLUSTER = False                     # every node binds 127.0.0.1
    os.chdir(head_dir)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": cpus, "resources": {"node_a": 1}, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": 0, "object_store_memory": 120 * 2**20, "node_ip_address": "127.0.0.1"})
    os.chdir(worker_dir)
    worker = cluster.add_node(num_cpus=cpus, resources={"node_b": 1}, object_store_memory=120 * 2**20,
                              node_ip_address="127.0.0.1")
    os.chdir(head_dir)
    done = []
    signal.signal(signal.SIGTERM, lambda *_: done.append(1))
    info = {"address": cluster.address, "dashboard": cluster.webui_url,
            "nodes": {"node_a": cluster.head_node.node_id, "node_b": worker.node_id}}
    with open(info_path + ".tmp", "w") as f:
        json.dump(info, f)
    os.replace(info_path + ".tmp", info_path)
    while not done:
        time.sleep(0.2)
    cluster.shutdown()


# ---------------------------------------------------------------------------------------------------
# Running a job as a user does: a fresh process, a fresh HOME, nothing of the test session's env


def user_env(home) -> dict[str, str]:
    """A user's environment for a job started in a fresh process: HOME is `home` (so nothing lands in the
    real one), no Ray / MLflow settings of the test session, this repo importable."""
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "MLFLOW_"))}
    env.pop("RAY_ADDRESS", None)
    env.update(HOME=str(home), PYTHONPATH=str(repo), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               # DeepSpeed's compiled CPU op stays where infra/setup.sh built it (not in the fresh HOME)
               TORCH_EXTENSIONS_DIR=torch_extensions_dir())
    return env
