"""Observability of the ranking service: Prometheus metrics, JSON request logs, request ids.

One pure ASGI middleware does the per-request work: it takes the request id from ``X-Request-ID``
(or makes one) and returns it, and once the response has gone out it updates the metrics and
writes one JSON log line. The rank endpoint only hands over what it computed
(:func:`note_ranked`: a few references, no arithmetic), so everything this module costs happens
after the client has its answer. ``GET /metrics`` serves the Prometheus text format.

Several uvicorn workers: prometheus-client's multiprocess mode, chosen when
``PROMETHEUS_MULTIPROC_DIR`` is set before prometheus-client is imported. Each worker writes
its values to memory-mapped files in that directory and a scrape, whichever worker answers it,
adds up every worker's files. ``ranker serve --workers N`` (N > 1) sets the directory up
(:func:`multiprocess_metrics`); each worker marks itself dead on shutdown so its live gauges
leave the sums.

The JSON log formatting is in :mod:`service.logs`. Metric names and the log schema are
documented in ``docs/observability.md``.
"""

from __future__ import annotations

import asyncio
import glob
import logging
import math
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.process_collector import ProcessCollector
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.logs import request_context

if TYPE_CHECKING:
    from ranker.config import TaskSpec
    from ranker.scoring import RankingFormula
    from service.engine import Ranked, ServingModel

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
REQUEST_ID_HEADER = b"x-request-id"
# What a client may send as a request id: printable ASCII without spaces, at most 128 bytes.
# Anything else is replaced by a fresh id, so logs and response headers never carry junk.
_VALID_REQUEST_ID = re.compile(rb"[!-~]{1,128}")
_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
FLUSH_SECONDS = 1.0  # how late another worker's prediction histograms may be in a scrape
# Probes and scrapes arrive every few seconds: their successes are logged at DEBUG only.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
)  # fmt: skip
CANDIDATE_BUCKETS = (1, 10, 25, 50, 100, 200, 300, 500, 750, 1000, 1500, 2000, 5000)
PROBABILITY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
    0.8, 0.9, 0.95, 0.99, 1.0,
)  # fmt: skip
_SERIES_125 = tuple(m * 10.0**e for e in range(-2, 4) for m in (1, 2, 5))  # 0.01 .. 5000
VALUE_BUCKETS = (*_SERIES_125, 10000.0)  # non-negative amounts (seconds of watch time, ...)
SCORE_BUCKETS = (*(-b for b in reversed(_SERIES_125[:-3])), 0.0, *_SERIES_125[:-3])  # +-0.01..500

log = logging.getLogger("ranker.service.observability")
access_log = logging.getLogger("ranker.access")


def prediction_buckets(task: TaskSpec) -> tuple[float, ...]:
    """Bucket bounds that resolve a head's served predictions: probabilities for binary heads,
    16 even steps over ``value_range`` when the head is clipped to one (stars), a 1-2-5 series
    otherwise (seconds)."""
    if task.kind == "binary":
        return PROBABILITY_BUCKETS
    if task.value_range is not None:
        lo, hi = task.value_range
        return tuple(float(b) for b in np.linspace(lo, hi, 17))
    return VALUE_BUCKETS


