"""Shared fixtures: a real moto S3 server on 127.0.0.1, a session-scoped local Ray on loopback, and
generators of small image datasets full of bad inputs.

Environment set here for the whole test session (before anything imports Ray or botocore):
Ray stays on 127.0.0.1 and sends no usage stats; AWS credentials are fake ones, so no test can
ever reach a real account; the user's AWS config files are ignored.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import struct
import subprocess
import sys
import time
import urllib.request
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent

_TEST_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # ecosystem §8.5: keep Ray on 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
os.environ.update(_TEST_ENV)
for _var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
    os.environ.pop(_var, None)


def service_env() -> dict[str, str]:
    """The env vars above, for subprocesses and Ray workers."""
    return dict(_TEST_ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the process group `proc` leads, wait up to `grace_s`, then SIGKILL what is left."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------
# moto S3 server


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """URL of a moto S3 server on 127.0.0.1 (one per session; stopped by PID at the end)."""
    port = free_port()
    exe = Path(sys.executable).with_name("moto_server")
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, **_TEST_ENV})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/", timeout=1) as r:
                if r.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError(f"moto_server did not start on {url}")
        time.sleep(0.1)
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@dataclass
class S3Bucket:
    endpoint: str
    bucket: str
    storage: "object"  # pipeline.sections.StorageConfig
    fs: "object"  # s3fs.S3FileSystem

    def url(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])


@pytest.fixture
def s3_bucket(moto_endpoint) -> S3Bucket:
    """A fresh bucket on the moto server, with the StorageConfig and an s3fs client for it."""
    from pipeline.sections import StorageConfig
    from pipeline.storage import filesystem

    cfg = StorageConfig(endpoint_url=moto_endpoint)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs, _ = filesystem(f"s3://{bucket}", cfg)
    fs.mkdir(bucket)
    return S3Bucket(moto_endpoint, bucket, cfg, fs)


def upload_dir(fs, local: Path, dest: str) -> None:
    """Copy a local folder tree to an object-store prefix (``dest`` without scheme)."""
    for p in sorted(local.rglob("*")):
        if p.is_file():
            fs.pipe_file(f"{dest}/{p.relative_to(local).as_posix()}", p.read_bytes())


@pytest.fixture
def s3_upload():
    return upload_dir


# ---------------------------------------------------------------------------------------------------
# Ray


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray on 127.0.0.1 for the session: 2 CPUs, 200 MB object store."""
    import ray

    from pipeline.cluster import worker_env

    started = False
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=200 * 2**20, include_dashboard=False,
                 runtime_env={"env_vars": {**_TEST_ENV, **worker_env()}}, log_to_driver=False)
        started = True
    yield ray
    if started:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------------
# Synthetic datasets with every kind of bad input


