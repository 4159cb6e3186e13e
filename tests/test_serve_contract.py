"""The server keeps OpenAI's contract, judged by the official openai client: echo with prompt logprobs
(what lm-evaluation-harness scores with), vLLM's prompt_logprobs, logit_bias, response_format, and every
field we do not serve refused with a 400 that names it."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from tests._serve_util import serve

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tokenizer):
    with serve(tokenizer, "llama", max_n=64) as (base, lm, app):
        yield base, lm


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def reference(lm, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over a prompt, computed directly: (T, V)."""
    with torch.no_grad():
        return lm.model(torch.tensor([ids])).float().log_softmax(-1)[0]


def check_prompt_part(lp, ids, ref, tok, k):
    """The first len(ids) entries of a completions logprobs object are the prompt's, against the model."""
    assert lp.tokens[: len(ids)] == [tok.decode([t]) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for t in range(1, len(ids)):
        assert math.isclose(lp.token_logprobs[t], ref[t - 1, ids[t]].item(), abs_tol=1e-5)
        top = ref[t - 1].topk(k)
        want = {tok.decode([int(i)]): v.item() for i, v in zip(top.indices, top.values, strict=True)}
        got = lp.top_logprobs[t]
        assert set(got) == set(want)
        assert all(math.isclose(got[s], want[s], abs_tol=1e-5) for s in want)


@pytest.mark.parametrize("max_tokens", [0, 1, 3])
def test_echo_logprobs_string_and_id_prompts(client, server, tokenizer, max_tokens):
    _, lm = server
    texts = ["def add(a, b):\n    return a + b", "语言模型是一种概率模型"]
    for prompts in (texts, [tokenizer.encode(t) for t in texts]):  # batched texts, batched token ids
        r = client.completions.create(
            model="tiny", prompt=prompts, echo=True, logprobs=2, max_tokens=max_tokens, temperature=0
        )
        assert len(r.choices) == 2
        check_choices(r, texts, lm, tokenizer, max_tokens)


def check_choices(r, texts, lm, tokenizer, max_tokens):
    for choice, text in zip(sorted(r.choices, key=lambda c: c.index), texts, strict=True):
        ids = tokenizer.encode(text)
        assert choice.text.startswith(text)
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) + max_tokens - (choice.finish_reason == "stop")
        check_prompt_part(lp, ids, reference(lm, ids), tokenizer, 2)
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        if max_tokens:  # the generated tokens follow, with the model's greedy choice
            full = ids + [tokenizer.encode(choice.text[len(text) :])[0]] if choice.text != text else ids
            assert lp.token_logprobs[len(ids)] == pytest.approx(
                reference(lm, full)[len(ids) - 1].max().item(), abs=1e-5
            )
    assert r.usage.completion_tokens <= 2 * max_tokens


def test_echo_without_logprobs_and_streamed(client, tokenizer):
    plain = client.completions.create(
        model="tiny", prompt="hello world", echo=True, max_tokens=4, temperature=0
    )
    gen = client.completions.create(model="tiny", prompt="hello world", max_tokens=4, temperature=0)
    assert plain.choices[0].text == "hello world" + gen.choices[0].text
    zero = client.completions.create(model="tiny", prompt="hello world", echo=True, max_tokens=0)
    assert zero.choices[0].text == "hello world" and zero.usage.completion_tokens == 0
    for logprobs in (None, 1):
        stream = client.completions.create(
            model="tiny",
            prompt="hello world",
            echo=True,
            max_tokens=4,
            temperature=0,
            stream=True,
            logprobs=logprobs,
        )
        chunks = list(stream)
        assert chunks[0].choices[0].text == "hello world"
        assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
        if logprobs:
            first = chunks[0].choices[0].logprobs
            assert first.token_logprobs[0] is None and len(first.tokens) == len(
                tokenizer.encode("hello world")
            )


def test_vllm_prompt_logprobs(client, server, tokenizer):
    _, lm = server
    text = "import os\nprint(os.getcwd())"
    ids = tokenizer.encode(text)
    ref = reference(lm, ids)
    r = client.completions.create(
        model="tiny", prompt=text, max_tokens=1, extra_body={"prompt_logprobs": 3}, temperature=0
    )
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids)
    for t in range(1, len(ids)):
        entry = plp[t][str(ids[t])]
        assert entry["logprob"] == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-5)
        assert entry["rank"] == int((ref[t - 1] > ref[t - 1, ids[t]]).sum()) + 1
        assert entry["decoded_token"] == tokenizer.decode([ids[t]])
        assert len(plp[t]) in (3, 4)
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=1,
        extra_body={"prompt_logprobs": 0},
    )
    cids, _ = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert len(chat.model_extra["prompt_logprobs"]) == len(cids) == chat.usage.prompt_tokens


