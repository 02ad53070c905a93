"""The Ray session every job shares (pipeline/cluster.py) and the driver-side config resolution.

- The embedded local Ray listens on loopback only, however the job is started — also when `ray` was
  imported before the job's entry (a notebook), when the env var Ray reads at import time is too late.
- Relative local paths in a job config are resolved on the driver, so Ray workers whose working
  directory differs read the same files (resolution here; a training job whose Ray Train workers read
  `data.root=tok` from another cwd, restarts included: tests/test_train_job.py's worker-killed test).
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.helpers import is_loopback
from tests.services import HANG_GUARD_S

# The job runs in a fresh interpreter that imports ray first; just before the job shuts its Ray down,
# every TCP listener of every process of that Ray session (the driver and all its descendants: GCS,
# raylet, dashboard agent, runtime-env agent, workers) is recorded.
_LISTENERS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import ray                       # imported first, as in a notebook: Ray reads its env vars now
    from tests.helpers import listeners

    found = []
    _shutdown = ray.shutdown

    def _record_then_shutdown(*a, **k):
        found.extend(listeners(os.getpid()))
        return _shutdown(*a, **k)

    ray.shutdown = _record_then_shutdown
    from jobs.tokenize import main
    main(sys.argv[2:])
    open(sys.argv[1], "w").write(json.dumps(found))
""")


def test_embedded_ray_listens_on_loopback_only(tmp_path, make_folder, subprocess_env):
    from enat.patch_vq import PatchVQ
    import torch

    data = make_folder(tmp_path / "imagenet", classes=("a", "b"), per_class=2, bad=False)
    weights = tmp_path / "patch.pt"
    torch.save(PatchVQ.fit(torch.rand(8, 3, 16, 16), codebook_size=8, patch=8, iters=2, seed=0).state_dict(),
               weights)
    env = {k: v for k, v in subprocess_env.items() if not k.startswith("RAY_ENABLE_WINDOWS_OR_OSX")}
    out = tmp_path / "listeners.json"
    args = [f"source.root={data.root}", "image.resolution=16", "tokenizer.kind=patch",
            f"tokenizer.weights={weights}", f"output.uri={tmp_path / 'tokens'}", "compute.progress=false", "mlflow.enabled=false",
            "ray.num_cpus=1"]
    proc = subprocess.run([sys.executable, "-c", _LISTENERS_SCRIPT, str(out), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    listeners = json.loads(out.read_text())
    procs = {x["proc"] for x in listeners}
    assert {"gcs_server", "raylet"} <= procs, listeners          # the Ray session was observed
    exposed = [x for x in listeners if not is_loopback(x["ip"])]
    assert not exposed, f"Ray listeners beyond loopback: {exposed}"


def test_resolve_locations_marks_fields_not_names(tmp_path):
    from pipeline.config import absolute_location, load_config, resolve_locations
    from pipeline.tokenize import TokenizeJobConfig

    cwd = str(tmp_path)
    assert absolute_location("a/b", cwd) == f"{cwd}/a/b"
    assert absolute_location("file://a/b", cwd) == f"file://{cwd}/a/b"
    assert absolute_location("sqlite:///m.db", cwd) == f"sqlite:///{cwd}/m.db"
    assert absolute_location("sqlite:////abs/m.db", cwd) == "sqlite:////abs/m.db"
    for url in ("s3://b/k", "gs://b/k", "memory://x", "http://127.0.0.1:5000", "/abs/x", "models:/enat-l-256@candidate", ""):
        assert absolute_location(url, cwd) == url
    cfg = load_config(TokenizeJobConfig, {"source": {"root": "s3://b/imgs"}, "output": {"uri": "tok"},
                                          "tokenizer": {"weights": "w/vq.ckpt", "preset": "mage-f16"}})
    res = resolve_locations(cfg, cwd)
    assert (res.output.uri, res.tokenizer.weights) == (f"{cwd}/tok", f"{cwd}/w/vq.ckpt")
    assert res.tokenizer.preset == "mage-f16" and res.source.root == "s3://b/imgs"   # not a location / a URL
    assert resolve_locations(res, "/elsewhere") == res                               # idempotent


def test_freed_memory_kept_then_back_to_mmap():
    """keep_freed_memory serves a large block from the heap (no fresh mmap to page-fault in); after
    default_freed_memory a block above 32 MiB is mmapped again, as with glibc's defaults (the benchmarks
    switch between the two per call). Run in a fresh process: the settings are process-wide."""
    script = textwrap.dedent("""
        import ctypes, json
        from pipeline.cluster import default_freed_memory, keep_freed_memory

        libc = ctypes.CDLL("libc.so.6")
        class Info(ctypes.Structure):   # struct mallinfo2 (glibc >= 2.33)
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
        libc.mallinfo2.restype = Info
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]

        def mmapped_by(size):
            before = libc.mallinfo2().hblkhd
            p = libc.malloc(size)
            grew = libc.mallinfo2().hblkhd - before
            libc.free(p)
            return grew

        out = {"kept_ok": keep_freed_memory(), "kept": mmapped_by(64 << 20),
               "default_ok": default_freed_memory(), "default_big": mmapped_by(64 << 20),
               "default_mid": mmapped_by(8 << 20)}
        print(json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["kept_ok"] and got["default_ok"], got
    assert got["kept"] == 0, got                      # from the heap: kept memory is reused
    assert got["default_big"] >= 64 << 20, got       # a fresh mmap, as glibc's default does for it
    assert got["default_mid"] == 0, got               # below the 32 MiB threshold: the heap
