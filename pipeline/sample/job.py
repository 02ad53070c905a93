"""The sample job: large-scale sampling and distributed FID / IS on Ray Data (``python -m jobs.sample``)::

    driver   plan: sample i → (label or caption, unit i // unit_size); unit u → seed f(seed, u)
             skip units whose commit record exists with the same fingerprint
    actors   (one per GPU; CPU actors here) load ENAT + tokenizer decoder + FID Inception once, then per
             unit: generate → decode → Inception pool3 / logits on the same device → PNGs in a
             webdataset tar and/or an ADM-style npz (arr_0 uint8 NHWC, arr_1 labels) + the unit's
             statistics (FeatureStats n / Σx / Σxxᵀ in float64, ISStats per split) → commit record
    driver   exact merge of the unit statistics in unit order → mu / sigma → FID vs the reference
             `.npz` (mu, sigma), Inception Score → results.json, fid_stats.npz, manifest.json, MLflow

A unit's label/caption list, its RNG seed and its batch split are pure functions of the plan, so sample i
gets the same label, seed and image whatever the number of workers, and a killed job rerun produces the
same bytes (ecosystem.md §2.2). Every object is written with one atomic put; a unit counts as done only
once its record ``_parts/{unit:06d}.json`` (written last) exists; the merge reads exactly one statistics
file per unit of the plan, so nothing is counted twice. Output layout at ``output.uri``::

    plan.json                 fingerprint, resolved config, MLflow run id (written first)
    images/000000.tar …       webdataset: {index:07d}.png + .cls (label) or .txt (caption)
    npz/000000.npz …          arr_0 uint8 (n, H, W, 3), arr_1 int64 labels (ADM's sample format)
    stats/000000.npz …        n, sum, outer (FeatureStats) + is_* (ISStats) of the unit
    features/000000.npy …     float32 (n, 2048) pool3 (output.features=true)
    grid/{index:07d}.png      the few samples of the MLflow grid
    _parts/000000.json …      commit records (files, sha256, label counts, timings, identities)
    fid_stats.npz             mu, sigma of all samples (pytorch-fid's format)
    samples_NxHxWx3.npz       all samples in one ADM npz (output.adm_npz=true)
    grid.png, results.json
    manifest.json             written last: units, files, results — readers trust it
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import time
from typing import Any, Callable, Optional

import numpy as np

import enat
from pipeline import storage, tracking
from pipeline.cluster import run_pool
from pipeline.commits import CommitLog, sha256
from pipeline.config import ConfigError, config_to_dict
from pipeline.sample.config import FORMAT_VERSION, SampleJobConfig
from pipeline.sample.fid_stats import FidStatsJobConfig, run_fid_stats
from pipeline.sample.formats import merge_stats, npz_bytes, png_bytes, read_grid, read_unit_stats, write_adm_npz
from pipeline.sample.plan import SamplePlan, build_plan
from pipeline.sample.runner import SampleActor
from pipeline.sections import OutputSection


def run_sample(cfg: SampleJobConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the sample job on the current Ray cluster (init it first); returns the results summary.

    Raises ``ConfigError`` for bad settings or an output folder holding another plan, before any sample
    is drawn; ``RuntimeError`` if units are still missing after the run.
    """
    t_job = time.perf_counter()
    cfg, model = _resolve_registered_model(cfg)
    plan = build_plan(cfg)
    fs, out = storage.filesystem(cfg.output.uri, cfg.storage)
    out = out.rstrip("/")
    ref, ref_id = _read_reference(cfg)
    old_plan = _check_plan_file(fs, out, plan, cfg.output.overwrite, cfg.output.uri)
    if old_plan is not None and old_plan.get("fingerprint") != plan.fingerprint:  # output.overwrite
        for name in ("manifest.json", "results.json"):  # the old sample set is no longer complete
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(f"{out}/{name}")

    run = _start_tracking(cfg, plan, old_plan) if cfg.mlflow.enabled else None
    prefix = "sample." if cfg.mlflow.run_id else ""  # params / tags in another job's run are namespaced
    status = "FAILED"
    try:
        if run is not None:
            run.log_params({**config_to_dict(cfg), "resolved_sampler": plan.sampler.to_dict(),
                            "model_config": plan.model_config.to_dict(),
                            "is_protocol": enat.is_protocol(cfg.fid.is_splits, cfg.fid.is_shuffle_seed)},
                           prefix=prefix)
        storage.put_atomic(fs, f"{out}/plan.json", json.dumps(
            {"format": "enat-samples", "fingerprint": plan.fingerprint, "identity": plan.identity,
             "config": json.loads(storage.redact(json.dumps(config_to_dict(cfg)))),
             "mlflow_run_id": None if run is None or cfg.mlflow.run_id else run.run_id}, indent=2).encode())
        if ref is None and cfg.fid.reference_images is not None and cfg.inception.weights:
            ref, ref_id = _compute_reference(cfg, log)

        # what is left to do, then do it
        commits = CommitLog(fs, out)
        todo, skipped = commits.todo({u.unit: {"fingerprint": u.fingerprint(plan.fingerprint)} for u in plan.units},
                                     cfg.output.overwrite, f"output.uri {storage.redact(cfg.output.uri)}")
        todo_units = [plan.units[u] for u in todo]
        log(f"[sample] {plan.num_samples} samples in {len(plan.units)} units of {cfg.plan.unit_size} "
            f"({skipped} already committed); model {plan.model_config.encoder_depth}+"
            f"{plan.model_config.decoder_depth} blocks, dim {plan.model_config.dim}; sampler {plan.sampler}")
        n_todo = sum(u.count for u in todo_units)
        timing = run_pool([u.row(plan.fingerprint) for u in todo_units], SampleActor, (cfg,), cfg.compute,
                          what="sample", total=n_todo, in_flight=cfg.compute.units_in_flight,
                          postfix=lambda r: {"unit": r["unit"]}, log=log) if todo_units else {}

        summary, recs, grid = finalize(cfg, plan, fs, out, ref, ref_id, log)
        summary.update(units=len(plan.units), units_skipped=skipped, units_run=len(todo), **timing)
        summary["job_s"] = round(time.perf_counter() - t_job, 3)
        if timing.get("run_s"):
            summary["samples_per_s"] = round(n_todo / timing["run_s"], 3)
        storage.put_atomic(fs, f"{out}/results.json", json.dumps(summary, indent=2).encode())
        if model is not None:
            summary["model"] = model
        if run is not None:
            _log_results(run, cfg, plan, summary, grid, prefix)
            if model is not None:  # FID against training step: on the training run and the model version
                tracking.log_evaluation(cfg.mlflow.tracking_uri, model,
                                        {"fid": summary.get("fid"), "is": summary.get("is")})
        # the manifest is written last: readers trust it, not listings
        storage.put_atomic(fs, f"{out}/manifest.json", json.dumps(
            {"format": "enat-samples", "format_version": FORMAT_VERSION, "fingerprint": plan.fingerprint,
             "num_samples": plan.num_samples, "results": summary,
             "units": [{"unit": r["unit"], "start": r["start"], "count": r["count"], "files": r["files"]}
                       for r in recs]}, indent=1).encode())
        status = "FINISHED"
        log(f"[sample] done: {json.dumps({k: v for k, v in summary.items() if not isinstance(v, dict)})}")
        return summary
    finally:
        if run is not None:
            run.end(status)