class VectorHistogram:
    """A Prometheus histogram fed a whole vector per call, at numpy cost.

    ``Histogram.observe`` is one Python call per value (1-3 us each, several more with the
    multiprocess files): 500 candidates times 5 histograms would cost milliseconds per request.
    Here ``observe`` bins the vector with one ``np.searchsorted`` and adds the bucket counts to
    a pending numpy array; ``flush`` moves them into the histogram, one increment per non-empty
    bucket. The service flushes before each scrape and once a second, so a request pays a few
    microseconds of numpy and no Python loop at all.

    prometheus-client has no public bulk observe, so ``flush`` writes what its ``observe``
    writes (``_buckets[i]``: the non-cumulative count of bucket ``i``; ``_sum``) and the
    exposition, multiprocess files included, is the same; ``test_vector_histogram_equals_observe``
    fails if an upgrade changes those internals.
    """

    def __init__(self, histogram: Histogram) -> None:
        try:
            self._buckets = list(histogram._buckets)
            self._sum = histogram._sum
            bounds = histogram._upper_bounds
        except AttributeError as e:  # pragma: no cover - only with another prometheus-client
            raise RuntimeError(
                f"prometheus_client's Histogram no longer has the internals VectorHistogram "
                f"fills ({e}); pin prometheus-client or update service/observability.py"
            ) from None
        # ``observe`` puts v in the first bucket with v <= bound: searchsorted's side="left".
        self._bounds = np.asarray(bounds, dtype=np.float64)
        self._pending = np.zeros(len(self._bounds), np.int64)
        self._pending_sum = 0.0

    def observe(self, values: np.ndarray) -> None:
        """Adds every value of ``values`` ``(n,)``; NaNs are skipped (they have no bucket)."""
        v = np.asarray(values, dtype=np.float64)
        total = float(v.sum())
        if math.isnan(total):
            v = v[~np.isnan(v)]
            total = float(v.sum())
        idx = np.searchsorted(self._bounds, v, side="left")
        self._pending += np.bincount(idx, minlength=len(self._bounds))
        self._pending_sum += total

    def flush(self) -> None:
        """Moves the pending counts into the Prometheus histogram. Called on the event loop,
        as ``observe`` is: no lock needed."""
        counts = self._pending.tolist()
        total = self._pending_sum
        self._pending[:] = 0
        self._pending_sum = 0.0
        for i, c in enumerate(counts):
            if c:
                self._buckets[i].inc(c)
        if total:
            self._sum.inc(total)


@dataclass(slots=True)
class _Outcome:
    """What a rank request produced, summarised once for both the metrics and the log line."""

    candidates: int
    stages: dict[str, float]  # seconds
    degraded: bool
    user_known: bool
    unknown_videos: int
    unknown_context: tuple[str, ...]
    scores: np.ndarray  # (n,) every scored candidate
    predictions: dict[str, np.ndarray]  # task -> (n,)
    variant: str | None = None  # the ranking config's variant (None: none declared)


@dataclass(slots=True)
class _Exchange:
    """One request as the middleware sees it; the endpoint adds what it ranked."""

    request_id: str
    started: float  # perf_counter() when the request reached the middleware
    status: int = 500  # until a response starts: an exception is a 500 to the client
    responded: float = 0.0  # perf_counter() at http.response.start
    ranked: Ranked | None = None
    ranked_at: float = 0.0
    model: ServingModel | None = None
    formula: RankingFormula | None = None


_current = request_context  # holds the _Exchange of the request being served


def note_ranked(ranked: Ranked, model: ServingModel, formula: RankingFormula) -> None:
    """Hands the endpoint's result to the middleware (references only: all observing happens
    after the response is sent). A no-op outside a request the middleware wraps."""
    ex = _current.get()
    if ex is not None:
        ex.ranked, ex.model, ex.formula = ranked, model, formula
        ex.ranked_at = time.perf_counter()


def current_request_id() -> str | None:
    """The id of the request being served (``X-Request-ID``, the client's or one made up), as
    the middleware returns it in the response; None outside a request it wraps."""
    ex = _current.get()
    return None if ex is None else ex.request_id


