"""The sample job (and the fid-stats job) end to end on a real local Ray, on CPU: a small random ENAT of
the real architecture, a PatchVQ decoder and a random-weights FID Inception of the real architecture
(loaded from a weights file, as pytorch-fid's would be).

Checked: the exact merge (merged FID = single-pass FID = a scipy sqrtm reference on the same features),
exact sample count and class balance, identical outputs whatever the worker count, kill-and-rerun giving
byte-identical statistics, FID reported as unavailable without Inception weights, and the MLflow run (a
real `mlflow server` subprocess) carrying the metrics and the sample grid."""
from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
import yaml
from PIL import Image

import enat
from enat import FeatureStats, FIDInception, ISStats, inception_score
from pipeline import sample
from pipeline.commits import unit_seed
from pipeline.config import ConfigError, load_config
from pipeline.models import device_dtype
from pipeline.sample import FidStatsJobConfig, SampleJobConfig
from tests.helpers import fid_recipe_state_dict, kill_after_commits, random_model, tiny_config

N, CLASSES, UNIT, BATCH = 32, 4, 6, 4  # 6 units (the last holds 2), 2 batches per unit
TINY = {"preset": "enat-s", "encoder_depth": 2, "decoder_depth": 1, "dim": 32, "num_heads": 4, "seq_len": 16,
        "codebook_size": 32, "num_classes": CLASSES}


# ---------------------------------------------------------------------------------------------------
# Assets: weights files of small random models of the real architectures


def _inception_state_dict(seed: int = 0) -> dict:
    layout = [(k, tuple(v.shape)) for k, v in FIDInception().state_dict().items()]
    return fid_recipe_state_dict(layout, seed)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from enat.patch_vq import PatchVQ

    d = tmp_path_factory.mktemp("assets")
    cfg = tiny_config(codebook_size=32, num_classes=CLASSES)
    torch.save(random_model(cfg, seed=1).state_dict(), d / "enat.pt")
    tok = PatchVQ(32, 8, codebook=torch.rand(32, 3 * 8 * 8, generator=torch.Generator().manual_seed(2)))
    torch.save(tok.state_dict(), d / "patch_vq.pt")
    torch.save(_inception_state_dict(), d / "inception.pt")
    real = d / "real"  # real images for the reference statistics: nested folders, one broken file
    rng = np.random.default_rng(3)
    for i in range(12):
        sub = real / f"c{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        small = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
        Image.fromarray(small).resize((40, 48), Image.BILINEAR).save(sub / f"img{i:02d}.png")
    (real / "c0" / "broken.png").write_bytes(b"not a png")
    (real / "notes.txt").write_text("ignored: not an image extension")
    return d


def _job_config(assets: Path, out: Path, **over) -> dict:
    cfg = {"model": {"checkpoint": str(assets / "enat.pt"), **TINY},
           "tokenizer": {"kind": "patch", "weights": str(assets / "patch_vq.pt")},
           "plan": {"num_samples": N, "unit_size": UNIT, "batch_size": BATCH, "seed": 7},
           "inception": {"weights": str(assets / "inception.pt")},
           "output": {"uri": str(out), "features": True, "grid": 8},
           "compute": {"workers": 2, "cpus_per_worker": 1, "png_threads": 2, "progress": False},
           "mlflow": {"enabled": False}}
    for k, v in over.items():
        sec, name = k.split("__")
        cfg.setdefault(sec, {})[name] = v
    return cfg


def _run(cfg: dict, tmp_path: Path) -> dict:
    from jobs.sample import main

    path = tmp_path / f"sample-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["--config", str(path)])


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


def _unit_files(out: Path) -> dict[str, str]:
    """Every unit's files → sha256, from the commit records."""
    files = {}
    for p in sorted((out / "_parts").glob("*.json")):
        rec = json.loads(p.read_text())
        files.update({k: v["sha256"] for k, v in rec["files"].items()})
    return files


# ---------------------------------------------------------------------------------------------------
# Pure parts: the exact merge, the plan


