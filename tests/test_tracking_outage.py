"""Tracking never stops the work (issue 21): an MLflow server that goes away during a job (the session's
real `mlflow server` behind tests/faults.py's Forwarder, cut and brought back) costs one warning line; what
the job logs meanwhile is sent when the server is back, exactly once, and what could not be sent by the
end is counted in one line. Also: a tracking URI with credentials passes the preflight."""
from __future__ import annotations

import base64
import contextlib
import http.server
import logging
import threading
import time

import mlflow
import numpy as np
import pytest

from pipeline import tracking
from pipeline.config import ConfigError
from tests.faults import Forwarder
from tests.services import free_port

PROMPT_S = 30  # a generous bound for calls that must not wait on the network (MLflow's own: minutes)
GUARD_S = 120  # a hang guard, not a timing claim


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "pipeline.tracking"]


def _wait_for_warnings(caplog, n: int) -> None:
    deadline = time.monotonic() + GUARD_S
    while len(_warnings(caplog)) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def test_an_outage_mid_run_loses_nothing_and_holds_up_nothing(mlflow_server, caplog):
    """Metrics, params, tags and an image logged while the server is away all arrive once it is back
    (read from the server directly), each metric value exactly once; one warning, naming the server."""
    fwd = Forwarder.to_url(mlflow_server)
    try:
        run = tracking.start_run(fwd.url, "enat-outage-test", run_name="outage")
        run.log_metrics({"loss": 1.0}, step=0)
        assert run.flush(GUARD_S) and not _warnings(caplog)

        fwd.stop()  # the server goes away mid-run
        t0 = time.perf_counter()
        for step in range(1, 31):
            run.log_metrics({"loss": 1.0 / (step + 1), "lr": step * 1e-4}, step=step)
        run.set_tags({"phase": "outage"})
        run.log_grid(np.random.default_rng(0).random((4, 3, 8, 8)), key="samples", step=30)
        assert run.log_params({"model": {"depth": 2}}) == {"model.depth": "2"}  # not waited for: the server is away
        _wait_for_warnings(caplog, 1)
        for step in range(31, 41):  # and after the outage was noticed
            run.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        took = time.perf_counter() - t0
        assert took < PROMPT_S, f"logging during the outage took {took:.1f} s"

        fwd.start()  # back, on the same port
        run.end()
    finally:
        fwd.stop()

    lines = _warnings(caplog)
    assert len(lines) == 1, lines
    assert "does not answer" in lines[0] and fwd.url in lines[0]
    others = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING
              and r.name != "pipeline.tracking"]
    assert not others, others  # e.g. urllib3's warning per retry
    client = mlflow.MlflowClient(mlflow_server)  # the server itself, not through the forwarder
    r = client.get_run(run.run_id)
    assert r.info.status == "FINISHED"
    assert r.data.params == {"model.depth": "2"} and r.data.tags["phase"] == "outage"
    loss = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "loss"))
    assert loss == [(0, 1.0)] + [(s, 1.0 / (s + 1)) for s in range(1, 41)]  # each exactly once
    lr = sorted((m.step, m.value) for m in client.get_metric_history(run.run_id, "lr"))
    assert lr == [(s, s * 1e-4) for s in range(1, 31)]
    assert "samples/grid.png" in {a.path for a in client.list_artifacts(run.run_id, "samples")}
    assert client.list_artifacts(run.run_id, "images")  # the step-indexed image


def test_a_server_away_until_the_end_is_reported_in_one_line(mlflow_server, caplog, monkeypatch):
    """end() gives up after its bounded wait and says, in one line, what was not logged (kept, and
    dropped once the buffer was full); the server indeed holds none of it."""
    monkeypatch.setattr(tracking, "BUFFER_VALUES", 15)
    fwd = Forwarder.to_url(mlflow_server)
    try:
        run = tracking.start_run(fwd.url, "enat-outage-test", run_name="away-at-the-end")
        run.log_metrics({"loss": 1.0}, step=0)
        assert run.flush(GUARD_S)
        fwd.stop()
        t0 = time.perf_counter()
        for step in range(1, 13):
            run.log_metrics({"loss": 0.5}, step=step)
        run.set_tags({"phase": "away"})
        run.log_metrics({f"m{i}": 1.0 for i in range(5)}, step=13)  # 12 + 1 + 5 > 15: dropped
        assert run.register_checkpoint("enat-outage-model", "file:///ckpt/ema.pt", 12, {}) is None
        run.end(timeout=2)
        took = time.perf_counter() - t0
    finally:
        fwd.stop()
    assert took < PROMPT_S + GUARD_S, f"end() took {took:.1f} s"
    lines = _warnings(caplog)
    assert len(lines) == 2 and "does not answer" in lines[0], lines
    end = lines[1]
    assert f"run {run.run_id}" in end and "away at the end" in end, end
    for what in ("12 metric values, 1 tags, 1 model registrations, 1 run end (status FINISHED) (away at the end)",
                 "5 metric values (dropped: buffer full)"):
        assert what in end, end
    client = mlflow.MlflowClient(mlflow_server)
    r = client.get_run(run.run_id)
    assert r.info.status == "RUNNING" and "phase" not in r.data.tags
    assert [m.step for m in client.get_metric_history(run.run_id, "loss")] == [0]


class _Recorder(http.server.BaseHTTPRequestHandler):
    """Answers every request with ``{}`` and records its Authorization header."""
    seen: list = []

    def _answer(self) -> None:
        self.seen.append((self.path.split("?")[0], self.headers.get("Authorization")))
        if self.command == "POST":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    do_GET = do_POST = _answer

    def log_message(self, *args) -> None:
        pass


def test_credentials_in_the_tracking_uri(mlflow_server, capfd, monkeypatch):
    """``http://user:password@host`` passes the preflight (it broke urllib's host parsing), which sends
    the same basic auth as MLflow's own client; a run through it prints no password (MLflow's run links,
    its log lines); an unreachable one is named with its password redacted."""
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "")
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")  # as it was after the test
    host = mlflow_server.split("://", 1)[1]
    tracking.check_reachable(f"http://enat:s3cret%40pw@{host}")
    run = tracking.start_run(f"http://enat:s3cret%40pw@{host}", "enat-outage-test", run_name="credentials")
    run.log_metrics({"loss": 1.0}, step=1)
    run.end()
    logging.getLogger("mlflow.tracking").warning(f"API request to http://enat:s3cret%40pw@{host}/api failed")
    assert mlflow.MlflowClient(mlflow_server).get_run(run.run_id).data.metrics == {"loss": 1.0}
    out, err = capfd.readouterr()
    assert "s3cret" not in out + err and "***@" in err, out + err

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://enat:s3cret%40pw@127.0.0.1:{server.server_address[1]}"
        tracking.check_reachable(uri)
        with contextlib.suppress(Exception):  # only the request it sends matters here
            mlflow.MlflowClient(uri).search_experiments()
    finally:
        server.shutdown()
        server.server_close()
    expected = "Basic " + base64.b64encode(b"enat:s3cret@pw").decode()
    health = [auth for path, auth in _Recorder.seen if path == "/health"]
    api = [auth for path, auth in _Recorder.seen if path.startswith("/api/")]
    assert health == [expected] and api and set(api) == {expected}, _Recorder.seen

    with pytest.raises(ConfigError, match=r"cannot reach the MLflow server at http://\*\*\*@127\.0\.0\.1") as e:
        tracking.check_reachable(f"http://enat:s3cret@127.0.0.1:{free_port()}")
    assert "s3cret" not in str(e.value)
