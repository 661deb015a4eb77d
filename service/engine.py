"""The ranking engine, free of HTTP: a loaded model with its feature store and ranking formula.

``ServingModel`` bundles everything that must change together when a new artifact is loaded (the
model, its encoder, the store encoded with that encoder); the service swaps whole bundles, so a
request in flight finishes on the bundle it started with.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from ranker.artifact import Artifact, load_artifact
from ranker.autoselect import auto_predictor
from ranker.errors import RequestError
from ranker.features import Encoded, FeatureEncoder
from ranker.history import encode_history
from ranker.predictor import Predictor, request_split
from ranker.scoring import RankingFormula, load_ranking_config
from service.live_state import LiveState
from service.settings import Settings, default_threads
from service.store import FeatureStore, InProcessStore, Lookup

ContextValue = str | int | float | None


def make_predictor(artifact: Artifact, settings: Settings) -> Predictor:
    """The artifact's model on the configured scoring backend (``RANKER_BACKEND``), built here
    so that start-up and reload cannot serve on different backends. Each forward pass is one
    request's candidates, so the user's and context's share of the first layer is computed once
    (:func:`~ranker.predictor.request_split`).

    ``auto`` times the engines this CPU can run on the artifact's sample requests and serves the
    fastest that passes the artifact's accuracy guard against fp32 (:mod:`ranker.autoselect`);
    the predictor's ``selection`` says what was measured. The guard scores the ranking with the
    formula the service serves (``RANKER_RANKING_CONFIG``, else the artifact's own)."""
    a = artifact
    split = request_split(a.model, a.encoder, a.config.live)
    threads = default_threads(settings)
    if settings.backend != "auto":
        return Predictor(a.model, a.config.tasks, settings.backend, threads, split)
    formula = artifact_formula(settings.ranking_config, a)
    predictor, selection = auto_predictor(
        a.model, a.config.tasks, split, a.samples, formula.score, a.config.export.guard, threads
    )
    predictor.selection = selection
    return predictor


def engine_line(predictor: Predictor) -> str:
    """How the scoring engine was chosen, for the start-up and reload log lines."""
    if predictor.selection is None:
        return f"scoring engine {predictor.backend} (RANKER_BACKEND)"
    return f"RANKER_BACKEND=auto chose {predictor.selection.summary()}"


CONTEXT_CACHE_ENTRIES = 4096


@dataclass
class ServingModel:
    artifact: Artifact
    predictor: Predictor
    store: FeatureStore
    # Encoded request contexts: a handful of distinct values (device x hour) repeat on every
    # request, and encoding one through Arrow costs ~0.3 ms. Keyed with each value's type, as
    # 1, 1.0 and True encode differently for a string vocabulary.
    _contexts: dict[tuple, tuple[Encoded, tuple[str, ...]]] = field(
        default_factory=dict, repr=False
    )
    live: LiveState | None = None  # live counters' state, for a model with [live] counters

    def context(self, context: dict[str, ContextValue]) -> tuple[Encoded, tuple[str, ...]]:
        """The encoded context row and the features whose given value the model does not know
        (:func:`unknown_context`), from the cache when this exact context was seen."""
        key = tuple((k, type(v), v) for k, v in sorted(context.items()))
        hit = self._contexts.get(key)
        if hit is None:
            enc = self.artifact.encoder
            row = encode_context(enc, context)  # raises on a bad value
            hit = (row, unknown_context(enc, context, row))
            if len(self._contexts) >= CONTEXT_CACHE_ENTRIES:
                self._contexts.clear()
            self._contexts[key] = hit
        return hit

    @property
    def version(self) -> str:
        return self.artifact.version

    @classmethod
    def load(cls, settings: Settings, store: FeatureStore | None = None) -> ServingModel:
        artifact = load_artifact(settings.artifact, *parameter_limit(settings))
        if store is None and settings.redis_url is not None:
            from service.redis_store import RedisStore

            store = RedisStore.from_settings(settings, artifact.encoder)
        if store is None:
            store = InProcessStore.from_tables(
                artifact.config, artifact.encoder, settings.users, settings.videos
            )
        live = live_state(artifact, None, store, settings)
        return cls(artifact, make_predictor(artifact, settings), store, live=live)


def live_state(
    artifact: Artifact,
    current: LiveState | None = None,
    store: FeatureStore | None = None,
    settings: Settings | None = None,
) -> LiveState | None:
    """The live counters' state a model needs: ``current`` when it counts the same things (a
    reload keeps the events received so far), else built from the training log; ``None`` for
    a model without ``[live]``. With the Redis feature store the state is Redis's, shared by
    every worker and replica (``service/redis_live.py``)."""
    config = artifact.config
    if config.live is None:
        return None
    if store is not None and store.name == "redis":
        from service.redis_live import RedisLiveState

        params = artifact.encoder.live
        if settings is None:
            return RedisLiveState(config, params, store)  # type: ignore[arg-type]
        return RedisLiveState(  # type: ignore[arg-type]
            config, params, store, settings.live_state_ttl_s, settings.live_event_id_ttl_s
        )
    if current is not None and current.config.live == config.live:
        current.params = artifact.encoder.live  # the new model's priors and statistics
        return current
    return LiveState(config, artifact.encoder.live, [Path(config.data.log)])


def parameter_limit(settings: Settings) -> tuple[int, str]:
    """``load_artifact``'s size limit and the setting that names it in a refusal."""
    return settings.max_model_parameters, "RANKER_MAX_MODEL_PARAMETERS"


def load_formula(path: Path, tasks: list[str]) -> RankingFormula:
    return RankingFormula(load_ranking_config(path), tasks)


def serving_formula(path: Path | None, model: ServingModel) -> RankingFormula:
    """The file at ``path`` (``RANKER_RANKING_CONFIG``) when set, else the artifact's own."""
    return artifact_formula(path, model.artifact)


def artifact_formula(path: Path | None, artifact: Artifact) -> RankingFormula:
    """:func:`serving_formula` for an artifact not yet bundled into a :class:`ServingModel`."""
    tasks = artifact.config.task_names
    if path is None:
        return RankingFormula(artifact.ranking, tasks)
    return load_formula(path, tasks)


def encode_context(encoder: FeatureEncoder, context: dict[str, ContextValue]) -> Encoded:
    """One encoded row ``(1, ...)`` from the request's context; absent keys get the defaults."""
    specs = encoder.of("context")
    known = {f.name for f in specs}
    unknown = sorted(set(context) - known)
    if unknown:
        raise RequestError(f"context.{unknown[0]}: unknown context feature; known: {sorted(known)}")
    columns: dict[str, pa.Array] = {}
    for f in specs:
        value = context.get(f.name, f.serving_default)
        if f.kind == "numeric":
            if value is not None and (isinstance(value, str) or not np.isfinite(float(value))):
                raise RequestError(f"context.{f.name}: must be a finite number")
            columns[f.source_column] = pa.array([value], type=pa.float64())
        else:
            vocab = encoder.vocabs[f.name]
            if value is None:
                columns[f.source_column] = pa.array(
                    [None], type=pa.int64() if vocab.is_int else pa.string()
                )
            elif vocab.is_int:
                # finite and within int64 first: int(nan) and 2**64 would be 500s, not 422s
                whole = not isinstance(value, str) and bool(np.isfinite(float(value)))
                if not (whole and float(value) == int(value) and -(2**63) <= int(value) < 2**63):
                    raise RequestError(f"context.{f.name}: must be an integer within int64")
                columns[f.source_column] = pa.array([int(value)], type=pa.int64())
            else:
                columns[f.source_column] = pa.array([str(value)], type=pa.string())
    return encoder.encode(pa.table(columns), "context", "request")


def unknown_context(
    encoder: FeatureEncoder, context: dict[str, ContextValue], row: Encoded
) -> tuple[str, ...]:
    """The categorical context features the request gave a value for that encode as the
    unknown bucket (code 0: never seen in training, or too rare): the model ranks them exactly
    as if the request had left them out, so the response names them (as it names unknown
    users and videos) instead of answering silently."""
    names = []
    col = 0
    for f in encoder.of("context", "categorical"):
        codes = row.cat[0, col : col + f.width]
        col += f.width
        if context.get(f.name) is not None and not codes.any():
            names.append(f.name)
    return tuple(names)


@dataclass
class Ranked:
    video_ids: np.ndarray  # (k,) in ranked order
    scores: np.ndarray  # (k,)
    predictions: dict[str, np.ndarray]  # task -> (k,)
    lookup: Lookup
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    started: float = 0.0  # perf_counter() at the start: observability times what came before
    all_scores: np.ndarray | None = None  # (n,) every candidate, request order (for metrics)
    all_predictions: dict[str, np.ndarray] | None = None  # task -> (n,), request order
    unknown_context: tuple[str, ...] = ()  # context features given a value the model lacks
    variant: str | None = None  # the ranking config's variant scored with (None: none declared)
    context_row: Encoded | None = None  # the encoded context, for the shadow model


def forward_rows(model: ServingModel, lookup: Lookup, context: Encoded) -> dict[str, np.ndarray]:
    """One forward pass over all candidates: user and context rows broadcast to every video."""
    n = len(lookup.videos)
    parts = [
        lookup.user.take(np.zeros(n, np.int64)),
        lookup.videos,
        context.take(np.zeros(n, np.int64)),
    ]
    live = model.artifact.config.live
    if live is not None:
        num = lookup.live if lookup.live is not None else np.zeros((n, live.width), np.float32)
        parts.append(Encoded(np.zeros((n, 0), np.int64), num))
        if live.history is not None:  # the user's history codes, the same on every row
            hist = lookup.history
            if hist is None:  # no state (a store fault): the empty history
                hist = np.zeros((1, live.history.length), np.int64)
            parts.append(Encoded(np.repeat(hist, n, axis=0), np.zeros((n, 0), np.float32)))
    rows = Encoded.concat_columns(parts)
    return model.predictor.predict(rows)


def score_rows(
    model: ServingModel, formula: RankingFormula, lookup: Lookup, context: Encoded
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Every candidate's score and head predictions: the forward pass, then the formula."""
    preds = forward_rows(model, lookup, context)
    return formula.score(preds), preds


_FORWARD: ThreadPoolExecutor | None = None


def _forward_executor() -> ThreadPoolExecutor:
    """The process's one forward thread (created on first use, lives as long as the process).

    One thread, so forward passes run one at a time, as on the event loop, and a worker never
    computes with more than ``RANKER_THREADS`` intra-op threads at once; what changes is that
    the event loop is free meanwhile: torch and ONNX Runtime release the GIL inside their
    kernels, so other requests' body reads, Redis round trips and responses proceed while a
    forward pass runs instead of queueing behind it (at c=8 the features stage grew to 13-19 ms
    waiting for the loop, docs/performance.md)."""
    global _FORWARD
    if _FORWARD is None:
        _FORWARD = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
    return _FORWARD


async def rank(
    model: ServingModel,
    formula: RankingFormula,
    user_id: int,
    context: dict[str, ContextValue],
    video_ids: np.ndarray,
    top_k: int | None,
    forward_thread: bool = False,
    now: float | None = None,
    variant: str | None = None,
) -> Ranked:
    """Scores every candidate and returns them best first (ties keep the request's order).
    ``forward_thread``: the forward pass runs on the process's forward thread
    (:func:`_forward_executor`) while the event loop serves other requests. ``now``: the
    request's time in the log's unit, for live counters (default: the clock). ``variant``:
    which of the formula's variants scores (:meth:`RankingFormula.assign`; None: the base)."""
    t0 = time.perf_counter()
    ctx, unknown = model.context(context)
    if getattr(model.live, "remote", False):  # counters in Redis: read in the features' MGET
        counters = model.live.request(user_id, video_ids, context, now)  # type: ignore[union-attr]
        lookup = await model.store.lookup(user_id, video_ids, counters)  # type: ignore[call-arg]
        if counters.recent is not None:  # decoded from the MGET (None when degraded)
            a = model.artifact
            lookup.history = encode_history(a.config, a.encoder, counters.recent)
            lookup.user_has_history = bool(counters.recent.ok.any())
    else:
        lookup = await model.store.lookup(user_id, video_ids)
    if model.live is not None and not getattr(model.live, "remote", False):
        lookup.live, lookup.user_has_state = model.live.features(user_id, video_ids, context, now)
        recent = model.live.recent(user_id)
        if recent is not None:
            a = model.artifact
            lookup.history = encode_history(a.config, a.encoder, recent)
            lookup.user_has_history = bool(recent.ok.any())
    t1 = time.perf_counter()
    if forward_thread:
        loop = asyncio.get_running_loop()
        preds = await loop.run_in_executor(_forward_executor(), forward_rows, model, lookup, ctx)
    else:
        preds = forward_rows(model, lookup, ctx)
    t2 = time.perf_counter()
    scores = formula.score(preds, variant)
    order = np.argsort(-scores, kind="stable")
    if top_k is not None:
        order = order[:top_k]
    top = {k: v[order] for k, v in preds.items()}
    t3 = time.perf_counter()
    return Ranked(
        video_ids[order],
        scores[order],
        top,
        lookup,
        {"features": t1 - t0, "forward": t2 - t1, "combine": t3 - t2},
        started=t0,
        all_scores=scores,
        all_predictions=preds,
        unknown_context=unknown,
        variant=variant,
        context_row=ctx,
    )
