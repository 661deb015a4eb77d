"""Hostile input on the real service: every malformed or oversized request gets a 4xx naming the
field (or 413 for the body), never a 500, and the service keeps answering."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

MAX_BODY = 1 << 20  # the default RANKER_MAX_BODY_BYTES
MAX_CANDIDATES = 2000  # the default RANKER_MAX_CANDIDATES


@pytest.fixture(scope="module")
def good(tiny_world: Path) -> dict:
    videos = pq.read_table(tiny_world / "videos.parquet").column("video_id").to_numpy()
    return {
        "user_id": 1,
        "context": {"device": "ios", "hour": 20},
        "candidates": [{"video_id": int(v)} for v in videos[:5]],
    }


def post_raw(url: str, raw: bytes | Iterator[bytes]) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/rank", content=raw, headers={"content-type": "application/json"}, timeout=30
    )


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ('"context": {"hour": NaN}', "hour"),
        ('"context": {"hour": Infinity}', "hour"),
        ('"context": {"device": -Infinity}', "device"),
        ('"context": {"hour": 1e999}', "hour"),
        (f'"context": {{"hour": {2**70}}}', "hour"),  # fits a float, not an int64 category
        (f'"context": {{"hour": {10**400}}}', "hour"),
        ('"context": {"hour": 1e300}', "hour"),
        ('"context": {"hour": 1.5}', "hour"),
        ('"context": []', "context"),
        (f'"user_id": {2**63}', "user_id"),
        (f'"user_id": {-(2**63) - 1}', "user_id"),
        ('"user_id": 1.5', "user_id"),
        ('"user_id": NaN', "user_id"),
        ('"user_id": [1]', "user_id"),
        (f'"candidates": [{{"video_id": {2**64}}}]', "video_id"),
        ('"candidates": [{"video_id": 1e30}]', "video_id"),
        ('"candidates": [{"video_id": Infinity}]', "video_id"),
        ('"candidates": [1, 2]', "candidates"),
        ('"candidates": "abc"', "candidates"),
        ('"candidates": null', "candidates"),
        ('"candidates": []', "candidates"),
        ('"top_k": 0', "top_k"),
        ('"top_k": -3', "top_k"),
        (f'"top_k": {MAX_CANDIDATES + 1}', "top_k"),
        (f'"top_k": {10**10}', "top_k"),
        (f'"top_k": {10**100}', "top_k"),
        ('"top_k": "5"x', "body"),  # not JSON at all
        # ids and top_k are strict integers
        ('"user_id": true', "user_id"),
        ('"user_id": "7"', "user_id"),
        ('"candidates": [{"video_id": true}]', "video_id"),
        ('"candidates": [{"video_id": "7"}]', "video_id"),
        ('"top_k": "3"', "top_k"),
        # lone UTF-16 surrogates, wherever the request carries a string
        ('"context": {"device": "\\ud800"}', "device"),
        ('"context": {"device": "ios\\udc00"}', "device"),
        ('"context": {"\\ud800": "ios"}', "context"),
        ('"candidates": [{"video_id": 1, "\\ud800": 1}]', "candidates"),
        ('"user_id": "\\ud800"', "user_id"),
    ],
)
def test_hostile_fields_get_422_naming_the_field(
    service_url: str, good: dict, raw: str, field: str
) -> None:
    key = raw.split('"')[1]
    body = {k: v for k, v in good.items() if k != key}
    text = json.dumps(body)[:-1] + ", " + raw + "}"
    r = post_raw(service_url, text.encode())
    assert r.status_code == 422, r.text
    assert field in r.text
    assert r.json()["detail"][0]["loc"][0] == "body"


def test_too_many_candidates_is_422(service_url: str, good: dict) -> None:
    body = good | {"candidates": [{"video_id": i} for i in range(MAX_CANDIDATES + 1)]}
    r = httpx.post(f"{service_url}/v1/rank", json=body, timeout=30)
    assert r.status_code == 422 and "candidates" in r.text
    assert f"at most {MAX_CANDIDATES}" in r.text


def test_a_top_k_above_the_candidates_returns_them_all(service_url: str, good: dict) -> None:
    r = httpx.post(f"{service_url}/v1/rank", json=good | {"top_k": 50}, timeout=30)
    assert r.status_code == 200 and len(r.json()["items"]) == len(good["candidates"])


def test_a_body_over_the_limit_is_413_from_its_length(service_url: str) -> None:
    r = post_raw(service_url, b" " * (MAX_BODY + 1))
    assert r.status_code == 413
    assert r.json() == {"detail": f"request body larger than {MAX_BODY} bytes"}


def test_a_chunked_body_over_the_limit_is_413_while_reading(service_url: str) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        yield b'{"user_id": 1, "candidates": ['
        for _ in range(MAX_BODY // 60_000 + 2):
            yield b'{"video_id": 1},' * 4_000  # 64 kB
        yield b'{"video_id": 1}]}'

    r = post_raw(service_url, chunks())
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413 and "larger than" in r.json()["detail"]


def test_the_service_still_answers_after_hostile_input(service_url: str, good: dict) -> None:
    post_raw(service_url, b'{"user_id": 1, "context": {"hour": NaN}, "candidates": [1]}')
    r = httpx.post(f"{service_url}/v1/rank", json=good, timeout=30)
    assert r.status_code == 200, r.text