def _resolve_registered_model(cfg: SampleJobConfig) -> tuple[SampleJobConfig, Optional[dict]]:
    """``model.checkpoint=models:/<name>/<version>`` or ``models:/<name>@<alias>``: the registered version's
    weights URL, and by default its training run as the parent run and its step as the metric step."""
    if not tracking.is_model_uri(cfg.model.checkpoint):
        return cfg, None
    try:
        model = tracking.resolve_model(cfg.mlflow.tracking_uri, cfg.model.checkpoint)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    m = cfg.mlflow
    mlflow = dataclasses.replace(m, step=model["step"] if m.step is None else m.step,
                                 parent_run_id=m.parent_run_id or (None if m.run_id else model["run_id"]))
    model = {**model, "uri": cfg.model.checkpoint}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, checkpoint=model["checkpoint"]),
                               mlflow=mlflow), model


def _read_reference(cfg: SampleJobConfig) -> tuple[Optional[tuple], Optional[dict]]:
    """(mu, sigma) of ``fid.reference`` and its identity, or (None, None)."""
    if not cfg.fid.reference:
        return None, None
    data = storage.read_url(cfg.fid.reference, cfg.storage, "fid.reference")
    return enat.load_reference_stats(data), {"uri": storage.redact(cfg.fid.reference), "sha256": sha256(data)}


