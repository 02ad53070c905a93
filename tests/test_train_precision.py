"""bf16 (and fp32) training with reuse under ZeRO-1/2/3 through the real train loop (`pipeline.train.train_loop`,
the torchrun path, in-process with a world of 1), the EMA against DeepSpeed's fp32 master weights, the
recorded data position at an epoch's end, and where the generators live.

fp16 is not trained here: DeepSpeed's CPU accelerator refuses fp16 ("Type fp16 is not supported on your
device") unless oneDNN has fp16 kernels for the CPU (AVX512-FP16/AMX-FP16); the float32 features that
enter an fp16 model are tested in tests/test_model.py, and fp16 training runs in the GPU tests.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import pytest

from tests.services import free_port
from tests.train_data import write_shapes_dataset

EMA_RATE, STEPS, WARMUP, LR = 0.9, 4, 2, 0.01


@pytest.fixture
def torchrun_env(monkeypatch):
    """What torchrun sets for a world of one. The first run's gloo process group (world 1) stays up for
    the session: DeepSpeed caches its groups, so later runs in this process reuse it."""
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                 "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(k, v)
    assert not dist.is_initialized() or dist.get_world_size() == 1


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shapes") / "tok")
    write_shapes_dataset(root)                        # 400 samples: one epoch = 4 steps of 100
    return root


def _position(ckpt_dir) -> tuple[int, int]:
    """The data position in a checkpoint's client state (in the model-states file; ZeRO-3 prefixes it)."""
    path, = (ckpt_dir / "ckpt").glob("*mp_rank_00_model_states.pt")
    state = torch.load(path, map_location="cpu", weights_only=False)
    return state["epoch"], state["epoch_batch"]


@pytest.mark.parametrize("precision,stage", [("bf16", 1), ("bf16", 2), ("bf16", 3), ("fp32", 1)])
def test_reuse_trains_and_ema_follows_fp32_masters(precision, stage, tmp_path, shapes_root, torchrun_env,
                                                        mlflow_server):
    import mlflow
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pipeline.config import load_config
    from pipeline.shards import open_split
    from pipeline.train import TrainJobConfig, train_loop

    run = f"{precision}-zero{stage}"
    cfg = load_config(TrainJobConfig, {"data": {"root": shapes_root}}, [
        "model.preset=enat-s", "model.encoder_depth=1", "model.decoder_depth=1", "model.dim=16",
        "model.num_heads=2", f"deepspeed.precision={precision}", f"deepspeed.zero_stage={stage}",
        "objective.reuse_prob=1.0", f"optim.lr={LR}", f"optim.warmup_steps={WARMUP}", "train.global_batch=100",
        f"train.steps={STEPS}", f"train.ema_rate={EMA_RATE}", "train.log_every=1", f"train.run_name={run}",
        "output.checkpoint_every=1", "output.keep_last=0", f"output.uri={tmp_path / 'ckpt'}",
        "launcher=torchrun", f"mlflow.tracking_uri={mlflow_server}", "mlflow.experiment=enat-precision",
        "mlflow.system_metrics=false"])
    train_loop({"config": cfg, "split": open_split(shapes_root, "train")})  # reuse on every batch: crashed here in bf16

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("enat-precision")
    mrun = client.search_runs([exp.experiment_id], f"tags.enat_run_name = '{run}'")[0]
    hist = {m: {h.step: h.value for h in client.get_metric_history(mrun.info.run_id, m)} for m in ("loss", "lr")}
    assert sorted(hist["loss"]) == list(range(1, STEPS + 1))
    assert all(v == v and abs(v) < 100 for v in hist["loss"].values()), hist["loss"]
    # the lr logged after update k is the one update k + 1 runs at: official min(max(k - 1, 0) / W, 1)
    for k, lr in hist["lr"].items():
        assert lr == pytest.approx(LR * min(max(k - 1, 0) / WARMUP, 1.0), abs=1e-12), (k, lr)
    assert "samples/grid.png" in [a.path for a in client.list_artifacts(mrun.info.run_id, "samples")]

    # EMA_k = r EMA_{k-1} + (1 - r) master_k, with master_k DeepSpeed's fp32 weights after update k
    # (fp32 under ZeRO-1 reads the module's weights in place: they must equal the masters too)
    root = tmp_path / "ckpt" / run
    emas, masters = {}, {}
    for k in range(1, STEPS + 1):
        d = root / f"step_{k:09d}"
        emas[k] = torch.load(d / "ema.pt")
        masters[k] = get_fp32_state_dict_from_zero_checkpoint(str(d), tag="ckpt")
    moved = max((masters[STEPS][n] - masters[1][n]).abs().max().item() for n in masters[1])
    assert moved > 1e-3                                   # the weights really trained
    for k in range(2, STEPS + 1):
        for name, e in emas[k].items():
            expect = EMA_RATE * emas[k - 1][name] + (1 - EMA_RATE) * masters[k][name].float()
            err = (e - expect).abs().max().item()
            assert err <= 1e-6, (k, name, err)

    # the last checkpoint closes the epoch: its data position is the next epoch's start
    assert _position(root / f"step_{STEPS:09d}") == (1, 0)
    assert _position(root / "step_000000002") == (0, 2)


def test_generators_follow_the_training_device():
    """The objective's generator is made on the training device (a CUDA one there), the reuse coin's on
    the CPU; both states round-trip through the checkpoint's RNG record."""
    from pipeline.train import generators, rng_state, set_rng_state

    gen, shared = generators(1234, 3, "cpu")
    assert gen.device == torch.device("cpu") and shared.device == torch.device("cpu")
    other, shared_other = generators(1234, 4, torch.device("cpu"))
    assert not torch.equal(gen.get_state(), other.get_state())          # per rank
    assert torch.equal(shared.get_state(), shared_other.get_state())    # the same on every rank
    state = rng_state(gen, shared)
    a = torch.rand(4, generator=gen)
    set_rng_state(gen, state)
    assert torch.equal(torch.rand(4, generator=gen), a)


def test_data_position_closes_the_epoch(shapes_root):
    """Each batch comes with the position after it; after an epoch's last batch that is (epoch + 1, 0)."""
    from pipeline.readers import InMemoryReader
    from pipeline.train import with_position

    reader = InMemoryReader(shapes_root, batch_size=100)
    positions = [pos for _, pos in with_position(reader)]
    assert positions == [(0, 1), (0, 2), (0, 3), (1, 0)]
    reader = InMemoryReader(shapes_root, batch_size=100, epoch=positions[-1][0], step=positions[-1][1])
    assert [pos for _, pos in with_position(reader)] == [(1, 1), (1, 2), (1, 3), (2, 0)]
