"""Overload: a bound on rank requests in flight, and a per-request deadline with a cheap fallback.

Without a bound, a worker offered more than it can rank queues the excess: every request waits
behind the ones before it on the forward thread, latency grows by one forward pass per queued
request, and past the clients' own timeouts the service spends its cores on answers nobody
reads. The standard remedy is admission control at the door (load shedding, as in Google's SRE
book ch. 21 "Handling Overload"; Netflix's concurrency-limits): refuse early and cheaply, so the
requests that are admitted stay fast and the client (or the load balancer) retries elsewhere.

* **In-flight bound** (``RANKER_MAX_IN_FLIGHT``): :class:`AdmissionMiddleware` counts the rank
  requests this worker is serving; one more than the bound gets an immediate 503 with
  ``Retry-After`` and a problem body, before its body is read. Nothing is queued. Probes,
  ``/metrics`` and ``/v1/events`` are never refused: a replica that sheds load must still look
  alive, and feedback events are cheap.
* **Deadline** (``X-Request-Deadline-Ms`` header, or ``RANKER_DEADLINE_MS``; the smaller wins):
  the time budget from the request's arrival at the worker. When ranking has not finished by
  then, :func:`rank_by_deadline` answers on time with the candidates in the request's own order
  (the order the candidate generator produced them, the only order known without the model),
  ``"degraded": true`` and a ``degraded_reason`` naming the deadline; the late ranking is
  cancelled (a forward pass not yet started never starts).

Both are counted in ``/metrics``: ``ranker_shed_requests_total``,
``ranker_deadline_fallbacks_total``, and ``ranker_rank_in_flight`` (docs/observability.md).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from prometheus_client import Counter, Gauge
from starlette.types import ASGIApp, Receive, Scope, Send

from service.respond import items_json, rank_response_json

if TYPE_CHECKING:
    from fastapi import FastAPI

    from service.engine import Ranked
    from service.settings import Settings

DEADLINE_HEADER = b"x-request-deadline-ms"
MAX_DEADLINE_MS = 60_000.0  # a longer budget is no deadline: a client bug, refused by name
# Where the middleware leaves the request's absolute deadline (time.perf_counter() seconds).
DEADLINE_KEY = "ranker.deadline"
# The header in the OpenAPI schema of POST /v1/rank (the middleware reads it, not FastAPI).
DEADLINE_PARAMETER = {
    "name": "X-Request-Deadline-Ms",
    "in": "header",
    "required": False,
    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_DEADLINE_MS},
    "description": "time budget from arrival, ms: past it the candidates come back in request "
    "order, degraded: true (RANKER_DEADLINE_MS, when set, caps it)",
}
ADMITTED_PATHS = frozenset({"/v1/rank"})  # what the bound applies to
RETRY_AFTER_S = 1  # Retry-After is whole seconds (RFC 9110 10.2.3); one is the smallest hint


class OverloadMetrics:
    """The counters, registered where the app's other metrics are (its registry, or the
    multiprocess files when that is ``None``)."""

    def __init__(self, registry: Any) -> None:
        self.shed = Counter(
            "ranker_shed_requests",
            "Rank requests refused with 503 because RANKER_MAX_IN_FLIGHT were in flight",
            registry=registry,
        )
        self.fallbacks = Counter(
            "ranker_deadline_fallbacks",
            "Rank requests answered in the request's order because ranking missed the deadline",
            registry=registry,
        )
        self.in_flight = Gauge(
            "ranker_rank_in_flight",
            "Rank requests this worker is serving now",
            multiprocess_mode="livesum",
            registry=registry,
        )


def _problem(status: int, detail: Any, extra: list[tuple[bytes, bytes]]) -> tuple[dict, dict]:
    body = orjson.dumps({"detail": detail})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *extra,
    ]
    return {"type": "http.response.start", "status": status, "headers": headers}, {
        "type": "http.response.body",
        "body": body,
    }


def parse_deadline_ms(raw: bytes) -> float:
    """The header's budget in ms; ``ValueError`` with the reason for anything but a finite
    number in (0, 60000]."""
    try:
        value = float(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        raise ValueError("must be a number of milliseconds") from None
    if not math.isfinite(value) or value <= 0 or value > MAX_DEADLINE_MS:
        raise ValueError(f"must be a number of milliseconds in (0, {MAX_DEADLINE_MS:.0f}]")
    return value


class AdmissionMiddleware:
    """Pure ASGI: the in-flight bound and the deadline header of ``POST /v1/rank``.

    Installed inside the observability middleware, so a 503 or a 422 from here is counted in
    ``ranker_requests_total`` and logged like any answer. The count is a plain integer: the
    event loop runs one coroutine at a time, so no lock is needed."""

    def __init__(self, app: ASGIApp, owner: FastAPI, settings: Settings) -> None:
        self.app = app
        # An answer from here comes before routing: the route is named for the request metrics
        # (``ranker_requests_total{endpoint="/v1/rank"}``, not "unmatched").
        self.routes = {
            r.path: r for r in owner.routes if getattr(r, "path", None) in ADMITTED_PATHS
        }
        self.max_in_flight = settings.max_in_flight
        self.default_deadline_ms = settings.deadline_ms
        self.in_flight = 0
        obs = owner.state.observability  # installed before the stack is built (first call)
        self.metrics = OverloadMetrics(obs.registry)
        owner.state.overload = self.metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in ADMITTED_PATHS:
            await self.app(scope, receive, send)
            return
        arrived = time.perf_counter()
        scope.setdefault("route", self.routes.get(scope["path"]))
        budget_ms = self.default_deadline_ms
        for name, value in scope["headers"]:
            if name == DEADLINE_HEADER:
                try:
                    header_ms = parse_deadline_ms(value)
                except ValueError as e:
                    loc = ["header", DEADLINE_HEADER.decode()]
                    start, body = _problem(422, [{"loc": loc, "msg": str(e)}], [])
                    await send(start)
                    await send(body)
                    return
                budget_ms = header_ms if budget_ms is None else min(budget_ms, header_ms)
                break
        if self.max_in_flight and self.in_flight >= self.max_in_flight:
            self.metrics.shed.inc()
            detail = (
                f"overloaded: {self.in_flight} rank requests in flight on this worker "
                f"(RANKER_MAX_IN_FLIGHT={self.max_in_flight}); retry after {RETRY_AFTER_S} s"
            )
            retry = [(b"retry-after", str(RETRY_AFTER_S).encode())]
            start, body = _problem(503, detail, retry)
            await send(start)
            await send(body)
            return
        if budget_ms is not None:
            scope[DEADLINE_KEY] = (arrived + budget_ms / 1000.0, budget_ms)
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()


def install_overload(app: FastAPI, settings: Settings) -> None:
    """Adds :class:`AdmissionMiddleware`; call it after the app's own middleware and before
    ``install_observability`` (which must stay outermost, to count the 503s)."""
    app.add_middleware(AdmissionMiddleware, owner=app, settings=settings)


async def rank_by_deadline(scope: Scope, ranking: Awaitable[Ranked]) -> Ranked | str:
    """``ranking``'s result, or, when the request carries a deadline that passes first, the
    reason to answer degraded (``"deadline: ... ms passed before ranking finished"``); the
    unfinished ranking is cancelled. Without a deadline: just ``await ranking``."""
    deadline = scope.get(DEADLINE_KEY)
    if deadline is None:
        return await ranking
    at, budget_ms = deadline
    task = asyncio.ensure_future(ranking)
    done, _ = await asyncio.wait({task}, timeout=max(0.0, at - time.perf_counter()))
    if task in done:
        return task.result()
    task.cancel()
    # The result (or the cancellation) is never read: say so, or asyncio logs an error for it.
    task.add_done_callback(lambda t: t.cancelled() or t.exception())
    return f"deadline: {budget_ms:g} ms passed before ranking finished; candidates in request order"


def fallback_json(
    video_ids: np.ndarray,
    top_k: int | None,
    header: dict[str, object],
    reason: str,
) -> bytes:
    """The degraded answer: the first ``top_k`` candidates in the request's order, with no
    score and no predictions (``null`` and ``{}``: nothing was computed), ``degraded: true``
    and ``reason``. ``header``: the response fields the endpoint knows without ranking."""
    ids = video_ids if top_k is None else video_ids[:top_k]
    fields = header | {
        "user_known": None,
        "unknown_videos": 0,
        "unknown_context": [],
        "degraded": True,
        "degraded_reason": reason,
    }
    return rank_response_json(fields, items_json(ids, np.full(len(ids), np.nan), {}))