class Observability:
    """The service's metrics (one set per app) and what updates them.

    In single-process mode the metrics live in a registry of their own, so tests can build many
    apps in one process. In multiprocess mode they are registered nowhere: their values go to
    the shared directory and each scrape collects that directory.
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.multiprocess_dir = multiprocess_dir
        self.registry: CollectorRegistry | None = None
        if multiprocess_dir is None:
            self.registry = CollectorRegistry()
            ProcessCollector(registry=self.registry)  # per process: meaningless across workers
        reg = self.registry
        self.requests = Counter(
            "ranker_requests",
            "HTTP requests by endpoint (route template), method and status",
            ["endpoint", "method", "status"],
            registry=reg,
        )
        self.request_seconds = Histogram(
            "ranker_request_duration_seconds",
            "Time from the request reaching the app to the end of the response, by endpoint",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.stage_seconds = Histogram(
            "ranker_stage_duration_seconds",
            "Time per ranking stage: decode (body read, parse, validation), features (context "
            "encoding, feature store), forward (model), combine (ranking formula, sort), encode "
            "(response body)",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.candidates = Histogram(
            "ranker_candidates",
            "Candidates scored per rank request",
            buckets=CANDIDATE_BUCKETS,
            registry=reg,
        )
        self.unknown_users = Counter(
            "ranker_unknown_users",
            "Rank requests whose user the feature store does not know (degraded ones excluded)",
            registry=reg,
        )
        self.unknown_videos = Counter(
            "ranker_unknown_videos",
            "Candidates the feature store does not know (degraded responses excluded)",
            registry=reg,
        )
        self.unknown_context = Counter(
            "ranker_unknown_context_values",
            "Rank requests whose context gave a value the model does not know, by feature "
            "(ranked as if the feature were absent)",
            ["feature"],
            registry=reg,
        )
        self.variant_requests = Counter(
            "ranker_variant_requests",
            "Rank responses by the ranking config's variant they were scored with (control: "
            "the base weights); only configs that declare variants count here",
            ["variant"],
            registry=reg,
        )
        self.degraded = Counter(
            "ranker_degraded_responses",
            "Rank responses served on default features because of a feature-store fault",
            registry=reg,
        )
        self.model_info = Gauge(
            "ranker_model_info",
            "1 for the model version served, 0 for versions served before",
            ["version"],
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.ranking_info = Gauge(
            "ranker_ranking_config_info",
            "1 for the ranking-config version served, 0 for versions served before",
            ["version"],
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.engine_info = Gauge(
            "ranker_engine_info",
            "1 for the scoring engine serving each model version (selected_by: auto, or "
            "setting when RANKER_BACKEND names it), 0 for engines served before",
            ["version", "engine", "selected_by"],
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.engine_seconds = Gauge(
            "ranker_engine_sample_forward_seconds",
            "RANKER_BACKEND=auto: median forward time of one sample request, per engine tried "
            "at start-up or reload (refused engines are not timed and not listed)",
            ["version", "engine"],
            multiprocess_mode="livemax",
            registry=reg,
        )
        self.exposure_dropped = Counter(
            "ranker_exposure_dropped_rows",
            "Rows of the exposure or event log dropped because the writer's queue was full "
            "(RANKER_EXPOSURE_QUEUE_SIZE) or the log was closing, by log",
            ["log"],
            registry=reg,
        )
        self.exposure_written = Counter(
            "ranker_exposure_written_rows",
            "Rows written to complete files of the exposure or event log, by log",
            ["log"],
            registry=reg,
        )
        self.exposure_failed = Counter(
            "ranker_exposure_write_errors",
            "Batches or files of the exposure or event log that failed to build or write (their "
            "rows are lost; the service log says why), by log",
            ["log"],
            registry=reg,
        )
        self._engine_labels: tuple[str, str, str] | None = None
        self.score = VectorHistogram(
            Histogram(
                "ranker_score",
                "Final ranking score of every scored candidate",
                buckets=SCORE_BUCKETS,
                registry=reg,
            )
        )
        self._heads: dict[str, VectorHistogram] = {}
        self._heads_of: ServingModel | None = None
        self._versions: tuple[str | None, str | None] = (None, None)
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._duration_children: dict[str, Any] = {}
        self._stage_children: dict[str, Any] = {}

    # --- what changes with the served model -------------------------------------------------

    def serving(self, model: ServingModel, formula: RankingFormula) -> None:
        """Follows the served model: version gauges and one histogram per head. Cheap when
        nothing changed (two identity checks), so it runs on every observed request and a
        hot-reloaded model shows up without the reload code calling anything."""
        if model is not self._heads_of:
            for task in model.artifact.config.tasks:
                if task.name not in self._heads:
                    self._heads[task.name] = VectorHistogram(
                        Histogram(
                            f"ranker_prediction_{task.name}",
                            f"Served prediction of head {task.name} for every scored candidate"
                            + (f" ({task.unit})" if task.unit else ""),
                            buckets=prediction_buckets(task),
                            registry=self.registry,
                        )
                    )
            self._heads_of = model
            self.set_engine(model)
        self.set_versions(model.version, formula.version)

    def set_engine(self, model: ServingModel) -> None:
        """The engine serving ``model`` and, under ``auto``, what each admitted one measured."""
        p = model.predictor
        labels = (model.version, p.backend, "auto" if p.selection is not None else "setting")
        if self._engine_labels is not None and self._engine_labels != labels:
            self.engine_info.labels(*self._engine_labels).set(0)
        self.engine_info.labels(*labels).set(1)
        self._engine_labels = labels
        if p.selection is not None:
            for trial in p.selection.trials:
                if trial.ms is not None:
                    self.engine_seconds.labels(model.version, trial.engine).set(trial.ms / 1e3)

    def set_versions(self, model_version: str, ranking_version: str) -> None:
        """Marks the versions served now with 1 and the ones they replace with 0."""
        old_model, old_ranking = self._versions
        if model_version != old_model:
            if old_model is not None:
                self.model_info.labels(old_model).set(0)
            self.model_info.labels(model_version).set(1)
        if ranking_version != old_ranking:
            if old_ranking is not None:
                self.ranking_info.labels(old_ranking).set(0)
            self.ranking_info.labels(ranking_version).set(1)
        self._versions = (model_version, ranking_version)

    # --- per request ------------------------------------------------------------------------

    def observe(
        self, endpoint: str, method: str, ex: _Exchange, out: _Outcome | None, finished: float
    ) -> None:
        """Updates the metrics for one finished request (children cached: one dict lookup each
        instead of prometheus-client's locked ``labels()``)."""
        key = (endpoint, method, ex.status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(
                endpoint, method, str(ex.status)
            )
        child.inc()
        duration = self._duration_children.get(endpoint)
        if duration is None:
            duration = self._duration_children[endpoint] = self.request_seconds.labels(endpoint)
        duration.observe(finished - ex.started)
        if out is None or ex.model is None or ex.formula is None:
            return
        self.serving(ex.model, ex.formula)
        self.candidates.observe(out.candidates)
        for stage, seconds in out.stages.items():
            self._stage(stage).observe(seconds)
        if out.variant is not None:  # names from the config: as many labels as declared arms
            self.variant_requests.labels(out.variant).inc()
        if out.degraded:
            self.degraded.inc()
        else:
            if not out.user_known:
                self.unknown_users.inc()
            if out.unknown_videos:
                self.unknown_videos.inc(out.unknown_videos)
        for feature in out.unknown_context:
            self.unknown_context.labels(feature).inc()
        for name, values in out.predictions.items():
            head = self._heads.get(name)
            if head is not None:
                head.observe(values)
        self.score.observe(out.scores)

    def flush(self) -> None:
        """Moves the whole-vector histograms' pending counts into the metrics."""
        self.score.flush()
        for head in list(self._heads.values()):
            head.flush()

    def _stage(self, stage: str) -> Any:
        child = self._stage_children.get(stage)
        if child is None:
            child = self._stage_children[stage] = self.stage_seconds.labels(stage)
        return child

    # --- scraping and process life ----------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition; in multiprocess mode, every worker's values summed."""
        if self.multiprocess_dir is not None:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
            return generate_latest(registry)
        assert self.registry is not None
        return generate_latest(self.registry)

    def started(self) -> None:
        """Worker start-up: drops the live gauges of workers that died without marking
        themselves dead (killed, crashed), whose versions would otherwise linger."""
        if self.multiprocess_dir is None:
            return
        pattern = os.path.join(self.multiprocess_dir, "gauge_live*_*.db")
        for path in glob.glob(pattern):
            pid = Path(path).stem.rsplit("_", 1)[-1]
            if pid.isdigit() and not _alive(int(pid)):
                multiprocess.mark_process_dead(int(pid), self.multiprocess_dir)

    def stopped(self) -> None:
        """Worker shutdown: its live gauges leave the sums; its counters stay (they counted)."""
        if self.multiprocess_dir is not None:
            multiprocess.mark_process_dead(os.getpid(), self.multiprocess_dir)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _outcome(ex: _Exchange) -> _Outcome | None:
    """The rank result of ``ex`` summarised, or None when it ranked nothing. Stages: the
    engine's own timings, plus decode (request arrival to ranking start) and encode (ranking
    end to the response start) measured around them."""
    r = ex.ranked
    if r is None:
        return None
    stages: dict[str, float] = {}
    if r.started:
        stages["decode"] = r.started - ex.started
    stages.update(r.timings)
    if ex.responded:
        stages["encode"] = ex.responded - ex.ranked_at
    # every scored candidate, not only the top_k returned
    scores = r.all_scores if r.all_scores is not None else r.scores
    preds = r.all_predictions if r.all_predictions is not None else r.predictions
    return _Outcome(
        candidates=len(scores),
        stages=stages,
        degraded=r.lookup.degraded is not None,
        user_known=not r.lookup.user_missing,
        unknown_videos=int(r.lookup.videos_missing.sum()),
        unknown_context=r.unknown_context,
        variant=r.variant,
        scores=scores,
        predictions=preds,
    )


class ObservabilityMiddleware:
    """Pure ASGI middleware: request id in and out, metrics and one log line per request.

    Pure ASGI rather than ``@app.middleware("http")``: no extra task, no response
    re-streaming; it only wraps ``send`` to read the status and add one header.
    """

    def __init__(self, app: ASGIApp, observability: Observability) -> None:
        self.app = app
        self.obs = observability

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ex = _Exchange(_request_id(scope), time.perf_counter())
        header = (REQUEST_ID_HEADER, ex.request_id.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                ex.status = message["status"]
                ex.responded = time.perf_counter()
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        token = _current.set(ex)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
            self._finish(scope, ex)

    def _finish(self, scope: Scope, ex: _Exchange) -> None:
        """After the response: metrics, then the log line. Never raises into the server."""
        finished = time.perf_counter()
        route = scope.get("route")
        endpoint = getattr(route, "path", None) or "unmatched"  # a template: bounded labels
        method = scope["method"] if scope["method"] in _METHODS else "other"
        out = None
        try:
            out = _outcome(ex)
            self.obs.observe(endpoint, method, ex, out, finished)
        except Exception:  # noqa: BLE001 - a metrics bug must not turn answers into errors
            log.exception("updating the metrics failed")
        path = scope["path"]
        level = logging.INFO
        if ex.status >= 500:
            level = logging.ERROR
        elif path in QUIET_PATHS and ex.status < 400:
            level = logging.DEBUG
        if access_log.isEnabledFor(level):
            fields = _log_fields(scope, ex, out, finished)
            access_log.log(level, "request", extra={"fields": fields})


def _request_id(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is a sane token, else 128 random bits in hex (as
    ``uuid4().hex`` looks, at a fifth of its cost)."""
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER:
            if _VALID_REQUEST_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return secrets.token_hex(16)


def _log_fields(
    scope: Scope, ex: _Exchange, out: _Outcome | None, finished: float
) -> dict[str, Any]:
    """The request log record: ids, outcome, sizes and versions; never the body. The keys are
    the same on every line (null where they do not apply), so log pipelines see one schema."""
    model = ex.model
    if model is None:  # not a rank request: the version served when it arrived, if any
        serving = getattr(getattr(scope.get("app"), "state", None), "serving", None)
        model = getattr(serving, "model", None)
    fields: dict[str, Any] = {
        "request_id": ex.request_id,
        "method": scope["method"],
        "path": scope["path"][:200],
        "status": ex.status,
        "latency_ms": round((finished - ex.started) * 1000, 3),
        "candidates": None,
        "model_version": None if model is None else model.version,
        "ranking_version": None if ex.formula is None else ex.formula.version,
        "variant": None if out is None else out.variant,
        "degraded": None,
        "user_known": None,
        "unknown_videos": None,
        "unknown_context": None,
        "stages_ms": None,
    }
    if out is not None:
        fields["candidates"] = out.candidates
        fields["degraded"] = out.degraded
        fields["user_known"] = out.user_known
        fields["unknown_videos"] = out.unknown_videos
        fields["unknown_context"] = list(out.unknown_context)
        fields["stages_ms"] = {k: round(v * 1000, 3) for k, v in out.stages.items()}
    return fields


# --- wiring -----------------------------------------------------------------------------------


async def _flush_every(obs: Observability, seconds: float) -> None:
    """Flushes the pending histogram counts of a worker that is not scraped itself (the other
    workers' scrapes read its files), so they are at most ``seconds`` late."""
    while True:
        await asyncio.sleep(seconds)
        try:
            obs.flush()
        except Exception:  # noqa: BLE001 - keep flushing; the error is logged
            log.exception("flushing the metrics failed")


def install_observability(app: FastAPI) -> Observability:
    """Adds the middleware (outermost of the app's own, so it counts what they reject),
    ``GET /metrics`` and the worker start/stop hooks to ``app``. Call it last in create_app."""
    obs = Observability(os.environ.get(MULTIPROC_ENV) or None)
    app.state.observability = obs
    app.add_middleware(ObservabilityMiddleware, observability=obs)

    async def metrics() -> Response:
        """Prometheus metrics (text format). Flushes on the event loop, where every metric is
        updated; renders in the threadpool, so reading the multiprocess files never holds up
        ranking."""
        serving = getattr(app.state, "serving", None)
        if serving is not None:
            obs.serving(serving.model, serving.formula)
        obs.flush()
        return Response(await run_in_threadpool(obs.render), media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)

    original = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: FastAPI) -> AsyncIterator[Any]:
        async with original(a) as state:
            obs.started()
            serving = getattr(a.state, "serving", None)
            if serving is not None:
                obs.serving(serving.model, serving.formula)
            del serving  # this frame waits at the yield: it must not keep the first model alive
            flusher = asyncio.create_task(_flush_every(obs, FLUSH_SECONDS))
            try:
                yield state
            finally:
                flusher.cancel()
                obs.flush()
                obs.stopped()

    app.router.lifespan_context = lifespan
    return obs


@contextmanager
def multiprocess_metrics(workers: int) -> Iterator[str | None]:
    """The multiprocess metrics directory for one ``ranker serve`` run, ready before the
    workers start.

    With ``PROMETHEUS_MULTIPROC_DIR`` set, that directory is used and its ``*.db`` files from an
    earlier run are removed first (prometheus-client requires a clean directory per run: old
    counters would be added to the new ones). Unset and ``workers > 1``: a temporary directory,
    removed on exit. Unset and one worker: ``None``, single-process metrics. Workers are
    spawned, fresh interpreters that inherit the environment, so setting the variable here is
    early enough even though this process has imported prometheus-client already.
    """
    path = os.environ.get(MULTIPROC_ENV) or None
    created = None
    if path is None and workers > 1:
        created = path = tempfile.mkdtemp(prefix="ranker-metrics-")
        os.environ[MULTIPROC_ENV] = path
    elif path is not None:
        Path(path).mkdir(parents=True, exist_ok=True)
        for stale in glob.glob(os.path.join(path, "*.db")):
            os.remove(stale)
    try:
        yield path
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
            os.environ.pop(MULTIPROC_ENV, None)
