"""The endpoints beside generation (serve/endpoints.py): /v1/embeddings through the official openai client
(float and base64) against embeddings computed here from the model's final hidden states, /tokenize and
/detokenize against the tokenizer (Chinese, code and emoji round trip, the chat form against the chat
endpoint's prompt), /metrics parsed with prometheus_client's own parser after known requests (counts,
tokens and the token-time histograms went up by what those requests did), and the 400s and 401s."""

from __future__ import annotations

import base64
import threading

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from prometheus_client.parser import text_string_to_metric_families
from tests._serve_util import serve, tiny_lm

from yuyan.serve import ServeConfig, create_app

KEY = "sk-endpoints-3c1d"
AUTH = {"Authorization": f"Bearer {KEY}"}
TEXTS = ["语言模型是一种概率模型", "def f(x):\n\treturn x + 1  # 😀", "hello 🎉 café", "x"]


@pytest.fixture(scope="module")
def server(tokenizer):
    with serve(tokenizer, "llama", api_key=KEY) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def post(server, path: str, body: dict, headers: dict | None = AUTH) -> httpx.Response:
    return httpx.post(server[0] + path, json=body, headers=headers, timeout=60)


def reference(lm, ids: list[int]) -> np.ndarray:
    """The embedding computed directly: the mean of the final normalised hidden states, L2-normalised."""
    with torch.no_grad():
        h = lm.model.hidden(torch.tensor([ids]))[0].float()
    return F.normalize(h.mean(0), dim=-1).numpy()


def test_embeddings_equal_the_models_pooled_hidden_states(server, client, tokenizer):
    _, lm, _ = server
    ids = [tokenizer.encode(t) for t in TEXTS]
    want = [reference(lm, x) for x in ids]
    many = [f"{i} " * (1 + i % 15) for i in range(60)]  # several background calls (EMBED_CHUNK_TOKENS)
    want_many = [reference(lm, tokenizer.encode(t)) for t in many]
    seen = []  # the threads every forward pass ran on (decode steps and embeddings alike)
    hidden = lm.model.hidden
    lm.model.hidden = lambda *a, **k: (seen.append(threading.current_thread().name), hidden(*a, **k))[1]
    try:
        # "float"; left out, the client asks for base64 and decodes it itself; "base64": decoded here
        for fmt in ("float", None, "base64"):
            for inp in (TEXTS, ids):
                kw = {} if fmt is None else {"encoding_format": fmt}
                r = client.embeddings.create(model="tiny", input=inp, user="u", **kw)
                assert [d.index for d in r.data] == [0, 1, 2, 3] and r.model == "tiny"
                assert r.usage.prompt_tokens == r.usage.total_tokens == sum(map(len, ids))
                for d, w in zip(r.data, want, strict=True):
                    got = d.embedding
                    if fmt == "base64":  # little-endian float32 bytes
                        got = np.frombuffer(base64.b64decode(got), dtype="<f4")
                    assert len(got) == lm.model.config.d_model
                    assert np.abs(np.array(got) - w).max() < 1e-5
        one = client.embeddings.create(model="tiny", input=TEXTS[1], encoding_format="float")
        assert np.abs(np.array(one.data[0].embedding) - want[1]).max() < 1e-5
        one = client.embeddings.create(model="tiny", input=ids[0], dimensions=32, encoding_format="float")
        assert np.abs(np.array(one.data[0].embedding) - want[0]).max() < 1e-5
        r = client.embeddings.create(model="tiny", input=many, encoding_format="float")  # in order
        assert [d.index for d in r.data] == list(range(len(many)))
        for d, w in zip(r.data, want_many, strict=True):
            assert np.abs(np.array(d.embedding) - w).max() < 1e-5
    finally:
        del lm.model.hidden
    # the server decodes in a process of its own: not one forward pass (embeddings included) ran in this
    # one (in-process, they ran on the scheduler thread: tests/test_serve_reliability.py)
    assert seen == [], set(seen)
    # base64 holds exactly the float answer's numbers (float32 both)
    raw = post(server, "/v1/embeddings", {"model": "tiny", "input": TEXTS, "encoding_format": "base64"})
    floats = post(server, "/v1/embeddings", {"model": "tiny", "input": TEXTS}).json()
    for b, f in zip(raw.json()["data"], floats["data"], strict=True):
        assert np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4").tolist() == f["embedding"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"frobnicate": 1}, "frobnicate"),
        ({"input": ""}, "input[0]"),
        ({"input": []}, "input"),
        ({"input": ["a", ""]}, "input[1]"),
        ({"input": [[1], []]}, "input[1]"),
        ({"input": [[1, 2], [3, 100_000]]}, "input[1]"),
        ({"input": [-1]}, "input[0]"),
        ({"input": [[1], [2], list(range(65))]}, "input[2]"),  # more ids than the 64-token context
        ({"input": ["a", "a b " * 40]}, "input[1]"),  # more tokens than the context
        ({"input": ["a", "语言" * 2000]}, "input[1]"),  # more bytes than the context's tokens can hold
        ({"input": "a", "dimensions": 16}, "dimensions"),
        ({"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_embeddings_bad_input_is_a_400_naming_it(server, body, param):
    r = post(server, "/v1/embeddings", {"model": "tiny", "input": "a", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split("[")[0] in err["message"], err


def test_tokenize_and_detokenize_round_trip(server, tokenizer):
    text = "".join(TEXTS) + "\r\n\x00 if a<b: print('你好')"
    ids = tokenizer.encode(text)
    for extra in ({}, {"add_special_tokens": True}, {"add_special_tokens": False}):
        r = post(server, "/tokenize", {"model": "tiny", "prompt": text, **extra}).json()
        assert r == {"count": len(ids), "max_model_len": 64, "tokens": ids, "token_strs": None}
    r = post(server, "/tokenize", {"prompt": text, "return_token_strs": True}).json()
    assert r["token_strs"] == [tokenizer.tok.id_to_token(i) for i in ids]
    assert post(server, "/detokenize", {"model": "tiny", "tokens": ids}).json() == {"prompt": text}
    assert post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}
    # the chat form: the prompt the chat endpoint decodes
    msgs = [{"role": "system", "content": "简短"}, {"role": "user", "content": "hi 😀"}]
    chat = post(server, "/tokenize", {"messages": msgs}).json()
    want, _ = tokenizer.apply_chat_template(msgs, add_generation_prompt=True)
    assert chat["tokens"] == want
    answer = post(server, "/v1/chat/completions", {"model": "tiny", "messages": msgs, "max_tokens": 1})
    assert answer.json()["usage"]["prompt_tokens"] == chat["count"]
    bare = post(server, "/tokenize", {"messages": msgs, "add_generation_prompt": False}).json()
    assert bare["tokens"] == tokenizer.apply_chat_template(msgs)[0] and bare["count"] < chat["count"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/detokenize", {"tokens": [1, 512]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, "prompt"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
        ("/tokenize", {"prompt": "a", "continue_final_message": True}, "continue_final_message"),
        ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "add_special_tokens": True}, None),
    ],
)
def test_tokenize_bad_input_is_a_400_naming_it(server, path, body, param):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == (param or "add_special_tokens"), r.text