def test_merge_is_exact_and_matches_single_pass_and_scipy():
    rng = np.random.default_rng(0)
    d, n = 64, 203
    x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + rng.random(d)
    y = rng.standard_normal((150, d)) @ rng.standard_normal((d, d)) * 0.25
    logits = rng.standard_normal((n, 1008)) * 3
    cuts = [0, 1, 17, 60, 61, 130, n]  # uneven units, one of a single sample
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        f = FeatureStats.empty(d).update(x[a:b])
        s = ISStats.empty(n, 10).update(torch.from_numpy(logits[a:b]), a)
        parts.append((f, s))
    merged, is_merged = sample.merge_stats(reversed(parts))  # any order: sums
    single = FeatureStats.empty(d).update(x)
    assert merged.n == single.n == n
    mu, sigma = merged.mean_cov()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    mu_y, sigma_y = y.mean(0), np.cov(y, rowvar=False)
    # scipy reference, written out (pytorch-fid's formula)
    s_x = np.cov(x, rowvar=False)
    covmean = scipy.linalg.sqrtm(s_x @ sigma_y).real
    ref = float(((x.mean(0) - mu_y) ** 2).sum() + np.trace(s_x) + np.trace(sigma_y) - 2 * np.trace(covmean))
    for method in ("eigvals", "sqrtm"):
        fid_merged = enat.frechet_distance(mu, sigma, mu_y, sigma_y, method=method)
        fid_single = enat.frechet_distance(*single.mean_cov(), mu_y, sigma_y, method=method)
        assert fid_merged == pytest.approx(fid_single, rel=1e-10)
        assert fid_merged == pytest.approx(ref, rel=1e-8)
    assert is_merged.score() == pytest.approx(inception_score(logits, 10), rel=1e-10)
    # the per-unit file round trip is exact
    f2, s2 = sample.stats_from_npz(sample.stats_npz_bytes(*parts[2]))
    assert f2.n == parts[2][0].n and torch.equal(f2.outer, parts[2][0].outer)
    assert torch.equal(s2.p_sum, parts[2][1].p_sum)


