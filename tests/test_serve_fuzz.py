"""The server under hostile input and load (short versions of benchmarks/soak.py): a schemathesis run over
the server's own OpenAPI schema finds no 5xx, and a soak of 16 clients mixing streamed, non-streamed,
cancelled-midway and malformed requests gets no 5xx, no hung request, /health answers throughout, and the
scheduler is idle (no leaked rows) afterwards. Also: every endpoint but /health needs the key."""

from __future__ import annotations

import httpx
import pytest
from benchmarks.soak import fuzz, soak
from tests._serve_util import serve

KEY = "sk-fuzz-51b0"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tokenizer):
    with serve(tokenizer, api_key=KEY, max_batch=8, max_tokens_limit=8, max_body_bytes=1 << 16) as s:
        yield s


def test_schema_fuzz_finds_no_5xx(server):
    base, _, _ = server
    res = fuzz(base, "tiny", n=200, headers=AUTH, seed=1)
    assert res["requests"] >= 150
    assert res["server_errors"] == 0, res["failures"]
    codes = {int(k) for k in res["by_status"] if k.isdigit()}
    assert any(400 <= c < 500 for c in codes) and res["generated"] >= 5  # invalid ones, and real generations


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
