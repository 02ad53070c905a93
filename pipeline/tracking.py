"""MLflow for every job: tracking URI resolution, start-or-resume a run, params, metrics, image grids.

Only this module and ``jobs/`` import ``mlflow`` (lazily, inside functions), so the data plane stays
importable without it. One :class:`Run` handle per job, on the driver / rank 0 only::

    run = tracking.start_run(cfg.mlflow.tracking_uri, "enat", run_name="fid-50k",
                             parent_run_id=train_run_id)          # a child run of the training run
    run.log_params(config_to_dict(cfg))                          # flattened: "sampler.cfg_scale"
    run.log_metrics({"fid": 2.79, "is": 280.1}, step=500_000)
    run.log_grid(images, nrow=8, key="samples", step=500_000)  # images (N, 3, H, W) in [0, 1]
    run.end()

Conventions (ecosystem.md §4): tracking URI = config value, else ``$MLFLOW_TRACKING_URI``, else a local
sqlite store ``./mlruns.db`` with artifacts in ``./mlartifacts``; resume = ``start_run(run_id=...)``;
evaluations are child runs of the training run (tag ``mlflow.parentRunId``); credentials never go into
params or tags (values are passed through :func:`pipeline.storage.redact`).
"""
from __future__ import annotations

import math
import os
import re
import time
from typing import Any, Mapping, Optional

import numpy as np

from pipeline.storage import redact

PARAM_VALUE_MAX = 6000  # MLflow's limit on a param value (characters)