def test_the_new_endpoints_need_the_key_and_the_model(server):
    for path, body in [
        ("/v1/embeddings", {"model": "tiny", "input": "a"}),
        ("/tokenize", {"prompt": "a"}),
        ("/detokenize", {"tokens": [1]}),
    ]:
        assert post(server, path, body, headers=None).status_code == 401
        assert post(server, path, {**body, "model": "other"}).status_code == 404
    assert httpx.get(server[0] + "/metrics").status_code == 401


def scrape(server) -> dict[tuple, float]:
    """Every sample of /metrics: (name, sorted labels) -> value, read with prometheus_client's parser."""
    r = httpx.get(server[0] + "/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(r.text)
        for s in fam.samples
    }


def test_metrics_count_requests_tokens_and_token_times(server, client, tokenizer):
    banned = {str(i): -100 for i in tokenizer.chat_stop_ids}  # every choice runs to max_tokens
    before = scrape(server)
    runs = []
    for mt in (3, 5, 1):
        runs.append(client.completions.create(model="tiny", prompt="def f", max_tokens=mt, logit_bias=banned))
    stream = client.completions.create(
        model="tiny",
        prompt="import os",
        max_tokens=4,
        n=2,
        seed=1,
        logit_bias=banned,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = [c.usage for c in stream if c.usage] + [r.usage for r in runs]
    assert post(server, "/v1/completions", {"model": "tiny", "prompt": "x"}, headers=None).status_code == 401
    after = scrape(server)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    done = delta("yuyan_requests_total", endpoint="/v1/completions", status="200")
    assert done == 4 and delta("yuyan_requests_total", endpoint="/v1/completions", status="401") == 1
    assert delta("yuyan_request_latency_seconds_count", endpoint="/v1/completions") == 5
    assert delta("yuyan_prompt_tokens_total") == sum(u.prompt_tokens for u in usage)
    generated = sum(u.completion_tokens for u in usage)
    assert generated == 3 + 5 + 1 + 2 * 4 and delta("yuyan_generation_tokens_total") == generated
    choices = 3 + 2
    assert delta("yuyan_time_to_first_token_seconds_count") == choices
    assert delta("yuyan_time_per_output_token_seconds_count") == generated - choices
    assert delta("yuyan_time_to_first_token_seconds_bucket", le="+Inf") == choices
    assert after[("yuyan_requests_waiting", ())] == 0 and after[("yuyan_rows_running", ())] == 0
    # embeddings' input tokens are prompt tokens too
    r = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    again = scrape(server)
    assert again[("yuyan_prompt_tokens_total", ())] - after[("yuyan_prompt_tokens_total", ())] == (
        r.usage.prompt_tokens
    )
    key = ("yuyan_requests_total", (("endpoint", "/v1/embeddings"), ("status", "200")))
    assert again[key] - after.get(key, 0) == 1


def test_each_app_has_its_own_registry(tokenizer):
    apps = [create_app(tiny_lm(tokenizer), ServeConfig(model_name="tiny")) for _ in range(2)]
    assert apps[0].state.metrics.registry is not apps[1].state.metrics.registry
