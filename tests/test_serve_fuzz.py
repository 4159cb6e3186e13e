"""The server under hostile input and load: schemathesis, run over the server's own OpenAPI schema through
its pytest integration (positive and negative generation, its coverage phase, bounded by max_examples),
finds no 5xx and every answer conforms to the schema (status code, content type, body); and a soak (a
short version of benchmarks/soak.py) of 16 clients mixing streamed, non-streamed,
cancelled-midway and malformed requests gets no 5xx, no hung request, /health answers throughout, and the
scheduler is idle (no leaked rows) afterwards. Also: every endpoint but /health needs the key."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import schemathesis
from benchmarks.soak import soak
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)
from tests._serve_util import serve

from yuyan.serve.app import openapi_schema

KEY = "sk-fuzz-51b0"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tokenizer):
    with serve(tokenizer, api_key=KEY, max_batch=8, max_tokens_limit=8, max_body_bytes=1 << 16) as s:
        yield s


# per operation and mode; with the coverage phase ~700 requests, ~6 s on 2 cores (benchmarks/soak.py runs
# this test with more through YUYAN_FUZZ_EXAMPLES)
FUZZ_EXAMPLES = int(os.environ.get("YUYAN_FUZZ_EXAMPLES", "25"))
# the schema GET /openapi.json answers (equal to it: test_the_fuzzed_schema_is_the_servers), loaded when
# the module is (schemathesis's lazy from_fixture needs a pytest private that pytest 9 removed)
schema = schemathesis.openapi.from_dict(openapi_schema())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=FUZZ_EXAMPLES
)
# invalid data must be refused with one of the statuses the schema documents for it (a body over the
# server's limit is a 413, which schemathesis does not expect by default)
schema.config.checks.get_by_name(name="negative_data_rejection").expected_statuses = [
    "400",
    "401",
    "404",
    "413",
    "421",
]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
FUZZED: dict[str, int] = {}  # status -> requests, over the whole fuzz run (read by the test after it)


@schema.parametrize()
@settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_schemathesis_finds_no_5xx_and_every_response_conforms(case, server):
    """Valid and invalid requests generated from the schema: never a 5xx, and every answer (status,
    content type, body) is one the schema documents. Half the bodies that name a model name the served
    one, so that generation really runs (a random name is a 404)."""
    if isinstance(case.body, dict) and "model" in case.body and hash(repr(case.body)) % 2:
        case.body = {**case.body, "model": "tiny"}
    response = case.call(base_url=server[0], headers=AUTH, timeout=60)
    key = str(response.status_code) + (
        " generated" if response.status_code == 200 and case.method == "POST" else ""
    )
    FUZZED[key] = FUZZED.get(key, 0) + 1
    case.validate_response(response, checks=CHECKS, headers=AUTH)


def test_the_fuzzed_schema_is_the_servers(server):
    base, _, _ = server
    assert httpx.get(base + "/openapi.json", headers=AUTH).json() == openapi_schema()


def test_the_fuzz_ran_generations_and_refusals():
    """Runs after the fuzz above: it sent both real generations and refused requests."""
    print("schemathesis run:", json.dumps(FUZZED))  # read by benchmarks/soak.py
    assert sum(FUZZED.values()) >= 100, FUZZED
    assert FUZZED.get("200 generated", 0) >= 5 and sum(v for k, v in FUZZED.items() if k[0] == "4") >= 20, (
        FUZZED
    )


def test_soak_no_5xx_no_hang_health_answers(server):
    base, _, app = server
    res = soak(base, "tiny", clients=16, seconds=8, headers=AUTH, max_tokens=8, oversize=1 << 17)
    assert res["server_errors"] == 0 and res["hung"] == 0 and res["threads_left"] == 0, res
    assert res["stream_incomplete"] == 0 and res["client_errors"] == 0, res
    assert res.get("health_failures", 0) == 0 and res["health_ms"]["n"] >= 10
    assert res["idle_after"], "rows or queue entries leaked after the soak"
    assert set(res["kinds"]) == {"stream", "chat", "stream_cancel", "abandon", "malformed"}
    assert (
        res["by_status"].get("200", 0) > 20
        and res["by_status"].get("413", 0) + res["by_status"].get("400", 0) > 5
    )


def test_every_endpoint_but_health_needs_the_key(server):
    base, _, app = server
    public = {"/health", "/"}
    for route in app.routes:
        path = getattr(route, "path", "")
        methods = getattr(route, "methods", None) or {"GET"}
        if path in public or path.startswith("/static"):
            continue
        url = base + path.replace("{model_id}", "tiny")
        for m in methods - {"HEAD"}:
            r = httpx.request(m, url, json={}, timeout=10)
            assert r.status_code == 401, (m, path, r.status_code)
            r = httpx.request(m, url, json={}, headers={"Authorization": "Bearer " + KEY + "x"}, timeout=10)
            assert r.status_code == 401, (m, path, r.status_code)
    assert httpx.get(base + "/health").status_code == 200
