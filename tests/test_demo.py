"""The README's main job, `enat demo`, end to end in its reduced size: every stage's outputs checked."""
from __future__ import annotations

import json

import pytest

from jobs import demo


@pytest.fixture(scope="module")
def report(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("demo")
    return demo.main(["--out", str(out), "--size", "tiny"]), out


def test_every_good_image_tokenized_once_and_broken_ones_rejected(report):
    r, out = report
    digits = r["tokenize"]["digits"]
    assert digits["written"] == r["data"]["good"]                 # every good image once (incl. the converted CMYK)
    assert digits["converted"] == 1
    assert digits["rejected_by_reason"] == {"empty": 1, "not-an-image": 1, "truncated": 1, "tiny": 1}
    caps = r["tokenize"]["captions"]
    assert caps["rejected_by_reason"] == {"missing-image": 1, "no-caption": 1}
    from pipeline.shards import open_split, read_rejects
    from pipeline import storage
    info = open_split(r["store"] + "/tokens/digits", "train")
    assert info.samples == r["data"]["good"]
    fs, p = storage.filesystem(r["store"] + "/tokens/digits/train/rejects.parquet")
    reasons = sorted(x["reason"] for x in read_rejects(fs, p))
    assert reasons == ["empty", "not-an-image", "tiny", "truncated"]


def test_training_learns_and_mlflow_has_the_runs(report):
    import mlflow
    r, out = report
    client = mlflow.MlflowClient(r["tracking_uri"])
    exp = client.get_experiment_by_name("enat-demo")
    runs = {run.info.run_name: run for run in client.search_runs([exp.experiment_id])}
    assert {"demo-tokenize", "demo-class", "demo-text", "demo-sample", "demo-offline-score"} <= set(runs)
    hist = sorted(client.get_metric_history(runs["demo-class"].info.run_id, "loss"), key=lambda m: m.step)
    assert hist[-1].value < hist[0].value - 0.5                    # the loss falls
    assert [a.path for a in client.list_artifacts(runs["demo-class"].info.run_id, "samples")]
    sample = runs["demo-sample"]
    assert sample.data.tags.get("mlflow.parentRunId") == runs["demo-class"].info.run_id
    assert any(a.path.endswith(".png") for a in client.list_artifacts(sample.info.run_id, "samples"))


def test_samples_grid_and_offline_figure_beats_untrained(report):
    r, out = report
    assert (out / "samples.png").stat().st_size > 1000
    assert r["sample"]["num_samples"] == demo.SIZES["tiny"]["samples"]
    assert r["sample"]["fid"] is None                               # no Inception weights here: said so
    off = r["offline"]
    assert off["num_samples"] == demo.SIZES["tiny"]["samples"]
    assert off["class_acc_samples"] > off["class_acc_untrained"] + 0.15
    saved = json.loads((out / "report.json").read_text())
    assert saved["grid"] == str(out / "samples.png")
