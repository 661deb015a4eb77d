"""service/decode.py: the msgspec fast path accepts what RankRequest accepts and nothing more;
everything else is answered by pydantic, exactly as a FastAPI body parameter would be."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError

from service import decode
from service.decode import decode_rank_request
from service.schemas import RankRequest

GOOD = {
    "user_id": 7,
    "context": {"device": "ios", "hour": 20, "score": 0.5, "none": None},
    "candidates": [{"video_id": v} for v in (3, 1, 2**62)],
    "top_k": 2,
}


def _no_fallback(*_: object) -> None:
    raise AssertionError("a correct body must not need the pydantic pass")


def test_a_correct_body_takes_the_fast_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "_validate_as_fastapi_would", _no_fallback)
    r = decode_rank_request(json.dumps(GOOD).encode(), "application/json")
    assert (r.user_id, r.context, r.top_k) == (7, GOOD["context"], 2)
    assert r.video_ids.dtype == np.int64
    assert r.video_ids.tolist() == [3, 1, 2**62]
    minimal = decode_rank_request(b'{"user_id": 1, "candidates": [{"video_id": 5}]}', None)
    assert (minimal.context, minimal.top_k, minimal.video_ids.tolist()) == ({}, None, [5])


@pytest.mark.parametrize(
    "body",
    [
        '{"user_id": 7, "candidates": [{"video_id": 1}], "context": {"hour": "3"}}',
        # beyond int64 but a finite float: the schema takes it as a float (the engine then
        # refuses it for an integer-coded feature, naming it)
        f'{{"user_id": 7, "candidates": [{{"video_id": 1}}], "context": {{"h": {2**70}}}}}',
    ],
)
def test_what_pydantic_accepts_in_lax_mode_is_still_accepted(body: str) -> None:
    expected = RankRequest.model_validate_json(body)
    r = decode_rank_request(body.encode(), "application/json")
    assert r.user_id == expected.user_id and r.top_k == expected.top_k
    assert r.context == expected.context
    assert r.video_ids.tolist() == [c.video_id for c in expected.candidates]


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ('{"user_id": 1, "candidates": [{"video_id": 1}], "context": {"hour": 1e999}}', "hour"),
        ('{"user_id": 1, "candidates": [{"video_id": 1}], "context": {"hour": NaN}}', "hour"),
        (f'{{"user_id": {2**63}, "candidates": [{{"video_id": 1}}]}}', "user_id"),
        ('{"user_id": 1, "candidates": [{"video_id": 1, "x": 2}]}', "x"),
        ('{"user_id": 1, "candidates": []}', "candidates"),
        ('{"user_id": 1, "candidates": [{"video_id": 1}], "top_k": 0}', "top_k"),
        ('{"user_id": 1, "candidates": [{"video_id": 1}], "extra": 0}', "extra"),
        ('{"user_id": 1, "candidates": ', 29),  # not JSON: loc is the character position
        # ids and top_k are strict integers: no booleans, numeric strings or whole floats
        ('{"user_id": true, "candidates": [{"video_id": 1}]}', "user_id"),
        ('{"user_id": "7", "candidates": [{"video_id": 1}]}', "user_id"),
        ('{"user_id": 7.0, "candidates": [{"video_id": 1}]}', "user_id"),
        ('{"user_id": 1, "candidates": [{"video_id": false}]}', "video_id"),
        ('{"user_id": 1, "candidates": [{"video_id": "7"}]}', "video_id"),
        ('{"user_id": 1, "candidates": [{"video_id": 1}], "top_k": "3"}', "top_k"),
        ('{"user_id": 1, "candidates": [{"video_id": 1}], "top_k": true}', "top_k"),
        # a lone surrogate anywhere: in a context value or key, an unknown key, a wrong value
        ('{"user_id": 1, "candidates": [{"video_id": 1}], "context": {"d": "\\ud800"}}', "d"),
        ('{"user_id": 1, "candidates": [{"video_id": 1}], "context": {"\\udfff": 1}}', "context"),
        ('{"user_id": 1, "candidates": [{"video_id": 1, "\\ud800x": 1}]}', "candidates"),
        ('{"user_id": "\\ud800", "candidates": [{"video_id": 1}]}', "user_id"),
        ("[" * 1000 + "]" * 1000, "body"),  # deeper than Python's recursion limit
        ('{"user_id": 1, "candidates": [{"video_id": 1}], "x": ' + "[" * 5000, "body"),
    ],
)
def test_refusals_name_the_field_under_body(body: str, loc: str | int) -> None:
    with pytest.raises(RequestValidationError) as e:
        decode_rank_request(body.encode(), "application/json")
    first = e.value.errors()[0]["loc"]
    assert first[0] == "body" and loc in first
    json.dumps(e.value.errors(), ensure_ascii=False).encode()  # the 422 body can be UTF-8


def test_a_valid_surrogate_pair_is_a_character_not_a_refusal() -> None:
    body = '{"user_id": 1, "candidates": [{"video_id": 1}], "context": {"d": "\\ud83d\\ude00"}}'
    assert decode_rank_request(body.encode(), None).context == {"d": "\U0001f600"}


def test_a_body_that_is_not_text_is_400_and_a_non_json_type_is_422() -> None:
    with pytest.raises(HTTPException) as e:
        decode_rank_request(b"\xff\xfe\xfa", "application/json")
    assert e.value.status_code == 400
    with pytest.raises(RequestValidationError) as v:
        decode_rank_request(json.dumps(GOOD).encode(), "text/plain")
    assert v.value.errors()[0]["loc"] == ("body",)
    ok = decode_rank_request(json.dumps(GOOD).encode(), "application/vnd.api+json")
    assert ok.user_id == 7
