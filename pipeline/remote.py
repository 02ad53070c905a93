"""A service that may be away (the MLflow server): whether it answers now, and calls to it that must
never hold up the work.

:func:`unreachable` is a job's preflight: one request, the URL's userinfo sent as basic auth the way
requests (MLflow's HTTP client) sends it. :class:`Outbox` is what :class:`pipeline.tracking.Run` logs
through (MLflow stays out of this module: the caller says which failures mean "away"). ``submit``
enqueues a call and returns at once. The outbox thread makes the calls one by one, in order
(consecutive metric calls as one batch); a failure that means the service did not answer is retried
with backoff (1 s doubling to 15 s; at once on :meth:`Outbox.flush`) for as long as the job runs, and
logged once per outage as one warning line. What waits meanwhile is bounded (``max_values`` values,
``max_bytes`` of payload); a call beyond that is dropped and counted. :meth:`Outbox.close` waits a
bounded time for the rest and logs one line saying what was not sent, if anything.
"""
from __future__ import annotations

import base64
import collections
import logging
import re
import threading
import time
import urllib.parse
from typing import Any, Callable, Optional

from pipeline.storage import redact

THREAD = "enat-outbox"
QUIET = ("urllib3.connectionpool",)  # loggers whose warning per retry is silenced on the threads below
QUIET_THREADS = (THREAD, "SystemMetricsMonitor")  # and MLflow's system metrics: it says once that it stops
log = logging.getLogger("pipeline.tracking")


def split_userinfo(url: str) -> tuple[str, dict[str, str]]:
    """``http://user:pw@host/p`` → (``http://host/p``, its basic-auth header), decoded as requests does
    (``requests.utils.get_auth_from_url``: percent-decoded; latin-1, as ``HTTPBasicAuth``)."""
    u = urllib.parse.urlsplit(url)
    if "@" not in u.netloc:
        return url, {}
    user, pw = urllib.parse.unquote(u.username or ""), urllib.parse.unquote(u.password or "")
    token = base64.b64encode(f"{user}:{pw}".encode("latin1")).decode()
    return urllib.parse.urlunsplit(u._replace(netloc=u.netloc.rsplit("@", 1)[1])), {"Authorization": f"Basic {token}"}


def unreachable(url: str, timeout: float = 5.0) -> Optional[str]:
    """None if ``url`` answers (any HTTP status: a proxy may not expose it), else why not (redacted)."""
    import urllib.error
    import urllib.request

    plain, headers = split_userinfo(url)
    try:
        with urllib.request.urlopen(urllib.request.Request(plain, headers=headers), timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None
    except OSError as e:
        return redact(str(getattr(e, "reason", e)))


class _Call:
    """``fn()`` (or ``fn(items)`` for merged batches: ``items`` set), worth ``n`` values of ``kind``."""
    __slots__ = ("kind", "n", "fn", "nbytes", "items", "retry", "tries", "done", "result", "error")

    def __init__(self, kind: str, n: int, fn: Callable, nbytes: int, items: Optional[list], retry: bool):
        self.kind, self.n, self.fn, self.nbytes, self.items, self.retry = kind, n, fn, nbytes, items, retry
        self.tries, self.done, self.result, self.error = 0, False, None, None


class _Quiet(logging.Filter):
    """urllib3's "Retrying (...)" warnings from the threads of ``QUIET_THREADS``."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.threadName.startswith(QUIET_THREADS) and str(record.msg).startswith("Retrying"))


class _Redact(logging.Filter):
    """A handler's records with credentials redacted (MLflow's messages quote the tracking URI as given)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if redact(text) != text:
            record.msg, record.args = redact(text), ()
        return True


def redact_logs(name: str) -> None:
    """Every record that logger ``name``'s handlers print (its children's too) goes through ``redact``."""
    for handler in logging.getLogger(name).handlers:
        if not any(isinstance(f, _Redact) for f in handler.filters):
            handler.addFilter(_Redact())


def reason(e: BaseException) -> str:
    """The short cause in a client library's long error message (errno, timeout, HTTP status), redacted."""
    text = str(e)
    m = re.search(r"\[Errno -?\d+\] [^'\")\]]+|[Rr]ead timed out|timed out|RemoteDisconnected|\b[45]\d\d\b[^.\n]{0,80}",
                  text)
    return redact(m.group(0) if m else (text.splitlines() or [type(e).__name__])[0][:200])