def _compute_reference(cfg: SampleJobConfig, log: Callable[[str], None]) -> tuple[tuple, dict]:
    """The reference statistics of ``fid.reference_images``, by the fid-stats job into {output.uri}/reference."""
    ref_cfg = FidStatsJobConfig(source=cfg.fid.reference_images, inception=cfg.inception,
                                output=OutputSection(storage.join(cfg.output.uri, "reference")),
                                compute=cfg.compute, storage=cfg.storage)
    ref_summary = run_fid_stats(ref_cfg, log)
    ref = enat.load_reference_stats(storage.read_url(ref_summary["stats"], cfg.storage))
    return ref, {"uri": ref_summary["stats"], "sha256": ref_summary["sha256"], "computed": True}


def _check_plan_file(fs: Any, out: str, plan: SamplePlan, overwrite: bool, uri: str) -> Optional[dict]:
    """The plan.json already in the output (None if none); ``ConfigError`` naming what differs when it is
    another plan's and ``overwrite`` is off."""
    path = f"{out}/plan.json"
    if not storage.exists(fs, path):
        return None
    old = json.loads(fs.cat_file(path))
    if old.get("fingerprint") != plan.fingerprint and not overwrite:
        changed = sorted(k for k in set(old.get("identity", {})) | set(plan.identity)
                         if old.get("identity", {}).get(k) != plan.identity.get(k))
        raise ConfigError(f"output.uri: {storage.redact(uri)} holds samples of another plan (differs in: "
                          f"{', '.join(changed) or 'format'}); choose a new output.uri or set output.overwrite=true")
    return old


def _start_tracking(cfg: SampleJobConfig, plan: SamplePlan, old_plan: Optional[dict]) -> Any:
    m = cfg.mlflow
    tags = {"job": "sample", "output_uri": cfg.output.uri, "checkpoint": cfg.model.checkpoint,
            "plan_fingerprint": plan.fingerprint}
    if m.run_id:  # another job's run (e.g. the training run): namespaced tags, its status left alone
        return tracking.start_run(m.tracking_uri, run_id=m.run_id, tags={f"sample.{k}": v for k, v in tags.items()},
                                  owns=False)
    prev = (old_plan or {}).get("mlflow_run_id")
    if prev and old_plan.get("fingerprint") == plan.fingerprint and tracking.run_exists(m.tracking_uri, prev):
        return tracking.start_run(m.tracking_uri, run_id=prev, system_metrics=m.system_metrics)
    name = m.run_name or "sample-" + cfg.output.uri.rstrip("/").rsplit("/", 1)[-1]
    return tracking.start_run(m.tracking_uri, m.experiment, run_name=name, parent_run_id=m.parent_run_id,
                              tags=tags, system_metrics=m.system_metrics)


def finalize(cfg: SampleJobConfig, plan: SamplePlan, fs: Any, out: str, ref: Optional[tuple],
             ref_id: Optional[dict], log: Callable[[str], None] = print
             ) -> tuple[dict[str, Any], list[dict], Optional[np.ndarray]]:
    """Check every unit is committed, merge the statistics exactly, compute FID / IS; write fid_stats.npz,
    the ADM npz and grid.png. Returns (summary, the units' commit records in plan order, grid images)."""
    recs = CommitLog(fs, out).require([u.unit for u in plan.units])
    # exact counts: every sample of the plan once, the plan's labels
    for u, r in zip(plan.units, recs):
        if r["samples"] != u.count or r["start"] != u.start:
            raise RuntimeError(f"unit {u.unit}: record holds {r['samples']} samples from {r['start']}, the plan "
                               f"{u.count} from {u.start}")
    label_counts: collections.Counter = collections.Counter()
    for r in recs:
        label_counts.update({int(k): v for k, v in r["label_counts"].items()})
    for key in ("checkpoint_sha256", "tokenizer_sha256", "inception_sha256"):
        seen = {r["identity"].get(key) for r in recs}
        if len(seen) > 1:
            raise RuntimeError(f"units were made with different weights ({key}: {len(seen)} values); the "
                               f"weights file changed between runs — rerun into a new output.uri")
    n_total = sum(r["samples"] for r in recs)
    summary: dict[str, Any] = {"num_samples": n_total, "label_counts_min": min(label_counts.values(), default=0),
                               "label_counts_max": max(label_counts.values(), default=0),
                               "num_labels": len(label_counts), "devices": sorted({r["device"] for r in recs}),
                               "resolution": recs[0]["resolution"], "fid": None, "is": None, "is_std": None,
                               "is_protocol": enat.is_protocol(cfg.fid.is_splits, cfg.fid.is_shuffle_seed),
                               "fid_method": cfg.fid.method, "reference": ref_id,
                               "inception": storage.redact(cfg.inception.weights) if cfg.inception.weights else None}
    summary["seconds"] = {k: round(sum(r["seconds"][k] for r in recs), 3)
                          for k in ("generate", "decode", "inception", "write")}
    if cfg.inception.weights:
        _score(cfg, fs, out, recs, n_total, ref, summary)
    else:
        summary["fid_unavailable"] = "no Inception weights (inception.weights is null): FID and IS not computed"
    if summary.get("fid_unavailable"):
        log(f"[sample] FID unavailable: {summary['fid_unavailable']}")
    if cfg.output.adm_npz and cfg.output.npz:
        summary["adm_npz"] = storage.redact(storage.to_url(fs, write_adm_npz(fs, out, recs, n_total)))
    grid = read_grid(fs, out, plan.identity["grid"])
    if grid is not None:
        storage.put_atomic(fs, f"{out}/grid.png", png_bytes(tracking.make_grid(grid), 6))
    return summary, recs, grid