def tracking_uri(uri: Optional[str] = None) -> str:
    """Config value, else ``$MLFLOW_TRACKING_URI``, else a local sqlite store ``./mlruns.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{os.path.abspath('mlruns.db')}"


def check_reachable(uri: Optional[str] = None, timeout: float = 5.0) -> None:
    """Raise ``ConfigError`` naming ``mlflow.tracking_uri`` when an http(s) tracking server does not answer
    its health check (MLflow's own client would retry for minutes first)."""
    import urllib.error
    import urllib.request

    from pipeline.config import ConfigError

    uri = tracking_uri(uri)
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answers (a proxy may not expose /health)
    except OSError as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"mlflow.tracking_uri: cannot reach the MLflow server at {redact(uri)} ({reason}); start "
                          f"it, fix the URI (or MLFLOW_TRACKING_URI), or set mlflow.enabled=false") from None


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings → ``{"a.b.c": value}``; lists/tuples stay values (logged as their text)."""
    if isinstance(d, Mapping):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d} if prefix else {"value": d}


def make_grid(images: Any, nrow: Optional[int] = None, pad: int = 2, min_size: int = 256) -> np.ndarray:
    """Images → one uint8 grid ``(H', W', 3)`` on a white background.

    ``images``: float ``(N, 3, H, W)`` in [0, 1] (torch or numpy) or uint8 ``(N, H, W, 3)``. ``nrow``
    images per row (default ⌈√N⌉). Small grids are upscaled by an integer factor (nearest) until the
    longer side reaches ``min_size``, so 32 px samples stay visible in the MLflow UI.
    """
    arr = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if arr.ndim != 4:
        raise ValueError(f"make_grid: expected 4-D images, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if arr.shape[1] != 3:
            raise ValueError(f"make_grid: float images must be (N, 3, H, W), got {arr.shape}")
        # as torchvision save_image: x * 255 + 0.5, clamped, truncated
        arr = np.clip(arr.transpose(0, 2, 3, 1) * 255 + 0.5, 0, 255).astype(np.uint8)  # (N, H, W, 3)
    n, h, w, _ = arr.shape
    if n == 0:
        raise ValueError("make_grid: no images")
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y:y + h, x:x + w] = arr[i]
    scale = max(1, math.ceil(min_size / max(grid.shape[:2])))
    if scale > 1:
        grid = np.repeat(np.repeat(grid, scale, 0), scale, 1)
    return grid


class Run:
    """A job's MLflow run. Everything is logged through the client with this run's id, so a job may log
    into a run it does not own (``owns=False``, e.g. a training run another process is still writing
    to) without touching that run's status. Use :func:`start_run` to get one."""

    def __init__(self, client: Any, run_id: str, experiment_id: str, *, resumed: bool, owns: bool) -> None:
        self.client = client
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.resumed = resumed
        self.owns = owns
        self._ended = False

    # -- logging ---------------------------------------------------------------------------------------

    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
        """Log a (nested) config as flattened params; returns what was logged.

        MLflow refuses to change a param of a run, so keys the run already holds are skipped (a resumed
        run keeps the values it started with; a conflicting value is recorded as tag
        ``param_conflict.<key>``). Values are redacted and cut to MLflow's 6000 characters.
        """
        from mlflow.entities import Param

        flat = {f"{prefix}{k}": redact(str(v))[:PARAM_VALUE_MAX] for k, v in flatten(dict(params)).items()}
        have = self.client.get_run(self.run_id).data.params
        new = {k: v for k, v in flat.items() if k not in have}
        conflicts = {f"param_conflict.{k}": v for k, v in flat.items() if k in have and have[k] != v}
        items = [Param(k, v) for k, v in new.items()]
        for i in range(0, len(items), 100):  # a log_batch holds at most 100 params
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        if conflicts:
            self.set_tags(conflicts)
        return new

    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        """Finite numeric metrics at ``step``; None and non-finite values are skipped (MLflow would store
        a NaN, which plots as a gap)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, int(step or 0)) for k, v in metrics.items()
                 if v is not None and math.isfinite(float(v))]
        if items:
            self.client.log_batch(self.run_id, metrics=items)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, redact(str(v))[:PARAM_VALUE_MAX]) for k, v in tags.items()]
        if items:
            self.client.log_batch(self.run_id, tags=items)

    def log_image(self, image: np.ndarray, artifact_file: Optional[str] = None, key: Optional[str] = None,
                  step: Optional[int] = None) -> None:
        """uint8 ``(H, W, 3)``: as a fixed artifact file and/or step-indexed under ``key``."""
        if artifact_file:
            self.client.log_image(self.run_id, image, artifact_file=artifact_file)
        if key:
            self.client.log_image(self.run_id, image, key=key, step=int(step or 0), synchronous=True)

    def log_grid(self, images: Any, nrow: Optional[int] = None, key: str = "samples",
                 step: Optional[int] = None) -> np.ndarray:
        """:func:`make_grid` of ``images``, logged step-indexed under ``key`` and as ``{key}/grid.png``."""
        grid = make_grid(images, nrow)
        self.log_image(grid, artifact_file=f"{key}/grid.png", key=key, step=step)
        return grid

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """A JSON/YAML-serializable object as an artifact (``.json`` or ``.yaml``)."""
        self.client.log_dict(self.run_id, obj, artifact_file)

    def log_dataset(self, name: str, uri: str, digest: str, context: str, profile: Mapping[str, Any]) -> None:
        """Record a dataset as an input of this run (MLflow lineage: the run's "Datasets" column):
        ``uri`` where it lives, ``digest`` its fingerprint, ``context`` ("train", "source", "output",
        "reference", …) and a small ``profile`` (counts, split, tokenizer). Nothing is uploaded."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        ds = Dataset(name=name, digest=digest[:36], source_type=uri.split("://", 1)[0] if "://" in uri else "local",
                     source=json.dumps({"uri": redact(uri)}), profile=redact(json.dumps(dict(profile), default=str)))
        self.client.log_inputs(self.run_id, [DatasetInput(ds, [InputTag("mlflow.data.context", context)])])

    def register_checkpoint(self, model_name: str, checkpoint: str, step: int, metadata: Mapping[str, Any],
                            aliases: tuple[str, ...] = ()) -> str:
        """Register the weights at ``checkpoint`` (a URL, left where it is: nothing is copied) as a new
        version of registered model ``model_name``; returns the version.

        The version's source is a small pointer artifact of this run (``model/checkpoint.json``: the URL,
        the step and ``metadata``), so any tracking server accepts it; the URL and step are also version
        tags, which :func:`resolve_model` reads. ``aliases`` (e.g. ``candidate``) are moved to it.
        """
        from mlflow.exceptions import MlflowException

        pointer = {"checkpoint": redact(checkpoint), "step": int(step), **metadata}
        self.client.log_dict(self.run_id, pointer, "model/checkpoint.json")
        try:
            self.client.create_registered_model(model_name, description="ENAT EMA weights (enat-pipeline)")
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {"checkpoint": redact(checkpoint), "step": str(int(step))}
        tags.update({k: redact(str(v))[:PARAM_VALUE_MAX] for k, v in flatten(dict(metadata)).items()})
        mv = self.client.create_model_version(model_name, source=f"runs:/{self.run_id}/model", run_id=self.run_id,
                                              tags=tags)
        for alias in aliases:
            self.client.set_registered_model_alias(model_name, alias, mv.version)
        return str(mv.version)

    def end(self, status: str = "FINISHED") -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``) if this job owns it; a run it only logs
        into keeps its status. A second call does nothing."""
        if self._ended:
            return
        self._ended = True
        if not self.owns:
            return
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status=status)  # also stops the system-metrics monitor
        else:
            self.client.set_terminated(self.run_id, status)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))


def start_run(uri: Optional[str] = None, experiment: Optional[str] = "enat", run_name: Optional[str] = None,
              run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
              tags: Optional[Mapping[str, Any]] = None, system_metrics: bool = False, owns: bool = True) -> Run:
    """Start (or resume) the job's MLflow run.

    - ``run_id``: that run. ``owns=True`` resumes it as this job's run (a rerun of the same job:
      status RUNNING again, ended by :meth:`Run.end`); ``owns=False`` only logs into it (another job's
      run, e.g. the training run: its status is left alone). Raises ``ValueError`` naming the run and
      the tracking URI if it does not exist there.
    - else ``parent_run_id``: a new child run of it (an evaluation of a training run), in the parent's
      experiment unless ``experiment`` is given.
    - else a new run named ``run_name`` in ``experiment`` (created if missing; a sqlite store keeps its
      artifacts in ``mlartifacts/`` beside the database).
    Runs this job owns are the process's active fluent run (system metrics need that); an already
    active run is ended first.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    safe_uri = redact(uri)
    clean_tags = {k: redact(str(v)) for k, v in (tags or {}).items()}
    if run_id:
        try:
            existing = client.get_run(run_id)
        except MlflowException as e:
            raise ValueError(f"mlflow.run_id: run {run_id!r} not found at {safe_uri} ({e.error_code})") from None
        if not owns:
            run = Run(client, run_id, existing.info.experiment_id, resumed=True, owns=False)
            run.set_tags(clean_tags)
            return run
    while mlflow.active_run() is not None:
        mlflow.end_run()
    if run_id:
        # the process-wide active experiment (set_experiment elsewhere) must match the run's
        mlflow.set_experiment(experiment_id=existing.info.experiment_id)
        active = mlflow.start_run(run_id=run_id, experiment_id=existing.info.experiment_id,
                                  log_system_metrics=system_metrics)
        if clean_tags:
            mlflow.set_tags(clean_tags)
        return Run(client, active.info.run_id, active.info.experiment_id, resumed=True, owns=True)
    exp_id = None
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except MlflowException as e:
            raise ValueError(f"mlflow.parent_run_id: run {parent_run_id!r} not found at {safe_uri} "
                             f"({e.error_code})") from None
        if not experiment:
            exp_id = parent.info.experiment_id
    if exp_id is None:
        exp_id = _experiment_id(mlflow, experiment or "enat", uri)
    # the process-wide active experiment (set_experiment elsewhere) must match the run's
    mlflow.set_experiment(experiment_id=exp_id)
    active = mlflow.start_run(experiment_id=exp_id, run_name=run_name, parent_run_id=parent_run_id,
                              log_system_metrics=system_metrics, tags=clean_tags)
    return Run(client, active.info.run_id, active.info.experiment_id, resumed=False, owns=True)


