"""Decoding ``POST /v1/rank`` bodies: msgspec on the raw bytes, pydantic to explain a refusal.

FastAPI's default path for a body parameter (``json.loads``, then pydantic building one model
per candidate) costs about 0.7 ms for 500 candidates here; msgspec decodes and checks the same
body into typed structs in about 0.05 ms (``bench/serve.py`` shows the stage). Correct requests
take only that path.

Anything msgspec refuses, and the few values it lets through that the API refuses (a context
number outside int64 or not finite), goes through exactly the validation FastAPI would run,
:class:`service.schemas.RankRequest`, so what is accepted and every error message and ``loc``
stay those of the documented schema: msgspec is the fast path, never the definition. Ids and
``top_k`` are strict integers on both paths (``true``, ``"7"`` and ``7.0`` are 422s); a context
value msgspec is stricter about than pydantic's lax mode is then accepted by the pydantic pass.

Two things JSON allows that the service cannot use are refused on the slow path, naming where
they are: strings holding a lone UTF-16 surrogate (``"\ud800"``: Python's ``json`` decodes it,
msgspec does not, and it cannot be encoded as UTF-8 later, for Arrow or for a response), and
nesting deeper than Python's recursion limit (``json`` raises ``RecursionError``).
"""

from __future__ import annotations

import email.message
import json
import math
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from service.schemas import ContextValue, EventsRequest, RankRequest

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_Int64 = Annotated[int, msgspec.Meta(ge=_INT64_MIN, le=_INT64_MAX)]


class _Candidate(msgspec.Struct, forbid_unknown_fields=True):
    video_id: _Int64


class _Request(msgspec.Struct, forbid_unknown_fields=True):
    user_id: _Int64
    candidates: Annotated[list[_Candidate], msgspec.Meta(min_length=1)]
    context: dict[str, str | int | float | None] = {}
    top_k: Annotated[int, msgspec.Meta(ge=1, le=10**9)] | None = None
    time: float | None = None


_DECODER = msgspec.json.Decoder(_Request)


@dataclass
class RankInput:
    """A valid ranking request, candidates as one array."""

    user_id: int
    context: dict[str, ContextValue]
    video_ids: np.ndarray  # (n,) int64, request order
    top_k: int | None
    time: float | None = None


def decode_rank_request(raw: bytes, content_type: str | None) -> RankInput:
    """The request in ``raw``; raises FastAPI's ``RequestValidationError`` (422 naming the
    field) or a 400 for a body that is not text, exactly as a ``RankRequest`` parameter would."""
    if _is_json(content_type):
        try:
            r = _DECODER.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError):
            r = None
        if r is not None and _context_ok(r.context) and (r.time is None or math.isfinite(r.time)):
            ids = np.fromiter((c.video_id for c in r.candidates), np.int64, len(r.candidates))
            return RankInput(r.user_id, r.context, ids, r.top_k, r.time)
    return _validate_as_fastapi_would(raw, content_type)


def _context_ok(context: dict[str, Any]) -> bool:
    """msgspec's union admits any int and overflowing floats; the schema does not."""
    for v in context.values():
        if isinstance(v, float) and not math.isfinite(v):
            return False
        if isinstance(v, int) and not _INT64_MIN <= v <= _INT64_MAX:
            return False
    return True


def _is_json(content_type: str | None) -> bool:
    """FastAPI's rule: no content type, or ``application/json`` / ``application/*+json``."""
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


def _lone_surrogate(body: Any) -> tuple[str | int, ...] | None:
    """The location of the first string (key or value) in ``body`` holding a lone surrogate,
    or None. Iterative, so any depth ``json.loads`` produced is walked without recursion."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(body, ())]
    while stack:
        value, loc = stack.pop()
        if isinstance(value, str):
            if not _is_unicode(value):
                return loc
        elif isinstance(value, dict):
            for k, v in value.items():
                if not _is_unicode(k):
                    return (*loc, k.encode("utf-8", "backslashreplace").decode())
                stack.append((v, (*loc, k)))
        elif isinstance(value, list):
            stack.extend((v, (*loc, i)) for i, v in enumerate(value))
    return None


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate (``json`` pairs the valid ones)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _validate_as_fastapi_would(raw: bytes, content_type: str | None) -> RankInput:
    body = parse_json_body(raw, content_type)
    try:
        req = RankRequest.model_validate(body)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        raise RequestValidationError(errors) from e
    ids = np.fromiter((c.video_id for c in req.candidates), np.int64, len(req.candidates))
    return RankInput(req.user_id, req.context, ids, req.top_k, req.time)


def decode_events_request(raw: bytes, content_type: str | None) -> EventsRequest:
    """A ``POST /v1/events`` body, with the refusals of :func:`decode_rank_request`'s slow path
    (422 naming the field, lone surrogates, nesting too deep; 400 for a body that is not text)."""
    body = parse_json_body(raw, content_type)
    try:
        return EventsRequest.model_validate(body)
    except ValidationError as e:
        errors = [{**err, "loc": ("body", *err["loc"])} for err in e.errors()]
        raise RequestValidationError(errors) from e


def parse_json_body(raw: bytes, content_type: str | None) -> Any:
    """The body as Python values, as FastAPI would parse it, refusing what the service cannot
    use; a non-JSON content type leaves the bytes for validation to refuse."""
    body: Any = raw
    if _is_json(content_type):
        try:
            body = json.loads(raw)
        except RecursionError:  # e.g. a thousand nested [
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body",),
                        "msg": "JSON nested too deeply",
                        "input": {},
                    }
                ]
            ) from None
        except json.JSONDecodeError as e:
            raise RequestValidationError(
                [
                    {
                        "type": "json_invalid",
                        "loc": ("body", e.pos),
                        "msg": "JSON decode error",
                        "input": {},
                        "ctx": {"error": e.msg},
                    }
                ]
            ) from e
        except ValueError as e:  # not UTF-8/16/32 text at all
            raise HTTPException(400, "There was an error parsing the body") from e
        where = _lone_surrogate(body)
        if where is not None:
            raise RequestValidationError(
                [
                    {
                        "type": "string_unicode",
                        "loc": ("body", *where),
                        "msg": "a lone UTF-16 surrogate (\\ud800-\\udfff) is not a character",
                        "input": None,
                    }
                ]
            )
    return body
