"""GPU checks (marker ``gpu``), skipped where CUDA is absent.

    python -m pytest -q -m gpu tests/test_gpu.py                          # on a CUDA machine
    ENAT_TEST_DEVICE=cpu python -m pytest -q -m gpu tests/test_gpu.py     # the same checks on the CPU

``ENAT_TEST_DEVICE`` (default ``cuda``) names the device under test; ``benchmarks/gpu_check.sh --smoke``
runs this file with ``cpu`` so that CI executes the same code paths (the CPU-vs-CPU comparisons are then
trivially close; the GPU run is what the tolerances are for). Every model is a small random one of the
real architecture, as the other tests build them.
"""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import enat
from tests.helpers import fid_recipe_state_dict, random_model, tiny_config

ROOT = Path(__file__).resolve().parents[1]
DEVICE = os.environ.get("ENAT_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE.startswith("cuda") and not torch.cuda.is_available(),
                       reason="CUDA is not available (ENAT_TEST_DEVICE=cpu runs these checks on the CPU)"),
]


@contextlib.contextmanager
def strict_fp32():
    """fp32 means fp32 on the GPU too: no TF32 in cuDNN convolutions or cuBLAS matmuls (cuDNN's default
    allows TF32, a 10-bit mantissa), so device-vs-CPU differences are summation order only."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.cpu() == b.cpu()).float().mean().item()


# ------------------------------------------------------------------------------------------------ training


def test_bf16_deepspeed_step_with_reuse_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 1 -m jobs.train ... launcher=torchrun compute.gpus_per_worker=1
    deepspeed.precision=bf16 objective.reuse_prob=1.0`: every batch takes the reuse branch (the EMA's
    fp32 features feed the bf16 engine), the objective's random draws happen on the GPU, the EMA is saved."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("mlflow")
    from tests.services import HANG_GUARD_S, child_env, free_port
    from tests.train_data import write_shapes_dataset

    root = str(tmp_path / "tok")
    write_shapes_dataset(root, n=64, per_shard=32)
    steps = 4
    args = ["model.preset=enat-s", "model.encoder_depth=2", "model.decoder_depth=1", "model.dim=64",
            "model.num_heads=4", "optim.warmup_steps=1", "train.global_batch=16", f"train.steps={steps}",
            "train.log_every=2", "train.ema_rate=0.9", f"output.checkpoint_every={steps}", "compute.workers=1",
            f"data.root={root}", "launcher=torchrun", f"compute.gpus_per_worker={int(DEVICE != 'cpu')}",
            "deepspeed.precision=bf16", "deepspeed.zero_stage=1", "objective.reuse_prob=1.0",
            f"output.uri={tmp_path / 'ckpt'}", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db",
            "mlflow.system_metrics=false"]
    env = {**child_env(), "DS_ACCELERATOR": "cpu" if DEVICE == "cpu" else "cuda",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1", "--master-addr",
                        "127.0.0.1", "--master-port", str(free_port()), "-m", "jobs.train", *args],
                       capture_output=True, text=True, timeout=HANG_GUARD_S, cwd=str(ROOT), env=env)
    log = r.stdout[-4000:] + r.stderr[-4000:]
    assert r.returncode == 0, log
    assert f"step {steps}/{steps}" in r.stdout, log
    losses = [float(x) for x in re.findall(r"\bloss (\S+)", r.stdout)]
    assert losses and all(math.isfinite(x) for x in losses), log
    if DEVICE != "cpu":
        assert "gpu_mem_gb" in r.stdout, "the step did not run on the GPU:\n" + log
    ckpt = tmp_path / "ckpt" / "enat" / f"step_{steps:09d}"
    assert (ckpt / "manifest.json").exists(), log
    ema = torch.load(ckpt / "ema.pt", map_location="cpu")
    assert all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in ema.values())


# ---------------------------------------------------------------------------------------------- generation


# Threshold: bf16 keeps 8 significant bits (relative rounding 2^-8), fp16 11. The deterministic sampler
# (mask_temp=0, sample_temp=0: argmax tokens, confidence = their log-prob) flips a token only where two
# logits are closer than that rounding, and one flip changes what later steps condition on. On this model
# (std 0.1 weights) the CPU measured 0.97 (bf16) / 0.99 (fp16); 0.90 / 0.95 leave room for other kernels
# while still catching a wrong cast (e.g. half-precision guidance or log-softmax gives < 0.8).
MIN_AGREEMENT = {"bfloat16": 0.90, "float16": 0.95}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_generation_half_precision_agrees_with_fp32(dtype):
    cfg = tiny_config(dim=64, seq_len=64, codebook_size=64, num_classes=10)
    model = random_model(cfg, seed=0, std=0.1).to(DEVICE)
    labels = torch.arange(16, device=DEVICE) % cfg.num_classes

    def run(dt: str) -> torch.Tensor:
        sc = enat.SamplerConfig(mask_temp=0.0, sample_temp=0.0, dtype=dt)
        return enat.generate(model, labels, sc, generator=torch.Generator(DEVICE).manual_seed(0))

    with strict_fp32():
        ref = run("float32")
    out = run(dtype)
    assert out.device.type == torch.device(DEVICE).type and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < cfg.codebook_size
    assert ref.unique().numel() > 8, "degenerate model: every token alike, agreement would mean nothing"
    assert agreement(out, ref) >= MIN_AGREEMENT[dtype]
    # the stochastic sampler on the device: reproducible from a generator on that device
    sc = enat.SamplerConfig(dtype=dtype)
    a = enat.generate(model, labels, sc, generator=torch.Generator(DEVICE).manual_seed(1))
    b = enat.generate(model, labels, sc, generator=torch.Generator(DEVICE).manual_seed(1))
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- VQGAN and Inception

GOLDEN = ROOT / "tests" / "golden"


def test_vqgan_on_device_matches_cpu():
    """Codes agree on >= 99 % of tokens (a nearest-codebook tie may fall the other way under another
    summation order); decode differs by <= 1e-3 in [0, 1] images (fp32, TF32 off)."""
    from enat.vqgan import VQGAN, VQGANConfig

    g = torch.load(GOLDEN / "vqgan_small.pt", map_location="cpu", weights_only=True)
    sd = {k: q.float() * 2.0 ** e for k, (q, e) in g["state_dict_int8"].items()}
    cpu = VQGAN.from_official(sd, VQGANConfig(**g["config"]))
    dev = VQGAN.from_official(sd, VQGANConfig(**g["config"])).to(DEVICE)
    images = g["images_u8"].float() / 255
    with strict_fp32():
        codes_cpu, codes_dev = cpu.encode(images), dev.encode(images.to(DEVICE))
        assert codes_dev.device.type == torch.device(DEVICE).type
        assert agreement(codes_dev, codes_cpu) >= 0.99
        dec_cpu, dec_dev = cpu.decode(codes_cpu), dev.decode(codes_cpu.to(DEVICE))
    assert (dec_dev.cpu() - dec_cpu).abs().max().item() <= 1e-3
    # the bf16 decode path (the sample job's decode_dtype) runs on the device and stays close
    dec_bf16 = dev.decode(codes_cpu.to(DEVICE), dtype=torch.bfloat16)
    assert dec_bf16.dtype == torch.float32 and (dec_bf16.cpu() - dec_cpu).abs().mean().item() <= 2e-2


def _inception():
    from enat.inception import FIDInception

    layout = [(k, tuple(v.shape)) for k, v in FIDInception().state_dict().items()]
    return FIDInception.from_pytorch_fid(fid_recipe_state_dict(layout, 0))


def test_fid_inception_on_device_matches_cpu():
    """pool3 and logits within 1e-3 relative (fp32, TF32 off; 94 conv + BN layers of summation-order
    differences stay far below that)."""
    net = _inception()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with strict_fp32():
        pool_cpu, logits_cpu = net(images)
        net_dev = net.to(DEVICE)
        pool_dev, logits_dev = net_dev(images.to(DEVICE))
    assert pool_dev.device.type == torch.device(DEVICE).type and pool_dev.dtype == torch.float32
    for a, b in ((pool_dev, pool_cpu), (logits_dev, logits_cpu)):
        assert ((a.cpu() - b).abs().max() / b.abs().max()).item() <= 1e-3


# ----------------------------------------------------------------------------------- the sample job's unit


def test_sample_unit_runner_on_device(tmp_path):
    """pipeline.sample.UnitRunner (what every sample actor runs) on the device: generate → decode →
    Inception → write → commit; the images agree with a CPU run of the same unit (deterministic sampler)."""
    from enat.patch_vq import PatchVQ
    from pipeline import sample
    from pipeline.commits import PARTS_DIR

    cfg = tiny_config(codebook_size=32, num_classes=4)
    codebook = torch.rand(32, 3 * 8 * 8, generator=torch.Generator().manual_seed(2))
    sampler = enat.SamplerConfig(mask_temp=0.0, sample_temp=0.0)
    unit = sample.make_units(8, 8, 0, np.arange(8) % 4)[0]

    def run(device: str, out: Path) -> tuple[dict, np.ndarray]:
        runner = sample.UnitRunner(random_model(cfg, seed=1, std=0.1).to(device),
                                     PatchVQ(32, 8, codebook=codebook).to(device), _inception().to(device),
                                     sampler, str(out), batch_size=4, is_total=8, is_splits=2,
                                     output=sample.OutputSection(uri=str(out), grid=0), png_threads=1)
        assert runner.device.type == torch.device(device).type
        with strict_fp32():
            rec = runner.run(unit, "gpu-test")
        files = rec["files"]
        npz = next(k for k in files if k.endswith(".npz") and not k.startswith("stats"))
        return rec, np.load(io.BytesIO((out / npz).read_bytes()))["arr_0"]

    rec, images = run(DEVICE, tmp_path / "dev")
    assert (tmp_path / "dev" / PARTS_DIR / f"{unit.unit:06d}.json").exists()
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    assert all(v >= 0 for v in rec["seconds"].values())
    stats = [k for k in rec["files"] if k.startswith("stats")]
    assert stats, rec["files"]
    with np.load(io.BytesIO((tmp_path / "dev" / stats[0]).read_bytes())) as z:
        assert all(np.isfinite(z[k]).all() for k in z.files if z[k].dtype.kind == "f")
    _, images_cpu = run("cpu", tmp_path / "cpu")
    assert (images == images_cpu).mean() >= 0.9