def _score(cfg: SampleJobConfig, fs: Any, out: str, recs: list[dict], n_total: int, ref: Optional[tuple],
           summary: dict[str, Any]) -> None:
    """The exact merge of the units' statistics → fid_stats.npz, IS, and FID against ``ref`` (into ``summary``)."""
    t0 = time.perf_counter()
    feats, is_stats = merge_stats(read_unit_stats(fs, out, recs))
    summary["merge_s"] = round(time.perf_counter() - t0, 3)
    if feats.n != n_total:
        raise RuntimeError(f"merged statistics count {feats.n} samples, the units {n_total}")
    mu, sigma = feats.mean_cov()
    storage.put_atomic(fs, f"{out}/fid_stats.npz", npz_bytes(mu=mu, sigma=sigma))
    if is_stats is not None:
        if int(is_stats.n.sum()) != n_total:
            raise RuntimeError(f"IS partials count {int(is_stats.n.sum())} samples, the units {n_total}")
        if is_stats.protocol != summary["is_protocol"]:
            raise RuntimeError(f"the units' IS partials follow {is_stats.protocol}, the config "
                               f"{summary['is_protocol']} (fid.is_protocol / fid.is_splits)")
        summary["is"], summary["is_std"] = is_stats.score()
    if ref is not None:
        t0 = time.perf_counter()
        summary["fid"] = enat.frechet_distance(mu, sigma, ref[0], ref[1], method=cfg.fid.method)
        summary["fid_s"] = round(time.perf_counter() - t0, 3)
    else:
        summary["fid_unavailable"] = "no reference statistics (set fid.reference or fid.reference_images)"


def _log_results(run: Any, cfg: SampleJobConfig, plan: SamplePlan, summary: dict, grid: Optional[np.ndarray],
                 prefix: str) -> None:
    step = cfg.mlflow.step if cfg.mlflow.step is not None else int(plan.extra.get("step") or 0)
    metrics = {"fid": summary.get("fid"), "is": summary.get("is"), "is_std": summary.get("is_std"),
               "n_samples": summary["num_samples"], "samples_per_s": summary.get("samples_per_s"),
               "merge_s": summary.get("merge_s")}
    metrics.update({f"seconds_{k}": v for k, v in summary["seconds"].items()})
    run.log_metrics(metrics, step=step)
    tags = {"fid_available": str(summary.get("fid") is not None).lower(), "fid_method": cfg.fid.method,
            "is_protocol": summary["is_protocol"]["name"]}
    if summary.get("fid_unavailable"):
        tags["fid_unavailable"] = summary["fid_unavailable"]
    if summary.get("reference"):
        tags["fid_reference"] = summary["reference"]["uri"]
        tags["fid_reference_sha256"] = summary["reference"]["sha256"]
        run.log_dataset("fid-reference", summary["reference"]["uri"], summary["reference"]["sha256"], "reference",
                        {"computed": bool(summary["reference"].get("computed"))})
    if summary.get("model"):
        model = summary["model"]
        tags.update(model_name=model["name"], model_version=model["version"], model_uri=model["uri"],
                    model_training_run=model["run_id"], model_step=model["step"])
    run.set_tags({f"{prefix}{k}": v for k, v in tags.items()})
    if grid is not None:
        run.log_grid(grid, key="samples", step=step)
    run.log_dict(summary, "sample/results.json")