def _rand_image(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    # smooth random image: low-res noise upsampled, so codes vary across the picture
    small = rng.integers(0, 256, (max(2, h // 8), max(2, w // 8), 3), dtype=np.uint8)
    from PIL import Image

    return np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))


def _encode(arr_or_img, fmt: str, **kw) -> bytes:
    from PIL import Image

    im = arr_or_img if isinstance(arr_or_img, Image.Image) else Image.fromarray(arr_or_img)
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG whose header claims ``width × height`` pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # 1-bit grayscale
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def bad_images(rng: np.random.Generator) -> dict[str, tuple[bytes, str | None]]:
    """name → (file bytes, expected reject reason or None when it must be converted and kept)."""
    from PIL import Image

    base = _rand_image(rng, 48, 40)
    good_jpeg = _encode(base, "JPEG", quality=90)
    rgba = np.concatenate([base, rng.integers(0, 256, (40, 48, 1), dtype=np.uint8)], axis=-1)
    pal = Image.fromarray(base).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    sixteen = Image.fromarray((rng.integers(0, 65535, (40, 48))).astype(np.uint16))
    big_jpeg = _encode(_rand_image(rng, 200, 160), "JPEG", quality=95)
    return {
        "truncated.JPEG": (big_jpeg[: len(big_jpeg) * 2 // 3], "truncated"),  # header intact, data cut
        "truncatedhead.JPEG": (good_jpeg[:300], "truncated"),  # cut inside the header
        "notimage.JPEG": (b"this is not an image at all\n" * 10, "not-an-image"),
        "empty.JPEG": (b"", "empty"),
        "tiny.png": (_encode(_rand_image(rng, 4, 3), "PNG"), "tiny"),
        "bomb.png": (png_bomb(), "decompression-bomb"),
        "cmyk.JPEG": (_encode(Image.fromarray(base).convert("CMYK"), "JPEG"), None),
        "gray.JPEG": (_encode(Image.fromarray(base).convert("L"), "JPEG"), None),
        "palette.png": (_encode(pal, "PNG"), None),
        "sixteen.png": (_encode(sixteen, "PNG"), None),
        "alpha.png": (_encode(Image.fromarray(rgba, "RGBA"), "PNG"), None),
    }


@dataclass
class ImageFolderData:
    root: Path
    split: str
    classes: list[str]
    files: dict[str, str | None]  # relative path under root → expected reject reason (None = kept)
    converted: set[str]  # relative paths expected to be converted from another mode


def make_image_folder(root: Path, split: str = "train", classes=("n02", "n01", "n03"), per_class: int = 6,
                      seed: int = 0, bad: bool = True, size=(40, 72)) -> ImageFolderData:
    """ImageNet layout ``root/split/<class>/<img>.JPEG`` with random sizes; ``bad`` adds every bad input."""
    rng = np.random.default_rng(seed)
    files: dict[str, str | None] = {}
    converted: set[str] = set()
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(x) for x in rng.integers(size[0], size[1], 2))
            rel = f"{split}/{c}/{c}_{i:04d}.JPEG"
            (root / rel).write_bytes(_encode(_rand_image(rng, w, h), "JPEG", quality=92))
            files[rel] = None
    if bad:
        c = sorted(classes)[0]
        for name, (data, reason) in bad_images(rng).items():
            rel = f"{split}/{c}/zz_{name}"
            (root / rel).write_bytes(data)
            files[rel] = reason
            if reason is None:
                converted.add(rel)
        rel = f"{split}/{c}/readme.txt"  # wrong extension: recorded, not silently dropped
        (root / rel).write_text("notes")
        files[rel] = "extension"
    return ImageFolderData(root, split, sorted(classes), files, converted)


@pytest.fixture
def image_folder(tmp_path) -> ImageFolderData:
    return make_image_folder(tmp_path / "imagenet")


@dataclass
class CocoData:
    root: Path
    split: str
    captions: dict[str, list[str]]  # key of every image that must be kept → its captions
    rejects: dict[str, str]  # key → expected reason


def make_coco(root: Path, split: str = "train2014", n: int = 8, seed: int = 0) -> CocoData:
    """COCO layout: annotations/captions_<split>.json + <split>/*.jpg, with bad entries."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(parents=True, exist_ok=True)
    images, anns, captions, rejects = [], [], {}, {}
    aid = 1
    for i in range(n):
        iid = 1000 - 7 * i  # ids not in file order: listing must sort by id
        name = f"COCO_{split}_{iid:012d}.jpg"
        w, h = (int(x) for x in rng.integers(40, 80, 2))
        (root / split / name).write_bytes(_encode(_rand_image(rng, w, h), "JPEG"))
        images.append({"id": iid, "file_name": name, "width": w, "height": h})
        caps = [f"a photo number {i} variant {j} of something" for j in range(int(rng.integers(1, 4)))]
        for c in caps:
            anns.append({"id": aid, "image_id": iid, "caption": c})
            aid += 1
        captions[name[:-4]] = caps
    # an image with no caption
    name = f"COCO_{split}_{5:012d}.jpg"
    (root / split / name).write_bytes(_encode(_rand_image(rng, 50, 50), "JPEG"))
    images.append({"id": 5, "file_name": name, "width": 50, "height": 50})
    rejects[name[:-4]] = "no-caption"
    # a caption pointing to an image entry whose file is missing
    name = f"COCO_{split}_{6:012d}.jpg"
    images.append({"id": 6, "file_name": name, "width": 50, "height": 50})
    anns.append({"id": aid, "image_id": 6, "caption": "the image is gone"})
    aid += 1
    rejects[name[:-4]] = "missing-image"
    # a caption pointing to an image id that is not listed at all
    anns.append({"id": aid, "image_id": 424242, "caption": "dangling"})
    rejects[f"ann-{aid}"] = "missing-image"
    # a broken image file with captions
    name = f"COCO_{split}_{7:012d}.jpg"
    (root / split / name).write_bytes(b"")
    images.append({"id": 7, "file_name": name, "width": 50, "height": 50})
    anns.append({"id": aid + 1, "image_id": 7, "caption": "empty file"})
    rejects[name[:-4]] = "empty"
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return CocoData(root, split, captions, rejects)


@pytest.fixture
def coco_data(tmp_path) -> CocoData:
    return make_coco(tmp_path / "coco")


@pytest.fixture
def make_folder():
    """The image-folder generator (``make_folder(root, split=…, per_class=…, bad=…, seed=…)``)."""
    return make_image_folder


@pytest.fixture
def subprocess_env() -> dict[str, str]:
    """Environment for child processes (jobs, simulated ranks): the test env + this repo importable."""
    env = {**os.environ, **_TEST_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture
def make_coco_data():
    return make_coco


# ---------------------------------------------------------------------------------------------------
# MLflow


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, moto_endpoint):
    """URL of a real `mlflow server` on 127.0.0.1 (ecosystem §8.2): sqlite backend, artifacts proxied to a
    bucket of the S3 test server, no job runner, one worker; stopped by PID (SIGTERM) at the end."""
    import signal

    import s3fs

    work = tmp_path_factory.mktemp("mlflow-shared")
    bucket = f"mlflow-{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem(endpoint_url=moto_endpoint).mkdir(bucket)
    port = free_port()
    env = {**os.environ, **_TEST_ENV, "MLFLOW_S3_ENDPOINT_URL": moto_endpoint,
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(work / "server.log", "wb")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{work}/mlflow.db", "--artifacts-destination", f"s3://{bucket}/runs",
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"mlflow server did not start: {(work / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)
    yield url
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


# ---------------------------------------------------------------------------------------------------
# A real Ray head for `ray job submit` tests


@contextlib.contextmanager
def local_ray_head(env: dict[str, str]):
    """`ray start --head` on free loopback ports, its own process group and temp dir (no clash with any
    other Ray on the machine); yields the dashboard URL once its job agent accepts jobs; stopped by
    process group. `env` should put the venv's bin first on PATH: a job's `python` is the head's."""
    import shutil
    import tempfile

    from ray.job_submission import JobSubmissionClient

    gcs, dash = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's unix socket paths are length-limited
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                             "--num-cpus=2", "--object-store-memory=100000000", "--disable-usage-stats",
                             f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
                             f"--dashboard-agent-grpc-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                             f"--metrics-export-port={free_port()}", f"--ray-client-server-port={free_port()}"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while True:
            try:
                JobSubmissionClient(url).list_jobs()
                break
            except Exception:  # not up yet (connection refused / "No available agent")
                assert head.poll() is None and time.time() < deadline, "ray head did not start"
                time.sleep(0.5)
        yield url
    finally:
        stop_process_group(head, 20)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# Two Ray nodes on loopback


@dataclass
class TwoNodeRay:
    address: str  # GCS address (RAY_ADDRESS for job drivers)
    dashboard: str  # host:port of the head's dashboard (state API)
    nodes: dict  # "node_a" (head) / "node_b" (worker) -> Ray node id
    head_dir: Path  # working directory of the head node's processes
    worker_dir: Path  # working directory of the worker node's processes
    pid: int  # the process that owns both nodes (its descendants are the cluster)


@pytest.fixture
def two_node_ray(tmp_path, subprocess_env):
    """A head and a worker Ray node (2 logical CPUs each, custom resources node_a / node_b), separate
    node processes and working directories (one Ray session directory), all on 127.0.0.1 (tests/helpers.py
    serve_two_node_cluster); stopped by process group."""
    head_dir, worker_dir = tmp_path / "head-node", tmp_path / "worker-node"
    head_dir.mkdir()
    worker_dir.mkdir()
    info = tmp_path / "cluster.json"
    env = {**subprocess_env, "RAY_AUTH_MODE": "disabled"}
    log = open(tmp_path / "cluster.log", "wb")
    code = ("import sys; from tests.helpers import serve_two_node_cluster; "
            "serve_two_node_cluster(*sys.argv[1:])")
    proc = subprocess.Popen([sys.executable, "-c", code, str(info), str(head_dir), str(worker_dir)], env=env,
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not info.exists():
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("two-node Ray did not start: " + (tmp_path / "cluster.log").read_text()[-3000:])
            time.sleep(0.2)
        d = json.loads(info.read_text())
        yield TwoNodeRay(d["address"], d["dashboard"], d["nodes"], head_dir, worker_dir, proc.pid)
    finally:
        stop_process_group(proc, 30)
        log.close()


# ---------------------------------------------------------------------------------------------------
# GPU tests


# The longest test files first (measured with --durations=0; a file's tests run on one xdist worker,
# pyproject.toml: --dist loadfile --no-loadscope-reorder): the two workers then pull the long chains at
# the start and the short files fill the gaps at the end, instead of a long file starting last.
SLOWEST_FIRST = ["test_demo.py", "test_real_path.py", "test_train_job.py", "test_sampling_job.py",
                 "test_benchmarks.py", "test_tokenize_job.py", "test_submit.py", "test_two_nodes.py",
                 "test_sampler.py", "test_objective.py", "test_pinned_outputs.py", "test_cluster.py"]


def pytest_collection_modifyitems(config, items):
    """Files in SLOWEST_FIRST order (the rest after them, as collected; tests keep their order within a
    file). Tests marked `gpu` are skipped where CUDA is absent (pyproject.toml registers the marker),
    unless ENAT_TEST_DEVICE=cpu asks to run them on the CPU (the smoke run of benchmarks/gpu_check.sh)."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available() or os.environ.get("ENAT_TEST_DEVICE") == "cpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in gpu_items:
        item.add_marker(skip)