def _experiment_id(mlflow: Any, name: str, uri: str) -> str:
    exp = mlflow.get_experiment_by_name(name)
    if exp is None:
        loc = None
        if uri.startswith("sqlite:///"):
            loc = "file://" + os.path.join(os.path.dirname(uri[len("sqlite:///"):]) or ".", "mlartifacts")
        try:
            return mlflow.create_experiment(name, artifact_location=loc)
        except mlflow.exceptions.MlflowException:
            exp = mlflow.get_experiment_by_name(name)  # created concurrently by another job
            if exp is None:
                raise
    return exp.experiment_id


def run_exists(uri: Optional[str], run_id: str) -> bool:
    """True if ``run_id`` exists (and is not deleted) at the tracking URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run = mlflow.MlflowClient(tracking_uri(uri)).get_run(run_id)
    except MlflowException:
        return False
    return run.info.lifecycle_stage != "deleted"


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def is_model_uri(value: str) -> bool:
    return value.startswith("models:/")


def resolve_model(uri: Optional[str], model_uri: str) -> dict[str, Any]:
    """``models:/<name>/<version>`` or ``models:/<name>@<alias>`` → {name, version, checkpoint (URL of the
    weights), step, run_id (the training run)}. Raises ``ValueError`` naming what is missing."""
    import mlflow
    from mlflow.exceptions import MlflowException

    m = _MODELS_URI.match(model_uri)
    if m is None:
        raise ValueError(f"model.checkpoint: {model_uri!r} is not models:/<name>/<version> or models:/<name>@<alias>")
    client = mlflow.MlflowClient(tracking_uri(uri))
    try:
        mv = (client.get_model_version(m["name"], m["version"]) if m["version"]
              else client.get_model_version_by_alias(m["name"], m["alias"]))
    except MlflowException as e:
        raise ValueError(f"model.checkpoint: {model_uri} not found in the model registry at "
                         f"{redact(tracking_uri(uri))} ({e.error_code})") from None
    if "checkpoint" not in mv.tags:
        raise ValueError(f"model.checkpoint: {model_uri} (version {mv.version}) has no 'checkpoint' tag; it was "
                         f"not registered by enat train")
    return {"name": m["name"], "version": str(mv.version), "checkpoint": mv.tags["checkpoint"],
            "step": int(mv.tags.get("step", 0)), "run_id": mv.run_id}


def log_evaluation(uri: Optional[str], model: Mapping[str, Any], metrics: Mapping[str, Any]) -> None:
    """An evaluation of a registered model version (from :func:`resolve_model`): ``metrics`` go on the
    training run at the checkpoint's step (so the UI plots FID against training step) and onto the
    model version as tags."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(uri))
    Run(client, model["run_id"], "", resumed=True, owns=False).log_metrics(metrics, step=model["step"])
    for k, v in metrics.items():
        if v is not None and math.isfinite(float(v)):
            client.set_model_version_tag(model["name"], model["version"], k, str(v))


def find_running_run(uri: Optional[str], experiment: str, tag: str, value: str) -> Optional[str]:
    """The id of the newest RUNNING run in ``experiment`` whose tag ``tag`` equals ``value`` (a job that
    died before it could record its run id elsewhere), else None."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri(uri))
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], f"tags.{tag} = '{value}' and attributes.status = 'RUNNING'",
                               max_results=1, order_by=["attributes.start_time DESC"])
    return found[0].info.run_id if found else None


__all__ = ["Run", "start_run", "tracking_uri", "flatten", "make_grid", "run_exists", "find_running_run",
           "is_model_uri", "resolve_model", "log_evaluation"]
