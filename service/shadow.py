"""The shadow model: a second artifact scored on a sample of real requests, after they are answered.

Before a new model takes traffic (even a share of it, as a variant), the question is how
differently it would rank the same requests: a model that agrees with the served one on 99% of
its top 10 is a small change, one that reorders everything is an experiment to run with care.
Serving systems call this shadow (or mirrored, dark) traffic: TF Serving's and Seldon's
shadow deployments, Ray Serve's traffic mirroring. Here it is inside the replica: the shadow
scores the exact candidates and encoded features the served model used (so only the model
differs, not the feature fetch), and the agreement goes to ``/metrics``:

* ``ranker_shadow_spearman``: Spearman rank correlation of the two ranking scores over the
  request's candidates (the served score with the request's variant weights, the shadow's with
  the same weights when they fit its heads, else its artifact's own ranking);
* ``ranker_shadow_top10_overlap``: the share of the served top 10 in the shadow's top 10;
* ``ranker_shadow_head_mean_shift{head}``: the shadow's mean prediction minus the served one per
  request, for every head both have (a summary: its mean is the average shift).

What it must never do is touch serving. The endpoint offers a request to the shadow only after
the response has been sent (a Starlette background task), and the offer is a non-blocking put
into a small queue that one daemon thread drains; a full queue drops the request and counts it
(``ranker_shadow_requests_total{outcome="dropped"}``). Loading (in the same thread, after
start-up), a broken or incompatible artifact, a failing forward pass: each is caught, counted
and shown on ``/readyz`` (``shadow_state``, ``shadow_error``), and the replica serves on.

The shadow reads the served model's encoded features, so it must encode them the same way: the
same features, vocabularies and statistics (a model retrained on the same tables with another
architecture, weighting or seed does; one trained on new data generally does not, and is
refused as incompatible). It competes with serving for the CPU while it scores: keep
``RANKER_SHADOW_SAMPLE`` to what the replica's spare capacity allows.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary

from ranker.artifact import Artifact, load_artifact
from ranker.autoselect import score_agreement
from ranker.errors import ConfigError, RankerError
from ranker.predictor import Predictor, request_split
from ranker.scoring import RankingFormula
from ranker.variants import CONTROL
from service.engine import forward_rows, parameter_limit
from service.settings import Settings, default_threads

if TYPE_CHECKING:
    from ranker.features import Encoded
    from service.engine import Ranked, ServingModel
    from service.store import Lookup

log = logging.getLogger("ranker.service.shadow")

TOP_K = 10
# From 0: a negative correlation is as bad as none, and prometheus-client drops a histogram's
# _sum (so its mean) when a bucket bound is negative.
SPEARMAN_BUCKETS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 1.0)
OVERLAP_BUCKETS = tuple(i / 10 for i in range(11))


class ShadowMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.requests = Counter(
            "ranker_shadow_requests",
            "Requests offered to the shadow model by outcome: scored, dropped (its queue was "
            "full), failed (its forward pass or the comparison raised)",
            ["outcome"],
            registry=registry,
        )
        self.load_failures = Counter(
            "ranker_shadow_load_failures",
            "Shadow artifacts that failed to load or were refused (missing, corrupt, "
            "incompatible features)",
            registry=registry,
        )
        self.up = Gauge(
            "ranker_shadow_up",
            "1 while the shadow model is loaded and scoring, 0 otherwise",
            multiprocess_mode="livemin",
            registry=registry,
        )
        self.spearman = Histogram(
            "ranker_shadow_spearman",
            "Spearman rank correlation of the shadow's ranking scores with the served ones, "
            "per shadowed request",
            buckets=SPEARMAN_BUCKETS,
            registry=registry,
        )
        self.overlap = Histogram(
            f"ranker_shadow_top{TOP_K}_overlap",
            f"Share of the served top {TOP_K} that is in the shadow's top {TOP_K}, per request",
            buckets=OVERLAP_BUCKETS,
            registry=registry,
        )
        self.shift = Summary(
            "ranker_shadow_head_mean_shift",
            "Shadow minus served mean prediction over a request's candidates, per head (the "
            "summary's sum / count is the average shift)",
            ["head"],
            registry=registry,
        )
        self._outcomes = {o: self.requests.labels(o) for o in ("scored", "dropped", "failed")}

    def outcome(self, name: str) -> None:
        self._outcomes[name].inc()


@dataclass
class ShadowModel:
    """What :func:`service.engine.forward_rows` needs of a model: no store, no live state."""

    artifact: Artifact
    predictor: Predictor

    @property
    def version(self) -> str:
        return self.artifact.version


@dataclass
class _Job:
    lookup: Lookup
    context: Encoded
    scores: np.ndarray  # served, every candidate in request order
    predictions: dict[str, np.ndarray]
    formula: RankingFormula
    variant: str | None
    served: ServingModel


def _public(text: str, path: Path) -> str:
    """``text`` for ``/readyz``: the shadow's path as ``RANKER_SHADOW_ARTIFACT``, any other
    absolute path by its last component, as :meth:`service.reload.Reloader.public` does."""
    from service.reload import _ABSOLUTE_PATH

    for form in sorted({str(path), str(path.absolute()), str(path.resolve())}, key=len)[::-1]:
        text = text.replace(form, "RANKER_SHADOW_ARTIFACT")
    return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name or m.group(0), text)


def incompatibility(shadow: Artifact, served: Artifact) -> str | None:
    """Why the shadow cannot read the served model's encoded features; None when it can."""
    if shadow.encoder.to_json() != served.encoder.to_json():
        return (
            f"incompatible features: its feature encoding (features, vocabularies, statistics) "
            f"differs from the served model {served.version}'s"
        )
    if shadow.config.live is not None and shadow.config.live != served.config.live:
        return f"incompatible features: its live counters differ from the served model {served.version}'s"
    return None