class Outbox:
    """Calls to the service ``name`` (redacted into every message). ``classify(e)`` sorts a failure:
    ``"away"`` (no answer: retried while the job runs), ``"busy"`` (an error answer such as a 5xx: retried
    ``busy_tries`` times) or None (refused, or a local error: dropped with a warning)."""

    def __init__(self, name: str, classify: Callable[[BaseException], Optional[str]], max_values: int = 100_000,
                 max_bytes: int = 256 * 2 ** 20, max_batch: int = 1000, busy_tries: int = 5):
        self.name, self.classify = redact(name), classify
        self.max_values, self.max_bytes, self.max_batch, self.busy_tries = max_values, max_bytes, max_batch, busy_tries
        self.calls: collections.deque[_Call] = collections.deque()
        self.cv = threading.Condition()
        self.values = self.bytes = 0
        self.dropped: collections.Counter = collections.Counter()
        self.refused: collections.Counter = collections.Counter()
        self.away_since: Optional[float] = None
        self.closed = self.kick = False
        for logger in QUIET:
            quiet = logging.getLogger(logger)
            if not any(isinstance(f, _Quiet) for f in quiet.filters):
                quiet.addFilter(_Quiet())
        threading.Thread(target=self._loop, name=f"{THREAD}-{id(self):x}", daemon=True).start()

    def submit(self, kind: str, n: int, fn: Callable, nbytes: int = 0, items: Optional[list] = None,
               retry: bool = True, bounded: bool = True) -> _Call:
        """Enqueue ``fn`` and return at once. ``items``: ``fn`` takes a list, and consecutive calls with
        items (the same ``fn`` for all) are made as one, up to ``max_batch`` items. ``bounded=False``:
        never dropped for room (a run's end, a registration)."""
        call = _Call(kind, n, fn, nbytes, items, retry)
        with self.cv:
            full = bounded and (self.values + n > self.max_values or self.bytes + nbytes > self.max_bytes)
            if self.closed or full:
                if self.closed:
                    log.warning("%s: %d %s not sent (submitted after the end)", self.name, n, kind)
                self.dropped[kind] += n
                call.done, call.error = True, "dropped"
                return call
            self.values, self.bytes = self.values + n, self.bytes + nbytes
            self.calls.append(call)
            self.cv.notify_all()
        return call

    def call(self, fn: Callable) -> Any:
        """``fn()`` on the sender thread, once, after what is queued: its result, or what it raised (for
        state that lives in that thread, such as MLflow's fluent run)."""
        call = self.submit("call", 0, fn, retry=False, bounded=False)
        with self.cv:
            self.cv.wait_for(lambda: call.done)
        if isinstance(call.error, BaseException):
            raise call.error
        return call.result

    def ask(self, kind: str, n: int, fn: Callable, timeout: float, otherwise: Any) -> Any:
        """Submit ``fn`` (never dropped for room) and wait for its result at most ``timeout`` s, and not
        while the service is away: then ``otherwise`` (the call stays queued and is made later)."""
        call = self.submit(kind, n, fn, bounded=False)
        with self.cv:
            self.kick = True
            self.cv.notify_all()
            self.cv.wait_for(lambda: call.done or self.away_since is not None, timeout)
            return call.result if call.done and call.error is None else otherwise

    def flush(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s until everything submitted is sent (retrying at once); True if so."""
        with self.cv:
            self.kick = True
            self.cv.notify_all()
            return self.cv.wait_for(lambda: not self.calls, timeout)

    def close(self, timeout: float, about: str = "") -> Optional[str]:
        """:meth:`flush`, then stop; logs (and returns) one warning line with what was not sent (counts
        by kind, ``about`` appended), if anything."""
        self.flush(timeout)
        with self.cv:
            self.closed = True
            unsent = collections.Counter()
            for call in self.calls:
                unsent[call.kind] += call.n
            self.calls.clear()
            self.cv.notify_all()
        parts = [", ".join(f"{n} {kind}" for kind, n in c.items() if n) + why
                 for c, why in ((unsent, " (away at the end)"), (self.dropped, " (dropped: buffer full)"),
                                (self.refused, " (refused)")) if any(c.values())]
        if not parts:
            return None
        line = f"{self.name}: not sent{f' ({about})' if about else ''}: {'; '.join(parts)}"
        log.warning(line)
        return line

    def _loop(self) -> None:
        delay, merge = 1.0, self.max_batch
        while True:
            with self.cv:
                self.cv.wait_for(lambda: self.calls or self.closed)
                if self.closed:
                    return
                batch = [self.calls[0]]
                while batch[0].items is not None and len(batch) < len(self.calls):
                    nxt = self.calls[len(batch)]
                    if nxt.items is None or sum(len(c.items) for c in batch) + len(nxt.items) > merge:
                        break
                    batch.append(nxt)
            first = batch[0]
            try:
                result = first.fn([i for c in batch for i in c.items]) if first.items is not None else first.fn()
            except Exception as e:  # noqa: BLE001 — sorted by classify: retried, or dropped with a warning
                if self.closed:  # given up on meanwhile (counted by close)
                    return
                kind = self.classify(e)
                first.tries += 1
                if first.retry and (kind == "away" or (kind == "busy" and first.tries < self.busy_tries)):
                    self._away(e)
                    with self.cv:
                        self.cv.wait_for(lambda: self.kick or self.closed, delay)
                        self.kick = False
                    delay = min(2 * delay, 15.0)
                    continue
                if len(batch) > 1:  # one call of the batch is refused: find it, one call at a time
                    merge = 1
                    continue
                if first.retry:
                    log.warning("%s refused %d %s: %s", self.name, first.n, first.kind, reason(e))
                    self.refused[first.kind] += first.n
                self._done(batch, None, e)
            else:
                self._done(batch, result, None)
            delay, merge = 1.0, self.max_batch

    def _away(self, e: BaseException) -> None:
        with self.cv:
            first = self.away_since is None
            if first:
                self.away_since = time.monotonic()
                self.cv.notify_all()
        if first:
            log.warning("%s does not answer (%s): the job goes on; what it logs is kept (up to %d values, %d MiB) "
                        "and sent when the server is back", self.name, reason(e), self.max_values,
                        self.max_bytes >> 20)

    def _done(self, batch: list[_Call], result: Any, error: Optional[BaseException]) -> None:
        with self.cv:
            if self.away_since is not None and error is None:
                log.info("%s is back after %.0f s", self.name, time.monotonic() - self.away_since)
                self.away_since = None
            for call in batch:
                if self.calls and self.calls[0] is call:
                    self.calls.popleft()
                    self.values, self.bytes = self.values - call.n, self.bytes - call.nbytes
                call.done, call.result, call.error = True, result, error
            self.cv.notify_all()
