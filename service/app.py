"""The FastAPI application: ``create_app()`` builds it, the lifespan loads the model and store.

Nothing is loaded at import time, so tests build apps with their own settings.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

import numpy as np
import torch
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

import ranker
from ranker.allocator import apply_glibc_malloc
from ranker.errors import ArtifactError, ConfigError, RankerError, RequestError
from service.decode import RankInput, decode_events_request, decode_rank_request
from service.docs_page import install_docs
from service.engine import engine_line, rank
from service.exposure_log import LogCounters, Rotation, ServiceLogs
from service.limits import BodyLimitMiddleware, check_rank_limits
from service.live_state import EventBatch
from service.observability import current_request_id, install_observability, note_ranked
from service.overload import (
    DEADLINE_PARAMETER,
    fallback_json,
    install_overload,
    rank_by_deadline,
)
from service.reload import Reloader, install_admin
from service.respond import items_json, rank_response_json
from service.schemas import (
    EventsRequest,
    EventsResponse,
    Health,
    Problem,
    RankRequest,
    RankResponse,
    Readiness,
    ValidationProblem,
)
from service.settings import Settings, default_threads
from service.shadow import Shadow
from service.state import ServingState, load_serving_state

log = logging.getLogger("ranker.service")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that disconnected first


async def serving_state(request: Request) -> ServingState:
    """The state current when the request arrived; the request keeps it to the end. Async on
    purpose: FastAPI runs a plain ``def`` dependency in its thread pool, a hand-off that cost
    0.5-2 ms per request here."""
    return request.app.state.serving


State = Annotated[ServingState, Depends(serving_state)]


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema plus ``RankRequest`` and its parts under ``components.schemas``: the rank
    endpoint reads its body raw (fast decoding), so FastAPI does not collect the model itself."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
            openapi_version=app.openapi_version,
            separate_input_output_schemas=app.separate_input_output_schemas,
        )
        request = RankRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        parts = request.pop("$defs", {})
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(parts)
        components["RankRequest"] = request
        events = EventsRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(events.pop("$defs", {}))
        components["EventsRequest"] = events
        app.openapi_schema = schema
    return app.openapi_schema


def _loc(field: str) -> list[str | int]:
    """A dotted field path as a pydantic ``loc``: list indices as integers (``events.3.type``)."""
    return [int(p) if p.isdigit() else p for p in field.split(".")]


def _service_logs(app: FastAPI, settings: Settings) -> ServiceLogs | None:
    """The exposure and event logs when ``RANKER_EXPOSURE_DIR`` is set, counting into the app's
    metrics."""
    if settings.exposure_dir is None:
        return None
    obs = app.state.observability
    return ServiceLogs(
        settings.exposure_dir,
        Rotation(
            settings.exposure_rotate_rows,
            settings.exposure_rotate_bytes,
            settings.exposure_rotate_s,
        ),
        settings.exposure_queue_size,
        settings.exposure_event_ids,
        LogCounters(
            obs.exposure_dropped.labels,
            obs.exposure_written.labels,
            obs.exposure_failed.labels,
        ),
    )


def _log_exposure(
    logs: ServiceLogs,
    body: RankInput,
    state: ServingState,
    video_ids: np.ndarray,
    scores: np.ndarray,
    predictions: dict[str, np.ndarray],
    degraded: bool,
    variant: str | None = None,
) -> None:
    """Queues what one response showed for the exposure log (a ``put``, never a wait)."""
    logs.exposed(
        current_request_id() or secrets.token_hex(16),
        body.time
        if body.time is not None
        else time.time() / state.model.artifact.config.data.time_unit_s,
        body.user_id,
        body.context,
        video_ids,
        scores,
        predictions,
        state.model.version,
        state.formula.version,
        degraded,
        variant=variant,
    )


def create_app(settings: Settings | None = None, preloaded: ServingState | None = None) -> FastAPI:
    """The app for ``settings``. ``preloaded``: the model and formula ``ranker serve`` loaded
    before starting uvicorn (so that a start-up error is one line, not a traceback from inside
    the server); None: the lifespan loads them."""
    settings = settings or Settings()
    # A list emptied at start-up: the closure must not keep the first model alive past reloads.
    handed_over = [preloaded] if preloaded is not None else []
    del preloaded

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        torch.set_num_threads(default_threads(settings))  # one per worker unless set
        apply_glibc_malloc(settings.glibc_malloc)  # no page faults per request (allocator.py)
        first = handed_over.pop() if handed_over else load_serving_state(settings)
        model, formula = first.model, first.formula
        app.state.serving = first
        del first
        log.info(
            "serving model %s from %s; position: %s; %s",
            model.version,
            model.artifact.path,
            model.artifact.manifest.get("position", {}).get("at_serving", "unknown"),
            engine_line(model.predictor),
        )
        ok, detail = await model.store.ready()  # warms the store; a fault only degrades
        (log.info if ok else log.warning)("feature store %s: %s", model.store.name, detail)
        if model.live is not None:
            if getattr(model.live, "remote", False):
                log.info("%s", model.live.describe())
            else:
                log.info("%s, built from %s", model.live.describe(), model.artifact.config.data.log)
        # Start-up objects live as long as the process: keep them out of the collector's scans,
        # which otherwise cause multi-millisecond pauses on the request path.
        gc.collect()
        gc.freeze()
        app.state.reloader = Reloader(app, settings)  # polls when reload_interval_s > 0
        app.state.reloader.start()
        app.state.service_logs = _service_logs(app, settings)
        # Loads in its own thread once serving; never in the way (service/shadow.py).
        app.state.shadow = Shadow(settings, app.state.observability.registry)
        app.state.shadow.start(lambda: app.state.serving.model)
        # The state holds them; this frame stays suspended at the yield and must not, or the
        # first model would outlive every reload.
        del model, formula
        yield
        await app.state.reloader.stop()
        app.state.shadow.stop()
        if app.state.service_logs is not None:  # after the drain: every answered request is in
            await asyncio.to_thread(app.state.service_logs.close)
        await app.state.serving.model.store.close()  # a Redis pool is shared by every reload

    app = FastAPI(
        title="ranker",
        version=ranker.__version__,
        description="Ranks candidate videos by a weighted combination of MMoE head predictions.",
        lifespan=lifespan,
        docs_url=None,  # install_docs: the same pages, with a note for when the CDN is away
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.degraded_responses = 0  # responses ranked on defaults because of a store fault
    app.state.service_logs = None  # the exposure and event logs (RANKER_EXPOSURE_DIR)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        field, _, msg = str(exc).partition(": ")
        return JSONResponse(
            status_code=422,
            content={"detail": [{"loc": ["body", *_loc(field)], "msg": msg}]},
        )

    @app.exception_handler(RankerError)
    async def _ranker_error(_: Request, exc: RankerError) -> JSONResponse:
        status = 503 if isinstance(exc, ArtifactError | ConfigError) else 500
        return JSONResponse(status_code=status, content={"detail": str(exc)})

    @app.exception_handler(ClientDisconnect)
    async def _client_disconnect(_: Request, __: ClientDisconnect) -> Response:
        """The client went away before its body arrived: nobody reads the answer, and it is no
        server error. 499 (nginx's "client closed request") is what the request log and
        ``ranker_requests_total`` then record, instead of a 500 with a traceback."""
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse(status_code=422, content={"detail": errors})

    @app.post(
        "/v1/rank",
        response_model=RankResponse,
        response_class=Response,  # bytes from service/respond.py; the model documents them
        # The body is read raw and decoded by service/decode.py (msgspec, pydantic for errors);
        # the schema is still RankRequest's, documented here and in components (_openapi).
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/RankRequest"}}
                },
            },
            "parameters": [DEADLINE_PARAMETER],
        },
        responses={
            400: {"model": Problem, "description": "a body that is not text (not UTF-8)"},
            413: {"model": Problem, "description": "body over RANKER_MAX_BODY_BYTES"},
            422: {"model": ValidationProblem, "description": "a field is wrong; loc names it"},
            503: {"model": Problem, "description": "RANKER_MAX_IN_FLIGHT reached; Retry-After"},
        },
    )
    async def rank_endpoint(request: Request, state: State) -> Response:
        """Ranks the candidates for the user; best first, with every head's prediction."""
        body = decode_rank_request(await request.body(), request.headers.get("content-type"))
        ids = body.video_ids
        check_rank_limits(len(ids), body.top_k, settings.max_candidates)
        uniq, counts = np.unique(ids, return_counts=True)
        if len(uniq) != len(ids):
            raise RequestError(f"candidates: duplicate video_id {int(uniq[counts > 1][0])}")
        variant = state.formula.assign(body.user_id)  # None: the config declares no variants
        r = await rank_by_deadline(
            request.scope,
            rank(
                state.model,
                state.formula,
                body.user_id,
                body.context,
                ids,
                body.top_k,
                settings.forward_thread,
                body.time,
                variant,
            ),
        )
        if isinstance(r, str):  # the deadline passed first: answer now, unranked
            request.app.state.overload.fallbacks.inc()
            versions = {
                "model_version": state.model.version,
                "ranking_version": state.formula.version,
                "variant": variant,
            }
            content = fallback_json(ids, body.top_k, versions, r)
            if app.state.service_logs is not None:  # shown too: request order, no scores
                shown = ids if body.top_k is None else ids[: body.top_k]
                nan = np.full(len(shown), np.nan, np.float32)
                _log_exposure(
                    app.state.service_logs, body, state, shown, nan, {}, True, variant=variant
                )
            return Response(content, media_type="application/json")
        note_ranked(r, state.model, state.formula)  # metrics and the log line, after the reply
        if r.lookup.degraded is not None:
            app.state.degraded_responses += 1
        header = {
            "model_version": state.model.version,
            "ranking_version": state.formula.version,
            "user_known": not r.lookup.user_missing,
            "unknown_videos": int(r.lookup.videos_missing.sum()),
            "unknown_context": list(r.unknown_context),
            "degraded": r.lookup.degraded is not None,
            "degraded_reason": r.lookup.degraded,
            "variant": variant,
        }
        if state.model.live is not None:
            header["user_has_state"] = r.lookup.user_has_state
            if state.model.artifact.config.live.history is not None:  # type: ignore[union-attr]
                header["user_has_history"] = r.lookup.user_has_history
        items = items_json(r.video_ids, r.scores, r.predictions)
        if app.state.service_logs is not None:
            _log_exposure(
                app.state.service_logs,
                body,
                state,
                r.video_ids,
                r.scores,
                r.predictions,
                header["degraded"],
                variant=variant,
            )
        shadow: Shadow | None = getattr(app.state, "shadow", None)
        after = None  # the shadow is offered the request once the response has been sent
        if shadow is not None and shadow.sampled():
            after = BackgroundTask(shadow.offer, r, state.model, state.formula)
        payload = rank_response_json(header, items)
        return Response(payload, media_type="application/json", background=after)

    @app.post(
        "/v1/events",
        response_model=EventsResponse,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/EventsRequest"}}
                },
            }
        },
        responses={
            400: {"model": Problem, "description": "a body that is not text (not UTF-8)"},
            404: {
                "model": Problem,
                "description": "the served model has no live counters and no event log is "
                "written (RANKER_EXPOSURE_DIR)",
            },
            503: {"model": Problem, "description": "Redis did not take the events; retry"},
            413: {"model": Problem, "description": "body over RANKER_MAX_BODY_BYTES"},
            422: {"model": ValidationProblem, "description": "a field is wrong; loc names it"},
        },
    )
    async def events_endpoint(request: Request, state: State) -> EventsResponse:
        """Feedback events (impressions, clicks, likes, watch seconds, ...) that update the live
        counters and go to the event log (RANKER_EXPOSURE_DIR); an event id seen before is
        ignored, so a retried batch counts once (without live counters: within the last
        RANKER_EXPOSURE_EVENT_IDS events this worker accepted)."""
        raw = await request.body()
        body = decode_events_request(raw, request.headers.get("content-type"))
        logs: ServiceLogs | None = app.state.service_logs
        live = state.model.live
        if live is None and logs is None:
            raise HTTPException(
                404,
                "the served model has no live counters ([live] in its config) and the event log "
                "is off (RANKER_EXPOSURE_DIR)",
            )
        ev = body.events
        batch = EventBatch(
            ids=[e.event_id for e in ev],
            users=np.fromiter((e.user_id for e in ev), np.int64, len(ev)),
            videos=np.fromiter((e.video_id for e in ev), np.int64, len(ev)),
            types=[e.type for e in ev],
            times=np.fromiter((e.time for e in ev), np.float64, len(ev)),
            values=np.fromiter((e.value for e in ev), np.float64, len(ev)),
            contexts=[e.context for e in ev],
        )
        request_ids = [e.request_id for e in ev]
        if live is None:
            assert logs is not None
            fresh = logs.recent_ids.fresh(batch.ids)
        elif getattr(live, "remote", False):  # counters in Redis (service/redis_live.py)
            from service.redis_live import CountersUnavailable

            try:
                fresh = await live.ingest_fresh_async(batch)  # type: ignore[attr-defined]
            except CountersUnavailable as e:
                if logs is not None and e.fresh is not None:  # counted: a retry is a duplicate
                    logs.log_events(batch, request_ids, e.fresh)
                raise HTTPException(503, str(e)) from None
        else:
            fresh = live.ingest_fresh(batch)
        if logs is not None:
            logs.log_events(batch, request_ids, fresh)
        accepted = int(fresh.sum())
        return EventsResponse(accepted=accepted, duplicates=len(ev) - accepted)

    @app.get("/healthz", response_model=Health)
    async def healthz() -> Health:
        """Liveness: the process answers."""
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "no model loaded yet"}},
    )
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: a model is loaded. The feature store's state is reported (``store_ok``,
        ``detail``, ``degraded_responses``, and ``degraded`` with its reason while the store
        fails) but does not make the replica unready: every replica shares the store, so
        failing readiness on a store fault would turn degraded answers into no answers at all."""
        state: ServingState | None = getattr(request.app.state, "serving", None)
        if state is None:
            body = Readiness(ready=False, model_version=None, ranking_version=None, store="none")
            return JSONResponse(status_code=503, content=body.model_dump())
        ok, detail = await state.model.store.ready()
        body = Readiness(
            ready=True,
            model_version=state.model.version,
            ranking_version=state.formula.version,
            store=state.model.store.name,
            store_ok=ok,
            degraded_responses=request.app.state.degraded_responses,
            detail=detail,
            degraded=not ok,
            degraded_reason=None if ok else f"feature store: {detail}; ranking on default features",
            position=state.model.artifact.manifest.get("position", {}).get("at_serving"),
            engine=state.model.predictor.backend,
            engine_ms=sel.ms if (sel := state.model.predictor.selection) is not None else None,
            engine_selection=sel.as_json() if sel is not None else None,
            variants=list(state.formula.variant_names),
        )
        shadow: Shadow | None = getattr(request.app.state, "shadow", None)
        if shadow is not None:
            body = body.model_copy(update=shadow.describe())
        reloader: Reloader | None = getattr(request.app.state, "reloader", None)
        if reloader is not None:
            body.reloads = reloader.reloads
            body.last_reload_error = reloader.last_error
            body.pinned_version = reloader.pinned.name if reloader.pinned else None
        return JSONResponse(status_code=200, content=body.model_dump())

    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    install_docs(app)
    install_admin(app, settings)  # /admin/* only with RANKER_ADMIN_TOKEN
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    install_overload(app, settings)  # in-flight bound, deadlines: service/overload.py
    install_observability(app)  # last: its middleware is the outermost, /metrics is added
    return app