def load_shadow(path: Path, settings: Settings) -> ShadowModel:
    """The shadow artifact on ``RANKER_BACKEND`` (eager when that is ``auto``: timing engines
    beside a serving replica would measure the replica), warmed on default features."""
    from service.reload import warm

    artifact = load_artifact(path, *parameter_limit(settings))
    backend = "eager" if settings.backend == "auto" else settings.backend
    split = request_split(artifact.model, artifact.encoder, artifact.config.live)
    predictor = Predictor(
        artifact.model, artifact.config.tasks, backend, default_threads(settings), split
    )
    model = ShadowModel(artifact, predictor)
    warm(model, RankingFormula(artifact.ranking, artifact.config.task_names))  # type: ignore[arg-type]
    return model


class Shadow:
    """The shadow of one app; see the module docstring. ``state``: off, loading, ready, failed."""

    def __init__(self, settings: Settings, registry: CollectorRegistry | None) -> None:
        self.settings = settings
        self.path = settings.shadow_artifact
        self.sample = settings.shadow_sample
        self.state = "off" if self.path is None else "loading"
        self.version: str | None = None
        self.error: str | None = None
        self.model: ShadowModel | None = None
        self.metrics = ShadowMetrics(registry) if self.path is not None else None
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=settings.shadow_queue)
        self._thread: threading.Thread | None = None
        self._fits: dict[str, str | None] = {}  # served model version -> incompatibility
        self._formulas: dict[tuple[str, str], RankingFormula] = {}
        self._random = random.Random()

    # --- on the event loop ----------------------------------------------------------------------

    def start(self, served: Callable[[], ServingModel]) -> None:
        """Loads the shadow in its own thread, which then scores what it is offered.
        ``served``: the model serving now (a function: the thread must not keep the first
        model alive past a reload)."""
        if self.path is None:
            return
        self._thread = threading.Thread(
            target=self._run, args=(self.path, served), name="shadow", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(queue.Full):  # full: a daemon thread ends with the process
            self._queue.put_nowait(None)
        self._thread.join(timeout=1.0)

    def sampled(self) -> bool:
        """Whether to offer this request: the shadow is ready and the coin says so."""
        return self.state == "ready" and self._random.random() < self.sample

    async def offer(self, ranked: Ranked, served: ServingModel, formula: RankingFormula) -> None:
        """Queues a request for the shadow without waiting: run as the response's background
        task, after the response has been sent. Full queue: dropped and counted."""
        if ranked.all_scores is None or ranked.all_predictions is None:
            return
        if ranked.context_row is None or ranked.lookup.degraded is not None:
            return  # default features because of a store fault: nothing worth comparing
        job = _Job(
            ranked.lookup,
            ranked.context_row,
            ranked.all_scores,
            ranked.all_predictions,
            formula,
            ranked.variant,
            served,
        )
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            assert self.metrics is not None
            self.metrics.outcome("dropped")

    # --- in the shadow's thread -----------------------------------------------------------------

    def _run(self, path: Path, serving: Callable[[], ServingModel]) -> None:
        assert self.metrics is not None
        try:
            model = load_shadow(path, self.settings)
            served = serving()
            problem = incompatibility(model.artifact, served.artifact)
            self._fits[served.version] = problem
            del served
            if problem is not None:
                raise ConfigError(f"shadow {model.version}: {problem}")
        except Exception as e:  # noqa: BLE001 - whatever breaks the shadow, serving goes on
            self._failed(path, e)
            return
        self.model, self.version = model, model.version
        self.state = "ready"
        self.metrics.up.set(1)
        log.info(
            "shadow model %s loaded from %s, scoring %.0f%% of requests",
            model.version,
            path,
            100 * self.sample,
        )
        while (job := self._queue.get()) is not None:
            try:
                self._score(job)
                self.metrics.outcome("scored")
            except Exception as e:  # noqa: BLE001 - counted and logged; serving is unaffected
                self.metrics.outcome("failed")
                if self.error != str(e):  # one log record per distinct failure
                    log.warning("shadow scoring failed: %s: %s", type(e).__name__, e)
                self.error = f"scoring failed: {type(e).__name__}: {e}"

    def _failed(self, path: Path, e: BaseException) -> None:
        assert self.metrics is not None
        what = str(e) if isinstance(e, RankerError) else f"{type(e).__name__}: {e}"
        log.error("shadow artifact %s: %s; serving goes on without a shadow", path, what)
        self.state, self.error = "failed", _public(what, path)
        self.metrics.load_failures.inc()
        self.metrics.up.set(0)

    def _formula(self, job: _Job) -> RankingFormula:
        """The request's weights when they fit the shadow's heads, else the shadow's own."""
        assert self.model is not None
        arm = job.variant or CONTROL
        key = (job.formula.version, arm)
        formula = self._formulas.get(key)
        if formula is None:
            tasks = self.model.artifact.config.task_names
            try:
                formula = RankingFormula(job.formula.config.arm(arm), tasks)
            except ConfigError:
                formula = RankingFormula(self.model.artifact.ranking, tasks)
            if len(self._formulas) > 64:
                self._formulas.clear()
            self._formulas[key] = formula
        return formula

    def _score(self, job: _Job) -> None:
        assert self.model is not None and self.metrics is not None
        served = job.served
        if served.version not in self._fits:  # the served model was reloaded
            self._fits[served.version] = incompatibility(self.model.artifact, served.artifact)
        problem = self._fits[served.version]
        if problem is not None:
            raise ConfigError(problem)
        preds = forward_rows(self.model, job.lookup, job.context)  # type: ignore[arg-type]
        scores = self._formula(job).score(preds)
        rho, overlap = score_agreement(job.scores, scores, TOP_K)
        self.metrics.spearman.observe(rho)
        self.metrics.overlap.observe(overlap)
        for head, values in preds.items():
            ref = job.predictions.get(head)
            if ref is not None:
                shift = float(np.mean(values, dtype=np.float64) - np.mean(ref, dtype=np.float64))
                self.metrics.shift.labels(head).observe(shift)

    def describe(self) -> dict[str, Any]:
        """The ``/readyz`` fields."""
        return {
            "shadow_state": self.state,
            "shadow_version": self.version,
            "shadow_error": self.error,
        }
