"""A resilient MLflow logger: keeps training alive when the tracking server is not.

Every call (params, metrics, tags, artifacts, run end) is queued and the queue is
flushed in order. When the server does not answer (short HTTP timeout, no retries),
the logger warns once per outage, keeps buffering (bounded), and retries at most every
``retry_interval_s``; when the server answers again the buffer is flushed with the
original timestamps and steps. A run that could not be created at start is created
on the first successful flush, unless the caller needs its id at once
(``start_run(..., wait_s=...)`` raises :class:`TrackingUnavailable` instead).

A call the store refuses for good (:func:`~dino_scale.tracking.refusals.is_refusal`: an
invalid key, a deleted run, an artifact store that refuses the write) would be refused again
on every retry: it is logged as an error naming the call, dropped, counted (``dropped``;
``failed_ops`` lists every refused call but metric batches) and the calls behind it are
sent. A refused batch of params, metrics or tags is first resent value by value, so a bad
key loses only its own value. :meth:`ResilientLogger.close` is True only when every call
was sent.

With a local sqlite store, an experiment this logger creates keeps its artifacts next to the
database (:func:`~.uris.sqlite_artifact_location`). Its pieces: :mod:`.ops` (what a queued call
is), :mod:`.http_settings` (its requests' timeouts and retries), :mod:`.refusals` (a refusal
told from an outage).
"""
from __future__ import annotations

import collections
import logging
import time
import uuid
from pathlib import Path
from typing import Any, Optional

from dino_scale.tracking.http_settings import HttpSettings
from dino_scale.tracking.ops import (
    MAX_BATCH_METRICS, PARAMS_PER_CALL, flatten_params, metric_entities, upload_timeout_s,
)
from dino_scale.tracking.refusals import (
    QUIET, SPLITTABLE, answered_late, describe, http_status, is_refusal, run_refused,
)
from dino_scale.tracking.uris import sqlite_artifact_location

__all__ = ["ResilientLogger", "TrackingUnavailable", "CREATE_ID_TAG", "MAX_REQUEST_TIMEOUT_S"]

log = logging.getLogger("dino_scale.tracking")
CREATE_ID_TAG = "dino_scale.create_id"  # one per start_run: a retried creation finds the run an earlier try made
# a store that answers late: the request timeout doubles up to this (a hung store then blocks the
# caller, rank 0's relay actor, this long per retry: RelayClient.close allows for it)
MAX_REQUEST_TIMEOUT_S = 30.0


class TrackingUnavailable(RuntimeError):
    """The MLflow run could not be created: the store did not answer in time, or refused it."""


