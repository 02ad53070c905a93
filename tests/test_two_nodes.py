"""Two Ray nodes on loopback (a head and a worker node: separate processes and working dirs), data
and checkpoints only on the S3 test server: tokenize, train with one worker per node, sample across both
nodes — each job a real entrypoint run as a Ray driver from a scratch directory that nothing reads from."""
from __future__ import annotations

import io
import subprocess
import sys
from collections import defaultdict

import torch

from tests.conftest import upload_dir
from tests.helpers import is_loopback, listeners


def _job(module: str, args: list[str], cwd, env) -> str:
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def _actor_nodes(dashboard: str) -> dict[str, set[str]]:
    """Actor class name -> the node ids its actors ran on (alive or finished), from the state API."""
    from ray.util.state import list_actors

    out: dict[str, set[str]] = defaultdict(set)
    for a in list_actors(address=f"http://{dashboard}", detail=True, limit=10_000, raise_on_missing_output=False):
        out[a.class_name].add(a.node_id)
    return out


def test_tokenize_train_sample_on_two_nodes(two_node_ray, s3_bucket, mlflow_server, make_folder, tmp_path,
                                            subprocess_env):
    from enat.patch_vq import PatchVQ

    b, ep = s3_bucket, s3_bucket.endpoint
    images = make_folder(tmp_path / "imgs", classes=("a", "b"), per_class=6, bad=False)
    upload_dir(b.fs, images.root, f"{b.bucket}/imagenet")
    buf = io.BytesIO()
    torch.save(PatchVQ.fit(torch.rand(16, 3, 16, 16), codebook_size=16, patch=4, iters=2, seed=0).state_dict(), buf)
    b.fs.pipe_file(f"{b.bucket}/weights/patch.pt", buf.getvalue())

    driver = tmp_path / "driver"                          # the drivers' cwd: empty, read by nobody
    driver.mkdir()
    env = {**subprocess_env, "RAY_ADDRESS": two_node_ray.address, "RAY_AUTH_MODE": "disabled"}
    store = [f"storage.endpoint_url={ep}"]
    _job("jobs.tokenize", store + [f"source.root={b.url('imagenet')}", "image.resolution=16", "tokenizer.kind=patch",
                                   f"tokenizer.weights={b.url('weights/patch.pt')}", f"output.uri={b.url('tok')}",
                                   "tokenize.samples_per_shard=6", "compute.workers=2", "mlflow.enabled=false",
                                   "compute.cpus_per_worker=2", "compute.progress=false"], driver, env)
    _job("jobs.train", store + [f"data.root={b.url('tok')}", "model.preset=enat-s", "model.encoder_depth=1",
                                "model.decoder_depth=1", "model.dim=32", "model.num_heads=2", "optim.warmup_steps=1",
                                "train.global_batch=8", "train.steps=2", "train.log_every=1", "train.run_name=two",
                                "deepspeed.zero_stage=1", "compute.workers=2",
                                "compute.cpus_per_worker=2", "compute.max_failures=0", "output.checkpoint_every=2",
                                f"output.uri={b.url('ckpt')}", f"mlflow.tracking_uri={mlflow_server}",
                                "mlflow.experiment=two-nodes", "mlflow.system_metrics=false"], driver, env)
    ckpt = b.url("ckpt/two/step_000000002")
    assert b.fs.exists(f"{ckpt}/ema.pt")
    _job("jobs.sample", store + [f"model.checkpoint={ckpt}/ema.pt", "tokenizer.kind=patch",
                                 f"tokenizer.weights={b.url('weights/patch.pt')}", "plan.num_samples=8",
                                 "plan.unit_size=2", "plan.batch_size=2", "compute.workers=2", "compute.cpus_per_worker=2",
                                 "compute.png_threads=1", "compute.progress=false", f"output.uri={b.url('samples')}",
                                 "output.grid=0", "mlflow.enabled=false"], driver, env)
    assert b.fs.ls(b.url("samples")), "no samples written"
    assert not list(driver.iterdir()), list(driver.iterdir())      # no job wrote beside its driver either
    # Ray Train's workers (2 x 2 CPUs on two 2-CPU nodes) ran one per node. The tokenize and sample
    # actor pools (2 actors x 2 CPUs) can only be placed one per node too; the state API does not keep
    # Ray Data's finished actors, so their placement is implied by the resources, not listed here.
    placed = _actor_nodes(two_node_ray.dashboard)
    assert placed["RayTrainWorker"] == set(two_node_ray.nodes.values()), placed
    bad = [l for l in listeners(two_node_ray.pid) if not is_loopback(l["ip"])]
    assert not bad, f"listeners beyond loopback: {bad}"