def test_plan_is_balanced_and_independent_of_workers(tmp_path, assets):
    labels = sample.balanced_labels(50_000, 1000)
    assert np.array_equal(labels, np.arange(1000).repeat(50))  # as official
    units = sample.make_units(N, UNIT, 7, sample.balanced_labels(N, CLASSES))
    assert [u.count for u in units] == [6, 6, 6, 6, 6, 2]
    flat = [lab for u in units for lab in u.labels]
    assert np.bincount(flat).tolist() == [N // CLASSES] * CLASSES
    # a unit's seed is a function of (seed, unit) only; distinct per unit and per seed
    assert [u.seed for u in units] == [unit_seed(7, u) for u in range(6)]
    assert len({u.seed for u in units}) == 6 and unit_seed(8, 0) != units[0].seed
    assert sample.Unit.from_row(units[3].row("fp")) == units[3]
    with pytest.raises(ConfigError, match="plan.num_samples: 30 is not a multiple of the model's 4 classes"):
        sample.balanced_labels(30, CLASSES)
    u1, u2 = sample.uniform_labels(100, 10, 1), sample.uniform_labels(100, 10, 1)
    assert np.array_equal(u1, u2) and len(set(u1.tolist())) > 5
    prompts = sample.read_prompts(json.dumps({"images": [{"id": 9}, {"id": 2}, {"id": 5}], "annotations": [
        {"image_id": 9, "caption": "a"}, {"image_id": 2, "caption": "b"}, {"image_id": 9, "caption": "c"}]}).encode(),
        "captions_val2014.json")
    assert prompts == [["b"], ["a", "c"]]  # by image id; an image without captions is dropped
    caps = sample.caption_plan(prompts, 5, 0)
    assert caps == sample.caption_plan(prompts, 5, 0) and set(caps) <= {"a", "b", "c"} and "b" in caps
    # config errors name the field, before any work
    with pytest.raises(ConfigError, match="output.uri"):
        load_config(SampleJobConfig, {"model": {"checkpoint": "x.pt"}})
    with pytest.raises(ConfigError, match="sampler: SamplerConfig.cfg_scale"):
        load_config(SampleJobConfig, _job_config(assets, tmp_path, sampler__cfg_scale=-1.0))
    with pytest.raises(ConfigError, match="plan.unknown"):
        load_config(SampleJobConfig, _job_config(assets, tmp_path), ["plan.unknown=3"])
    with pytest.raises(ConfigError, match="model.preset"):
        sample.build_plan(load_config(SampleJobConfig, _job_config(assets, tmp_path, model__preset=None)))


# ---------------------------------------------------------------------------------------------------
# End to end


def test_sample_job_fid_mlflow_and_kill_resume(ray_cluster, assets, tmp_path, mlflow_server, subprocess_env):
    import mlflow

    # 1) the uninterrupted run: 2 actors x 2 units in flight, the reference statistics computed by the same
    # job from a folder of "real" images, a child MLflow run of a "training" run
    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment("enat-sample-test")
    train_run = client.create_run(exp, run_name="train").info.run_id
    out = tmp_path / "full"
    real = {"kind": "folder", "root": str(assets / "real"), "resolution": 32, "unit_size": 5, "batch_size": 4}
    cfg = _job_config(assets, out, fid__reference_images=real, output__adm_npz=True, compute__units_in_flight=2,
                      mlflow__enabled=True, mlflow__tracking_uri=mlflow_server, mlflow__parent_run_id=train_run,
                      mlflow__step=5000)
    res = _run(cfg, tmp_path)
    assert res["num_samples"] == N and res["units_run"] == 6
    ref = json.loads((out / "reference" / "manifest.json").read_text())["results"]
    assert ref["n"] == 12 and ref["rejected"] == 1 and ref["rejected_by_reason"] == {"not-an-image": 1}
    assert res["reference"]["computed"] and res["reference"]["sha256"] == ref["sha256"]
    ref_mu, ref_sigma = enat.load_reference_stats(str(out / "reference" / "fid_stats.npz"))
    per_class = N // CLASSES
    assert (res["num_labels"], res["label_counts_min"], res["label_counts_max"]) == (CLASSES, per_class, per_class)

    # the samples: exact count, each index once, class balance exact, PNG == npz pixels, ADM npz == units
    keys, cls, arrays, labels = [], [], [], []
    for u in range(6):
        members = _tar_members(out / "images" / f"{u:06d}.tar")
        with np.load(out / "npz" / f"{u:06d}.npz") as z:
            arrays.append(z["arr_0"])
            labels.append(z["arr_1"])
        for name, data in sorted(members.items()):
            key, ext = name.split(".", 1)
            if ext == "png":
                keys.append(int(key))
                png = np.asarray(Image.open(io.BytesIO(data)))
                assert np.array_equal(png, arrays[-1][int(key) - 6 * u])
            else:
                cls.append(int(data))
    assert keys == list(range(N))
    assert np.bincount(cls).tolist() == [N // CLASSES] * CLASSES
    assert np.array_equal(np.concatenate(labels), np.arange(CLASSES).repeat(N // CLASSES))
    with np.load(out / f"samples_{N}x32x32x3.npz") as z:
        assert np.array_equal(z["arr_0"], np.concatenate(arrays)) and np.array_equal(z["arr_1"], np.concatenate(labels))
    assert len({a.tobytes() for a in np.concatenate(arrays)}) == N  # distinct samples

    # merged statistics = single pass over the same features; merged FID (official eigvals numerics)
    # = a scipy sqrtm reference on those features
    feats = np.concatenate([np.load(out / "features" / f"{u:06d}.npy") for u in range(6)]).astype(np.float64)
    assert feats.shape == (N, 2048) and feats.std(0).max() > 0
    with np.load(out / "fid_stats.npz") as z:
        mu, sigma = z["mu"], z["sigma"]
    np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-10, atol=1e-12)
    s = np.cov(feats, rowvar=False)
    np.testing.assert_allclose(sigma, s, rtol=1e-8, atol=1e-10 * np.abs(sigma).max())
    # tr sqrtm(S·R) with S = AAᵀ (A: the centred features / √(n−1), 2048 × 32) equals tr sqrtm(AᵀRA): the
    # nonzero eigenvalues of XY and YX coincide. scipy's sqrtm on the 32 × 32 product instead of the
    # 2048² one (15 s on two cores) — the same number, exactly by that identity.
    a = (feats - feats.mean(0)).T / math.sqrt(N - 1)
    covmean = scipy.linalg.sqrtm(a.T @ ref_sigma @ a)
    scipy_fid = float(((feats.mean(0) - ref_mu) ** 2).sum() + np.trace(s) + np.trace(ref_sigma)
                      - 2 * np.trace(covmean).real)
    assert res["fid_method"] == "eigvals" and res["fid"] == pytest.approx(scipy_fid, rel=1e-6) and res["fid"] > 0
    assert 1.0 <= res["is"] < 1008
    # IS by torch-fidelity's protocol (shuffle seed 2020, 10 splits) over the unbiased logits of the same
    # features, not by contiguous index ranges (which a class-ordered plan caps near C / 10)
    fc = torch.load(assets / "inception.pt")["fc.weight"].double().numpy()
    logits = feats @ fc.T  # (N, 1008), FIDInception(logits_bias=False), in float64
    assert res["is_protocol"] == {"name": "torch-fidelity", "splits": 10, "shuffle_seed": 2020}
    # The job's logits are float32 dot products over 2048 features, so each carries a rounding error of
    # order √2048·2⁻²⁴·Σ|f·w| (the probabilistic bound of a float32 sum; its size, not its sign, is what a
    # CPU's kernels change). The tolerance is what an error 10x that size does to (IS, std): the reference
    # logits perturbed by it (random signs, fixed seed), twice the larger change. The std is a 5e-4
    # quantity, so a relative tolerance on it would only measure luck.
    ref_is, ref_std = inception_score(logits, 10)
    size = math.sqrt(2048) * 2.0 ** -24 * (np.abs(feats) @ np.abs(fc).T)
    signs = np.random.default_rng(0).choice([-1.0, 1.0], logits.shape)
    moved_is, moved_std = inception_score(logits + 10 * size * signs, 10)
    tol_is, tol_std = 2 * abs(moved_is - ref_is) + 1e-12, 2 * abs(moved_std - ref_std) + 1e-12
    assert abs(res["is"] - ref_is) <= tol_is and abs(res["is_std"] - ref_std) <= tol_std, \
        (res["is"], ref_is, tol_is, res["is_std"], ref_std, tol_std)
    unshuffled = inception_score(logits, 10, shuffle_seed=None)[1]       # the protocol is what differs
    assert abs(unshuffled - ref_std) > 10 * tol_std, (unshuffled, ref_std, tol_std)

    # MLflow: a child of the training run with the metrics at the given step, the params and the grid
    run = client.get_run(json.loads((out / "plan.json").read_text())["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == train_run and run.info.status == "FINISHED"
    assert run.data.metrics["fid"] == pytest.approx(res["fid"]) and run.data.metrics["n_samples"] == N
    assert run.data.metrics["is"] == pytest.approx(res["is"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "fid")] == [5000]
    assert run.data.params["sampler.preset"] == "imagenet-256"
    assert run.data.params["resolved_sampler.cfg_scale"] == "2.5" and run.data.params["plan.num_samples"] == str(N)
    assert run.data.tags["fid_available"] == "true" and run.data.tags["is_protocol"] == "torch-fidelity"
    assert run.data.params["fid.is_protocol"] == "torch-fidelity"
    assert run.data.params["is_protocol.shuffle_seed"] == "2020"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert "samples/grid.png" in artifacts
    grid = Image.open(client.download_artifacts(run.info.run_id, "samples/grid.png", str(tmp_path)))
    assert grid.size[0] >= 256 and (out / "grid.png").exists()

    # 2) the same plan with 1 actor, killed after two units are committed, then rerun with 2 actors
    killed = tmp_path / "killed"
    kcfg = _job_config(assets, killed, compute__workers=1, compute__throttle_s=0.5)
    path = tmp_path / "killed.yaml"
    path.write_text(yaml.safe_dump(kcfg))
    log = open(tmp_path / "killed.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jobs.sample", "--config", str(path)], cwd=tmp_path,
                            env=ray_cluster.driver_env(subprocess_env), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)                # its own driver on the session's cluster
    parts = killed / "_parts"
    try:
        n_committed = kill_after_commits(proc, parts, 2, tmp_path / "killed.log", "unit")
    finally:
        log.close()
    assert 2 <= n_committed < 6, n_committed
    assert not (killed / "manifest.json").exists()  # readers see no sample set yet

    res2 = _run({**kcfg, "compute": {**kcfg["compute"], "workers": 2, "throttle_s": 0.0}}, tmp_path)
    assert res2["units_skipped"] >= n_committed and res2["units_run"] == 6 - res2["units_skipped"]
    assert res2["num_samples"] == N and res2["fid"] is None and "no reference" in res2["fid_unavailable"]
    assert res2["is"] == pytest.approx(res["is"], rel=1e-12)
    # identical statistics and images, unit by unit and merged, whatever the kill, the worker count and
    # the units in flight per worker
    full_files, killed_files = _unit_files(out), _unit_files(killed)
    assert killed_files == full_files and len(full_files) == 6 * 4 + 8  # tar, npz, stats, features + 8 grid PNGs
    assert (killed / "fid_stats.npz").read_bytes() == (out / "fid_stats.npz").read_bytes()
    assert not list(killed.rglob(".*.tmp-*"))  # no temporary object left behind
    manifest = json.loads((killed / "manifest.json").read_text())
    assert [u["unit"] for u in manifest["units"]] == list(range(6))
    assert sum(u["count"] for u in manifest["units"]) == N

    # 3) a rerun of a finished job runs nothing and merges the same numbers
    res3 = _run({**kcfg}, tmp_path)
    assert res3["units_run"] == 0 and res3["is"] == res2["is"]
    # another plan into the same folder is refused, naming what differs
    with pytest.raises(ConfigError, match="seed"):
        _run({**kcfg, "plan": {**kcfg["plan"], "seed": 8}}, tmp_path)


def test_text_model_captions_on_s3_without_inception(ray_cluster, assets, tmp_path, s3_bucket):
    """A caption-conditioned model read from the S3 test server (architecture from config.json beside the
    checkpoint, as our training exports it), samples written there; without Inception weights the samples
    are still written and FID / IS are reported unavailable. Then the fid-stats job over those tars."""
    from pipeline.text import RandomTextEncoder

    fs = s3_bucket.fs
    mcfg = tiny_config(codebook_size=32, text_dim=16, text_len=8)
    model = random_model(mcfg, seed=4)
    model.set_null_text(torch.from_numpy(RandomTextEncoder(16, 8, seed=5).encode([""])[0]).float())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    ckpt = f"{s3_bucket.bucket}/ckpt/step_000000007"
    fs.pipe_file(f"{ckpt}/ema.pt", buf.getvalue())
    fs.pipe_file(f"{ckpt}/config.json", json.dumps({"model": mcfg.to_dict(), "step": 7}).encode())
    fs.pipe_file(f"{s3_bucket.bucket}/prompts.txt", b"a red square\n\na blue circle\na green triangle on grass\n")
    out = s3_bucket.url("samples", "text")
    cfg = _job_config(assets, tmp_path, plan__num_samples=6, plan__captions=s3_bucket.url("prompts.txt"),
                      plan__unit_size=4, text__kind="random", text__dim=16, text__length=8, text__seed=5,
                      inception__weights=None, output__uri=out, output__features=False, output__grid=4,
                      compute__workers=1, storage__endpoint_url=s3_bucket.endpoint)
    cfg["model"] = {"checkpoint": f"s3://{ckpt}/ema.pt"}  # preset null: config.json
    res = _run(cfg, tmp_path)
    assert res["num_samples"] == 6 and res["fid"] is None and res["is"] is None
    assert "no Inception weights" in res["fid_unavailable"]
    root = f"{s3_bucket.bucket}/samples/text"
    fs.invalidate_cache()
    assert not fs.exists(f"{root}/stats") and not fs.exists(f"{root}/fid_stats.npz")
    txt = {}
    for u in range(2):
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(f"{root}/images/{u:06d}.tar"))) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".txt"):
                    txt[int(m.name.split(".")[0])] = tf.extractfile(m).read().decode()
    prompts = {"a red square", "a blue circle", "a green triangle on grass"}
    assert sorted(txt) == list(range(6)) and set(txt.values()) <= prompts
    assert {txt[i] for i in range(3)} == prompts  # the first pass over the shuffled prompts holds each once
    assert fs.exists(f"{root}/grid.png") and json.loads(fs.cat_file(f"{root}/results.json"))["fid"] is None
    assert json.loads(fs.cat_file(f"{root}/manifest.json"))["num_samples"] == 6

    # the fid-stats job reads webdataset shards too (here: these samples' tars on S3)
    from jobs.fid_stats import main as fid_stats_main

    stats = fid_stats_main([f"source.root={out}/images", "source.kind=webdataset", "source.resolution=32",
                            "source.batch_size=4", f"inception.weights={assets / 'inception.pt'}",
                            f"output.uri={tmp_path / 'stats'}", f"storage.endpoint_url={s3_bucket.endpoint}",
                            "compute.progress=false"])
    assert stats["n"] == 6 and stats["units"] == 2 and stats["rejected"] == 0
    mu, sigma = enat.load_reference_stats(str(tmp_path / "stats" / "fid_stats.npz"))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.allclose(sigma, sigma.T)


def test_tracking_logs_into_a_foreign_run_without_ending_it(mlflow_server):
    """`owns=False` (mlflow.run_id: e.g. the training run) logs params, metrics and a grid but leaves the
    run's status alone; resuming an own run by id appends to it and ends it."""
    import mlflow

    from pipeline import tracking

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.create_experiment("enat-tracking-test")
    train = client.create_run(exp, run_name="train").info.run_id
    run = tracking.start_run(mlflow_server, run_id=train, owns=False, tags={"sample.job": "sample"})
    run.log_params({"plan": {"num_samples": 8}}, prefix="sample.")
    run.log_metrics({"fid": 12.5, "is": None, "bad": float("nan")}, step=300)
    run.log_grid(torch.rand(4, 3, 8, 8), key="samples", step=300)
    run.end("FINISHED")
    r = client.get_run(train)
    assert r.info.status == "RUNNING"  # not ended: it is the training job's run
    assert r.data.params == {"sample.plan.num_samples": "8"} and r.data.tags["sample.job"] == "sample"
    assert r.data.metrics == {"fid": 12.5}
    assert [m.step for m in client.get_metric_history(train, "fid")] == [300]
    assert "samples/grid.png" in {a.path for a in client.list_artifacts(train, "samples")}
    with pytest.raises(ValueError, match="mlflow.run_id: run 'f*' not found"):
        tracking.start_run(mlflow_server, run_id="f" * 32)

    own = tracking.start_run(mlflow_server, "enat-tracking-test", run_name="sample-x")
    own.log_params({"a": 1})
    own.end()
    again = tracking.start_run(mlflow_server, run_id=own.run_id)  # a rerun of the same job
    assert again.resumed and again.log_params({"a": 2, "b": 3}) == {"b": "3"}  # params are never changed
    again.log_metrics({"fid": 3.0}, step=1)
    again.end()
    r = client.get_run(own.run_id)
    assert r.info.status == "FINISHED" and r.data.params == {"a": "1", "b": "3"}
    assert r.data.tags["param_conflict.a"] == "2" and r.data.metrics["fid"] == 3.0


def test_documented_example_config_loads():
    """The example in jobs/sample.py's docstring is a valid SampleJobConfig (and the presets too)."""
    import textwrap

    import jobs.sample

    block = jobs.sample.__doc__.split("every field is in pipeline.sample.config)::", 1)[1]
    cfg = load_config(SampleJobConfig, yaml.safe_load(textwrap.dedent(block)))
    assert cfg.plan.num_samples == 50_000 and cfg.compute.workers == 8 and cfg.sampler.resolve().cfg_scale == 2.5
    for name in SampleJobConfig.PRESETS:
        cfg = jobs.sample.parse_args(["--preset", name, "model.checkpoint=x.pt", "output.uri=out"])
        assert cfg.model.preset and cfg.plan.num_samples in (50_000, 30_000)


def test_presets_parse():
    """`--preset` starts from the paper's protocols; the command line still overrides them."""
    import jobs.sample

    cfg = jobs.sample.parse_args(["--preset", "imagenet-256", "model.checkpoint=x.pt", "output.uri=out",
                                  "compute.workers=8", "sampler.precision=bf16"])
    assert (cfg.model.preset, cfg.sampler.preset, cfg.plan.batch_size) == ("enat-l", "imagenet-256", 125)
    assert cfg.compute.workers == 8 and cfg.sampler.resolve().dtype == "bfloat16"
    cfg = jobs.sample.parse_args(["--preset", "coco-256", "model.checkpoint=x.pt", "output.uri=out"])
    assert (cfg.model.preset, cfg.text.kind, cfg.plan.num_samples) == ("enat-b-coco", "clip", 30_000)


def test_old_keys_are_rejected_naming_the_new_ones(tmp_path, assets):
    """Renamed keys (issue 12) are refused on the command line and in YAML, naming the new key; the torch
    spellings of a precision are refused with the new one; fid-stats' `output` is a section now."""
    import jobs.fid_stats
    import jobs.sample

    base = ["model.checkpoint=x.pt", "output.uri=out"]
    with pytest.raises(ConfigError, match="compute.actors: renamed to compute.workers"):
        jobs.sample.parse_args([*base, "compute.actors=2"])
    path = tmp_path / "old.yaml"
    old = _job_config(assets, tmp_path)
    old["compute"] = {"actors": 2}
    path.write_text(yaml.safe_dump(old))
    with pytest.raises(ConfigError, match="compute.actors: renamed to compute.workers"):
        jobs.sample.parse_args(["--config", str(path)])
    for old_key, new_key, value in [("compute.actor_num_gpus", "compute.gpus_per_worker", "1"),
                                    ("compute.decode_dtype", "tokenizer.precision", "float16"),
                                    ("sampler.dtype", "sampler.precision", "bfloat16"),
                                    ("inception.dtype", "inception.precision", "float32")]:
        with pytest.raises(ConfigError, match=f"{old_key}: renamed to {new_key}"):
            jobs.sample.parse_args([*base, f"{old_key}={value}"])
    with pytest.raises(ConfigError, match="sampler.precision: 'bfloat16' is spelled 'bf16'"):
        jobs.sample.parse_args([*base, "sampler.precision=bfloat16"])
    stats = ["source.root=imgs", "inception.weights=i.pt"]
    with pytest.raises(ConfigError, match="output: now a section; write output.uri="):
        jobs.fid_stats.parse_args([*stats, "output=s3://b/stats"])
    with pytest.raises(ConfigError, match="overwrite: renamed to output.overwrite"):
        load_config(FidStatsJobConfig, {"overwrite": True, "output": {"uri": "o"}, "source": {"root": "r"}})
    with pytest.raises(ConfigError, match="compute.actors: renamed to compute.workers"):
        jobs.fid_stats.parse_args([*stats, "output.uri=o", "compute.actors=2"])


def test_unit_runner_draws_on_its_compute_device(tmp_path):
    """The unit's generator is built on the runner's compute device (the model's), seeded by the plan;
    the sampler refuses a generator on another device (tests/test_sampler.py), so a CUDA runner cannot
    pair a CPU generator with CUDA tensors."""
    model = random_model(tiny_config(codebook_size=32, num_classes=CLASSES))
    runner = sample.UnitRunner(model, None, None, enat.SamplerConfig(), str(tmp_path))
    unit = sample.make_units(8, 4, 7, sample.balanced_labels(8, CLASSES))[1]
    gen = runner.generator(unit)
    assert gen.device == runner.device == model.mlm_layer.bias.device
    assert gen.initial_seed() == unit.seed == unit_seed(7, 1)


def test_float16_decode_on_a_cpu_without_fp16_kernels_runs_float32(tmp_path):
    """The GPU configs decode under fp16 (as the official eval); a CPU actor without oneDNN fp16 kernels
    runs that ~20x slower, so it decodes in float32 instead (and says so); bf16 and GPUs keep theirs."""
    model = random_model(tiny_config(codebook_size=32, num_classes=CLASSES))
    cpu, fp16_ok = torch.device("cpu"), torch.ops.mkldnn._is_mkldnn_fp16_supported()
    runner = sample.UnitRunner(model, None, None, enat.SamplerConfig(), str(tmp_path), decode_precision="fp16")
    assert runner.decode_dtype == (torch.float16 if fp16_ok else None)
    assert device_dtype("bf16", cpu, "x") == torch.bfloat16
    assert device_dtype("fp16", torch.device("cuda"), "x") == torch.float16


def test_fid_stats_from_an_adm_reference_batch_on_s3(ray_cluster, assets, tmp_path, s3_bucket):
    """ADM's reference batches (arr_0 uint8 NHWC, plus TF-Inception mu / sigma) as a fid-stats source:
    pytorch-fid statistics of the very images, read by ranged reads from the S3 test server, equal to a
    single pass of the FID Inception over them; a statistics-only npz or wrong shapes are refused, naming
    the file."""
    from jobs.fid_stats import main as fid_stats_main

    images = np.random.default_rng(5).integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()  # np.savez, as ADM's reference batches: the TF statistics ride along, unused
    np.savez(buf, arr_0=images, arr_1=np.arange(7), mu=np.zeros(4), sigma=np.eye(4))
    s3_bucket.fs.pipe_file(f"{s3_bucket.bucket}/adm/VIRTUAL_tiny_labeled.npz", buf.getvalue())
    stats_only = io.BytesIO()
    np.savez(stats_only, mu=np.zeros(4), sigma=np.eye(4))
    s3_bucket.fs.pipe_file(f"{s3_bucket.bucket}/adm/stats_only.npz", stats_only.getvalue())
    args = ["source.kind=adm_npz", "source.resolution=32", "source.unit_size=4", "source.batch_size=3",
            f"inception.weights={assets / 'inception.pt'}", f"storage.endpoint_url={s3_bucket.endpoint}",
            "compute.progress=false"]
    res = fid_stats_main([f"source.root={s3_bucket.url('adm', 'VIRTUAL_tiny_labeled.npz')}",
                          f"output.uri={tmp_path / 'ref'}", *args])
    assert res["n"] == 7 and res["units"] == 2 and res["rejected"] == 0
    mu, sigma = enat.load_reference_stats(str(tmp_path / "ref" / "fid_stats.npz"))
    net = FIDInception.from_pytorch_fid(str(assets / "inception.pt"))
    with torch.no_grad():
        pool3 = net(torch.from_numpy(images).permute(0, 3, 1, 2))[0].double().numpy()
    # float32 convolutions in batches of 3 vs 7: equal to ~1e-5 of the scale (a misread row would not be)
    np.testing.assert_allclose(mu, pool3.mean(0), rtol=1e-4, atol=1e-4 * np.abs(mu).max())
    np.testing.assert_allclose(sigma, np.cov(pool3, rowvar=False), rtol=1e-4, atol=1e-4 * np.abs(sigma).max())

    with pytest.raises(ValueError, match=r"stats_only.npz: no images \(arr_0\).*statistics only"):
        fid_stats_main([f"source.root={s3_bucket.url('adm', 'stats_only.npz')}", f"output.uri={tmp_path / 'x'}", *args])
    with pytest.raises(ValueError, match=r"tiny_labeled.npz: arr_0 holds 32x32 images, source.resolution is 64"):
        fid_stats_main([f"source.root={s3_bucket.url('adm', 'VIRTUAL_tiny_labeled.npz')}",
                        f"output.uri={tmp_path / 'y'}", *args, "source.resolution=64"])