class ResilientLogger(HttpSettings):
    """Buffered MLflow client for one run.

    Args:
        tracking_uri: MLflow tracking URI (http(s)://, sqlite:///, file:).
        run_id: an existing run to log to; or call :meth:`start_run`.
        timeout_s / max_retries: HTTP settings of this logger's own requests
            (``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, with no
            backoff; an explicit setting in the environment wins). A request the store did not
            answer in time doubles the timeout (``request_timeout_s``, up to ``max_timeout_s``,
            at most 30 s; not past :meth:`close`'s deadline): a slow store got the same request
            again every retry, for ever, and a hung one costs a longer wait per retry. They are in effect only
            while the logger sends: other MLflow calls of the process keep MLflow's defaults
            (a process-wide "no retries" made the registry calls after training fail on one
            dropped keep-alive connection).
        retry_interval_s: after a failure, wait this long before the next attempt.
        max_buffer: oldest metric batches are dropped (and counted) beyond this many ops.

    Counters: ``outages`` (times the store stopped answering), ``dropped`` (calls given up:
    refused by the store, or metric batches dropped from a full buffer), ``failed_ops`` (one
    line per refused call but metric batches: the run's end, artifacts, params...),
    ``flushed_after_outage`` (calls sent after the latest outage began; reset when the next
    one begins).
    """

    def __init__(self, tracking_uri: str, run_id: Optional[str] = None, *, timeout_s: float = 3.0,
                 max_retries: int = 0, retry_interval_s: float = 5.0, max_buffer: int = 100_000,
                 max_timeout_s: float = MAX_REQUEST_TIMEOUT_S):
        self.timeout_s = float(timeout_s)
        self.max_timeout_s = min(float(max_timeout_s), MAX_REQUEST_TIMEOUT_S)  # the relay's close allows for 30 s
        self.request_timeout_s = self.timeout_s  # grows while the store answers after it (read timeouts)
        self._http_env = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, timeout_s))),
                          "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(int(max_retries)),
                          "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0"}
        from dino_scale.tracking.clients import mlflow_client

        self.tracking_uri = tracking_uri
        self.client = mlflow_client(tracking_uri)  # a new sqlite store: one process migrates it
        self.run_id = run_id
        self.retry_interval_s = retry_interval_s
        self.max_buffer = max_buffer
        self._queue: collections.deque = collections.deque()
        self._merge_cap = MAX_BATCH_METRICS  # queued metric calls merged into one request, at most
        self._next_try = 0.0
        self._down = False
        self.outages = 0
        self.dropped = 0
        self.failed_ops: list[str] = []
        self.flushed_after_outage = 0
        self._dropped_at_outage = 0
        self._pending_create: Optional[dict] = None
        # why no call can be sent: the run's creation was refused, or the run was deleted while logged to
        self._no_run: Optional[str] = None
        self._dropped_kinds: collections.Counter = collections.Counter()
        self._logged_refusals: set = set()
        self._reported = 0  # drops reported by close() so far
        self.last_error: Optional[str] = None  # the latest refusal or outage, in words
        self._overflow_logged = False
        self._set_here: set[str] = set()  # HTTP variables _http_settings put in the environment

    # ------------------------------------------------------------------ run lifecycle
    def start_run(self, experiment: str, run_name: str, tags: Optional[dict[str, str]] = None,
                  parent_run_id: Optional[str] = None, wait_s: Optional[float] = None) -> Optional[str]:
        """Create a run (nested under ``parent_run_id`` if given); returns its id, or None
        when the server is unreachable (the run is then created on a later flush) or refused it.

        With ``wait_s``, for a caller that hands the run id to other processes (a run created
        later would miss what they log): the creation is retried every ``retry_interval_s`` for
        up to ``wait_s`` seconds, then :class:`TrackingUnavailable` is raised, naming the store
        and the last error; a refusal raises at once."""
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        tags[CREATE_ID_TAG] = uuid.uuid4().hex
        self._pending_create = {"experiment": experiment, "run_name": run_name, "tags": tags, "tried": False}
        self.flush(force=True)
        if wait_s is None or self.run_id is not None:
            return self.run_id
        deadline = time.monotonic() + wait_s
        while self._pending_create and time.monotonic() < deadline:
            time.sleep(min(self.retry_interval_s, max(0.0, deadline - time.monotonic())))
            self.flush(force=True)
        if self.run_id is None:
            self._pending_create = None  # the caller gives up on it: no run created behind its back
            raise TrackingUnavailable(
                f"MLflow run {run_name!r} (experiment {experiment!r}) could not be created at {self.tracking_uri}"
                f"{'' if self._no_run else f' within {wait_s:g} s'}: {self.last_error}; nothing would be tracked "
                + ("(the store answered and refused: a deleted experiment of that name is restored with `mlflow "
                   "experiments restore` or its name given up with --experiment; check the store's permissions)"
                   if self._no_run else
                   "(start the tracking server, or point MLFLOW_TRACKING_URI at a running one)"))
        return self.run_id

    def _create(self) -> None:
        spec = self._pending_create
        exp = self.client.get_experiment_by_name(spec["experiment"])
        if exp is not None:
            exp_id = exp.experiment_id
        else:
            try:
                exp_id = self.client.create_experiment(
                    spec["experiment"],
                    artifact_location=sqlite_artifact_location(self.tracking_uri, spec["experiment"]))
            except Exception:  # RESOURCE_ALREADY_EXISTS: another process created it meanwhile
                exp = self.client.get_experiment_by_name(spec["experiment"])
                if exp is None:
                    raise
                exp_id = exp.experiment_id
        if spec["tried"]:  # an earlier try may have created it and its answer been lost (a timeout)
            token = spec["tags"][CREATE_ID_TAG]
            found = self.client.search_runs([exp_id], filter_string=f"tags.`{CREATE_ID_TAG}` = '{token}'",
                                            max_results=1)
            if found:
                self.run_id = found[0].info.run_id
                self._pending_create = None
                return
        spec["tried"] = True
        run = self.client.create_run(exp_id, run_name=spec["run_name"], tags=spec["tags"])
        self.run_id = run.info.run_id
        self._pending_create = None

    def end_run(self, status: str = "FINISHED") -> None:
        self._enqueue(("end", status))

    # ------------------------------------------------------------------ logging calls
    def log_params(self, params: dict[str, Any]) -> None:
        flat = flatten_params(params)
        items = list(flat.items())
        for i in range(0, len(items), PARAMS_PER_CALL):
            self._enqueue(("params", dict(items[i:i + PARAMS_PER_CALL])))

    def set_tags(self, tags: dict[str, Any]) -> None:
        self._enqueue(("tags", {k: str(v) for k, v in tags.items()}))

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        ts = int(time.time() * 1000)
        clean = {}
        for k, v in metrics.items():
            try:
                clean[k] = float(v)
            except (TypeError, ValueError):
                continue
        if clean:
            self._enqueue(("metrics", clean, ts, int(step or 0)))

    def log_artifacts(self, local_dir: str | Path, artifact_path: Optional[str] = None) -> None:
        self._enqueue(("artifacts", str(local_dir), artifact_path))

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._enqueue(("dict", data, artifact_file))

    # ------------------------------------------------------------------ buffering
    @property
    def pending(self) -> int:
        return len(self._queue) + (1 if self._pending_create else 0)

    def _enqueue(self, op: tuple) -> None:
        self._queue.append(op)
        while len(self._queue) > self.max_buffer:
            for i, queued in enumerate(self._queue):
                if queued[0] == "metrics":
                    del self._queue[i]
                    self.dropped += 1
                    self._dropped_kinds["metrics (buffer full)"] += 1
                    if not self._overflow_logged:
                        log.warning("MLflow: %d logging calls buffered; dropping the oldest metric batches "
                                    "until %s answers", self.max_buffer, self.tracking_uri)
                        self._overflow_logged = True
                    break
            else:
                break
        self.flush()

    def _send_head(self) -> int:
        """Send the op at the head of the queue; returns how many queued ops went out. Metric
        calls queued one after another go as one ``log_batch`` (up to :data:`~.ops.MAX_BATCH_METRICS`
        values): after an outage rank 0's backlog was one request per step (1500 buffered calls:
        one ``log_metrics`` call blocked for 123 s). A merged batch the store refuses is tried
        again in halves until the call holding the bad value goes alone (its refusal handled as
        before); 0 when nothing went out yet."""
        head = self._queue[0]
        if head[0] == "metrics":
            merged, count = [], 0
            for op in self._queue:
                full = count + len(op[1]) > MAX_BATCH_METRICS or len(merged) >= self._merge_cap
                if op[0] != "metrics" or full:
                    break
                merged.append(op)
                count += len(op[1])
            if len(merged) > 1:
                try:
                    self.client.log_batch(self.run_id, metrics=[m for op in merged for m in metric_entities(op)])
                    self._merge_cap = MAX_BATCH_METRICS
                    return len(merged)
                except Exception as exc:
                    if not is_refusal(exc):
                        raise
                    self._merge_cap = len(merged) // 2  # halves until the refused call goes alone
                    if self._merge_cap > 1:
                        return 0
        self._apply(head)
        if head[0] == "metrics":  # grows back once past a refused call
            self._merge_cap = min(MAX_BATCH_METRICS, max(2, 2 * self._merge_cap))
        return 1

    def _apply(self, op: tuple) -> None:
        from mlflow.entities import Param, RunTag

        kind = op[0]
        if kind == "params":
            self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in op[1].items()])
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op[1].items()])
        elif kind == "metrics":
            self.client.log_batch(self.run_id, metrics=metric_entities(op))
        elif kind == "artifacts":
            with self._request_timeout(upload_timeout_s(op[1], self.timeout_s)):
                self.client.log_artifacts(self.run_id, op[1], op[2])
        elif kind == "dict":
            self.client.log_dict(self.run_id, op[1], op[2])
        elif kind == "end":
            self.client.set_terminated(self.run_id, status=op[1])
        else:  # pragma: no cover
            raise ValueError(kind)

    def flush(self, force: bool = False, deadline: Optional[float] = None) -> bool:
        """Send buffered ops in order; True when the buffer is empty afterwards. ``deadline``
        (``time.monotonic()``): no request starts after it (the rest stays buffered)."""
        if not force and self._down and time.monotonic() < self._next_try:
            return False
        with self._http_settings(deadline):
            return self._flush(deadline)

    def _flush(self, deadline: Optional[float] = None) -> bool:
        while True:
            if deadline is not None and time.monotonic() >= deadline and (self._queue or self._pending_create):
                return False
            op: Optional[tuple] = None
            try:
                if self._pending_create:
                    op = ("create", self._pending_create)
                    self._create()
                if not self._queue:
                    break
                op = self._queue[0]
                if self.run_id is None or self._no_run is not None:  # no run, or one that takes nothing more
                    if self._no_run is None:
                        return False  # start_run not called yet
                    self._queue.popleft()
                    self._drop(op, self._no_run, "NO_RUN")
                    continue
                sent = self._send_head()
                for _ in range(sent):
                    self._queue.popleft()
                if self._down:
                    self.flushed_after_outage += sent
                continue
            except Exception as exc:
                if not is_refusal(exc):
                    self._outage(exc)
                    return False
                self._refused(op, exc)
        if self._down:
            gone = self.dropped - self._dropped_at_outage
            log.warning("MLflow tracking at %s reachable again; flushed %d buffered calls%s",
                        self.tracking_uri, self.flushed_after_outage, f", dropped {gone}" if gone else "")
            self._down = False
        return True

    def _refused(self, op: tuple, exc: Exception) -> None:
        """``op`` (at the head of the queue, or the run's creation) was refused for good."""
        reason = f"refused ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]})"
        self.last_error = f"{describe(op)} {reason}"
        code = str(getattr(exc, "error_code", type(exc).__name__))
        if op[0] == "create":
            self._pending_create = None
            self._no_run = "its run's creation was refused"
            self._drop(op, reason, code)
            return
        self._queue.popleft()
        if run_refused(exc):  # deleted (or ended) while it ran: every call after this one would be refused
            self._no_run = f"its run {self.run_id} takes no more calls, {reason}"
            self._drop(op, reason, code)
            return
        if op[0] in SPLITTABLE and len(op[1]) > 1 and http_status(exc) == 400:  # one bad key?
            for key in reversed(list(op[1])):
                self._queue.appendleft((op[0], {key: op[1][key]}) + op[2:])
            return
        self._drop(op, reason, code)

    def _drop(self, op: tuple, reason: str, code: str) -> None:
        self.dropped += 1
        self._dropped_kinds[op[0]] += 1
        what = describe(op)
        if op[0] != "metrics":
            self.failed_ops.append(f"{what}: {reason}")
        first = (op[0], code) not in self._logged_refusals
        self._logged_refusals.add((op[0], code))
        log.log(logging.ERROR if first or op[0] not in QUIET else logging.DEBUG,
                "MLflow %s at %s: %s dropped, %s%s", f"run {self.run_id}" if self.run_id else "(no run)",
                self.tracking_uri, what, reason, f"; more {op[0]} calls dropped for {code} are counted at close"
                if first and op[0] in QUIET else "")

    def _outage(self, exc: Exception) -> None:
        """The store did not answer (or cannot take calls now): keep buffering, retry later."""
        self.last_error = f"unreachable ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]})"
        if answered_late(exc) and self.request_timeout_s < self.max_timeout_s:
            # A store slower than the timeout got the same request again every retry, for ever
            # (the retry is safe: MLflow stores a metric, param or tag sent twice once).
            self.request_timeout_s = min(self.max_timeout_s, 2 * self.request_timeout_s)
            log.info("MLflow tracking at %s did not answer within the request timeout; waiting up to %.0f s "
                     "from now on", self.tracking_uri, self.request_timeout_s)
        if not self._down:
            self.outages += 1
            self.flushed_after_outage, self._dropped_at_outage = 0, self.dropped
            self._overflow_logged = False
            log.warning("MLflow tracking at %s %s; training continues and %d logging calls are buffered "
                        "until it returns", self.tracking_uri, self.last_error, self.pending)
        self._down = True
        self._next_try = time.monotonic() + self.retry_interval_s

    def close(self, timeout_s: float = 30.0) -> bool:
        """Flush until empty or ``timeout_s`` passes; True if every call was sent (False also
        when calls were dropped: refused by the store, see ``failed_ops``, or from a full
        buffer). The logger stays usable. No request starts after ``timeout_s``, but an artifact
        upload started before runs to its own timeout (:func:`~.ops.upload_timeout_s`, 60 s plus 5 MB/s:
        minutes for a Swin-L checkpoint), as one cut at the deadline is sent again from its
        start and never lands."""
        deadline = time.monotonic() + timeout_s
        while not self.flush(force=True, deadline=deadline):
            if time.monotonic() >= deadline:
                log.warning("MLflow: %d logging calls could not be sent before shutdown", self.pending)
                break
            time.sleep(min(self.retry_interval_s, max(0.1, deadline - time.monotonic())))
        if self.dropped > self._reported:
            self._reported = self.dropped
            log.error("MLflow run %s: %d logging calls were dropped (%s)%s", self.run_id, self.dropped,
                      ", ".join(f"{kind} {n}" for kind, n in sorted(self._dropped_kinds.items())),
                      "; refused: " + "; ".join(self.failed_ops[:10]) +
                      (f"; ... {len(self.failed_ops)} in all" if len(self.failed_ops) > 10 else "")
                      if self.failed_ops else "")
        return self.pending == 0 and self.dropped == 0
