"""Schemathesis fuzzes the real service from its own OpenAPI schema: valid and invalid requests to
every operation, and no answer may be a 5xx or disagree with the documented status codes, content
types and bodies. Bounded: a fixed number of examples per operation and mode, no deadline (two
shared cores), no example database (runs are independent)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import RANKING_CONFIG
from tests.service.conftest import run_service

pytestmark = pytest.mark.slow

TOKEN = "fuzz-admin-token"

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# examples per (operation, mode): the rank endpoint is where the inputs are
EXAMPLES = {"/v1/rank": 120, "/admin/reload": 30}
OTHER_EXAMPLES = 10


@pytest.fixture(scope="module")
def admin_service(tiny_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service with an admin token, so the admin endpoint is in the schema and fuzzed."""
    env = {
        "RANKER_ARTIFACT": str(tiny_artifact),
        "RANKER_RANKING_CONFIG": str(RANKING_CONFIG),
        "RANKER_ADMIN_TOKEN": TOKEN,
    }
    with run_service(env, log_path=tmp_path_factory.mktemp("fuzz") / "service.log") as url:
        yield url


def fuzz_operation(
    op: APIOperation, mode: GenerationMode, url: str, session: requests.Session, seen: Counter
) -> None:
    """Runs one operation's generated cases in one mode; counts the statuses in ``seen``."""
    # the token on admin calls, or every one would stop at the 401
    headers = {"Authorization": f"Bearer {TOKEN}"} if op.path.startswith("/admin") else {}
    checks = CHECKS + ([negative_data_rejection] if mode.is_negative else [])

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES.get(op.path, OTHER_EXAMPLES),
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
    )
    def fuzz(case: schemathesis.Case) -> None:
        response = case.call(base_url=url, session=session, headers=headers, timeout=10)
        seen[op.method.upper(), op.path, response.status_code] += 1
        case.validate_response(response, checks=checks, headers=headers)

    try:
        fuzz()
    except Unsatisfiable:
        assert mode.is_negative  # an operation without inputs has no invalid ones


def test_fuzzed_requests_get_no_5xx_and_documented_answers(admin_service: str) -> None:
    schema = schemathesis.openapi.from_url(f"{admin_service}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/rank", "/readyz", "/admin/reload"}
    seen: Counter = Counter()
    with requests.Session() as session:
        for op in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz_operation(op, mode, admin_service, session, seen)
    print(f"fuzzed requests by (method, path, status): {dict(seen)}")
    assert sum(seen.values()) >= 200
    assert seen["POST", "/v1/rank", 200] > 0 and seen["POST", "/v1/rank", 422] > 0