def test_logit_bias_bans_and_forces_on_both_endpoints(client, tokenizer):
    first = client.completions.create(model="tiny", prompt="hello", max_tokens=6, temperature=0, logprobs=0)
    banned = tokenizer.encode(first.choices[0].text)[0]
    r = client.completions.create(
        model="tiny", prompt="hello", max_tokens=6, temperature=0, logit_bias={str(banned): -100}, logprobs=0
    )
    assert r.choices[0].logprobs.tokens[0] != tokenizer.decode([banned])
    forced = tokenizer.encode(" the")[0]
    for seed in range(5):
        r = client.completions.create(
            model="tiny",
            prompt="hello",
            max_tokens=5,
            temperature=1.0,
            seed=seed,
            logit_bias={str(forced): 100},
        )
        assert r.choices[0].text == tokenizer.decode([forced] * 5)
    msgs = [{"role": "user", "content": "hi"}]
    c = client.chat.completions.create(
        model="tiny", messages=msgs, max_tokens=4, temperature=0.7, seed=1, logit_bias={str(forced): 100}
    )
    assert c.choices[0].message.content == tokenizer.decode([forced] * 4)
    for bad in ({"x": 1}, {"5": 101}, {str(tokenizer.vocab_size + 5): 1}):
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt="hello", max_tokens=2, logit_bias=bad)
        assert "logit_bias" in str(e.value)


# every OpenAI (or vLLM) field this server does not serve: a 400 that names it, never silently dropped
UNSUPPORTED = [
    ("completions", {"suffix": " world"}, "suffix"),
    ("completions", {"best_of": 3}, "best_of"),
    ("completions", {"max_tokens": 0}, "max_tokens"),
    ("chat", {"functions": [{"name": "f"}]}, "functions"),
    ("chat", {"function_call": "auto"}, "function_call"),
    ("chat", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("chat", {"modalities": ["text", "audio"]}, "modalities"),
    ("chat", {"reasoning_effort": "high"}, "reasoning_effort"),
    ("chat", {"verbosity": "low"}, "verbosity"),
    ("chat", {"web_search_options": {}}, "web_search_options"),
    ("chat", {"guided_json": {"type": "object"}}, "guided_json"),
    (
        "chat",
        {"stream_options": {"include_usage": True, "continuous_usage_stats": True}},
        "continuous_usage_stats",
    ),
    ("completions", {"guided_regex": "a+"}, "guided_regex"),
    ("completions", {"frobnicate": 1}, "frobnicate"),
    ("completions", {"": None}, "''"),  # a field named by the empty string (schemathesis found a 500)
    ("chat", {"response_format": {"type": "json_schema"}}, "response_format"),
    ("chat", {"response_format": {"type": "yaml"}}, "response_format"),
]


@pytest.mark.parametrize(("endpoint", "fields", "param"), UNSUPPORTED)
def test_unsupported_fields_are_refused_by_name(server, endpoint, fields, param):
    base, _ = server
    body = {"model": "tiny", "max_tokens": 2}
    if endpoint == "chat":
        url, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": "hi"}]
    else:
        url, body["prompt"] = "/v1/completions", "hi"
    r = httpx.post(base + url, json={**body, **fields}, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert param in err["message"] and param.strip("'") in (err["param"] or "")


def test_fields_that_change_nothing_are_accepted(client):
    a = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        user="u1",
        metadata={"k": "v"},
        store=False,
        extra_body={"prompt_cache_key": "x"},
    )
    b = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    r = client.completions.create(model="tiny", prompt="x", max_tokens=2, best_of=1, n=1)
    assert len(r.choices) == 1


def test_response_format_text_is_plain(client):
    a = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=4,
        temperature=0,
        response_format={"type": "text"},
    )
    b = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0
    )
    assert a.choices[0].message.content == b.choices[0].message.content
    json.dumps(a.model_dump())


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "rank": {"type": "integer", "minimum": 1, "maximum": 99},
        "sunny": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["old", "new"]}, "maxItems": 2},
    },
    "required": ["city", "rank", "sunny", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def long_client(tokenizer):
    """A server whose model has 256 positions: room for a JSON answer after the chat prompt."""
    from tests._serve_util import running, tiny_lm

    from yuyan.serve import ServeConfig, create_app

    app = create_app(tiny_lm(tokenizer, "llama", block_size=256), ServeConfig(model_name="tiny", max_n=16))
    with running(app) as base:
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)


def test_json_schema_output_validates_in_every_seeded_sample(long_client):
    jsonschema = pytest.importorskip("jsonschema")
    client = long_client
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA, "strict": True}}
    choices = []
    for seed in range(0, 50, 10):  # 50 samples: seeds 0..49 (choice j of a request samples with seed + j)
        r = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "a city as JSON"}],
            max_tokens=120,
            temperature=1.0,
            seed=seed,
            n=10,
            response_format=fmt,
        )
        choices += r.choices
    assert len(choices) == 50
    for c in choices:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
    assert len({c.message.content for c in choices}) > 10
    # json_object on /v1/completions (an extension there, as vLLM's): an object, or cut at max_tokens
    r = client.completions.create(
        model="tiny",
        prompt="{",
        max_tokens=60,
        temperature=1.0,
        seed=1,
        n=4,
        extra_body={"response_format": {"type": "json_object"}},
    )
    for c in r.choices:
        assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict)


def test_a_bad_schema_is_a_400_naming_response_format(server):
    base, _ = server
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frob"}}},
    }
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert "json_schema grammar" in err["message"], err
