"""Tool calling, judged by the official openai client: a required or named call decodes under the function's
schema and comes back as tool_calls whose arguments validate (streamed too), tool results are accepted on
the next turn and reach the prompt, "auto" parses calls out of free text, and misuse is a 400 naming the
field. The rendering and parsing (apps/tools.py) round-trip."""

from __future__ import annotations

import json

import httpx
import pytest
from tests._serve_util import running, tiny_lm

from yuyan.apps import tools
from yuyan.serve import ServeConfig, create_app

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tokenizer):
    lm = tiny_lm(tokenizer, "llama", block_size=1024)
    app = create_app(lm, ServeConfig(model_name="tiny", max_n=8))
    with running(app) as base:
        yield base, lm


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="none", max_retries=0)


def check_call(call, tools_by_name):
    assert call.type == "function" and call.id.startswith("call_")
    params = tools_by_name[call.function.name]["function"]["parameters"]
    jsonschema.validate(json.loads(call.function.arguments), params)


def test_required_and_named_calls_validate(client):
    by_name = {t["function"]["name"]: t for t in (WEATHER, CLOCK)}
    r = client.chat.completions.create(
        model="tiny",
        messages=USER,
        tools=[WEATHER, CLOCK],
        tool_choice="required",
        max_tokens=80,
        temperature=1.0,
        seed=0,
        n=6,
    )
    names = set()
    for c in r.choices:
        assert c.finish_reason == "tool_calls", c
        assert len(c.message.tool_calls) == 1
        check_call(c.message.tool_calls[0], by_name)
        names.add(c.message.tool_calls[0].function.name)
    r = client.chat.completions.create(
        model="tiny",
        messages=USER,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=80,
        temperature=1.0,
        seed=1,
        n=4,
    )
    for c in r.choices:
        assert c.message.tool_calls[0].function.name == "get_time"
        check_call(c.message.tool_calls[0], by_name)


def test_a_streamed_call_assembles(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=USER,
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=80,
        temperature=0,
        stream=True,
    )
    calls, finish = {}, None
    for chunk in stream:
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                calls.setdefault(tc.index, {"name": "", "arguments": ""})
                calls[tc.index]["name"] += tc.function.name or ""
                calls[tc.index]["arguments"] += tc.function.arguments or ""
            finish = c.finish_reason or finish
    assert finish == "tool_calls" and calls[0]["name"] == "get_weather"
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])
    whole = client.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0
    )
    assert json.loads(whole.choices[0].message.tool_calls[0].function.arguments) == json.loads(
        calls[0]["arguments"]
    )


def test_tool_results_are_accepted_on_the_next_turn(client, server):
    first = client.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0
    )
    call = first.choices[0].message.tool_calls[0]
    turn = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'},
    ]
    r = client.chat.completions.create(
        model="tiny", messages=turn, tools=[WEATHER], max_tokens=8, temperature=0
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and the result are in the prompt the model read
    base, lm = server
    rendered = tools.render(
        [
            {"role": "user", "content": USER[0]["content"]},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [
                    {"name": call.function.name, "arguments": json.loads(call.function.arguments)}
                ],
            },
            {"role": "tool", "content": '{"temp": 21}'},
        ],
        [WEATHER],
    )
    ids, _ = lm.tokenizer.apply_chat_template(rendered, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(ids)
    assert "<tool_response>" in rendered[-1]["content"] and rendered[-1]["role"] == "user"


def test_auto_and_none(client):
    r = client.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER], max_tokens=6, temperature=0
    )
    plain = client.chat.completions.create(model="tiny", messages=USER, max_tokens=6, temperature=0)
    # a random model writes no call: its text is the content; the tools made the prompt longer
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.usage.prompt_tokens > plain.usage.prompt_tokens
    none = client.chat.completions.create(
        model="tiny", messages=USER, tools=[WEATHER], tool_choice="none", max_tokens=6, temperature=0
    )
    assert none.choices[0].message.content == plain.choices[0].message.content


def test_parse_and_render_round_trip():
    names = {"get_weather", "get_time"}
    text = 'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "巴黎", "unit": "c"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"zone": 1}}\n</tool_call>'
    content, calls = tools.parse(text, names)
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert calls[0].arguments == {"city": "巴黎", "unit": "c"}
    # an assistant turn with those calls renders back to the same calls
    msgs = tools.render(
        [
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [{"name": c.name, "arguments": c.arguments} for c in calls],
            }
        ],
        None,
    )
    again = tools.parse(msgs[0]["content"], names)
    assert again[0] == "Let me check." and [(c.name, c.arguments) for c in again[1]] == [
        (c.name, c.arguments) for c in calls
    ]
    # not a call: an unknown name, broken JSON, arguments that are not an object
    for bad in (
        '<tool_call>{"name": "rm", "arguments": {}}</tool_call>',
        "<tool_call>{oops</tool_call>",
        '<tool_call>{"name": "get_time", "arguments": 3}</tool_call>',
    ):
        assert tools.parse(bad, names) == (bad, [])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),  # no tools
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
        ),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tools": [{"type": "retrieval"}]}, "tools"),
        ({"tool_choice": "sometimes", "tools": [WEATHER]}, "tool_choice"),
    ],
)
def test_tool_misuse_is_a_400_naming_the_field(server, extra, param):
    body = {"model": "tiny", "messages": USER, "max_tokens": 4, **extra}
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert param in (r.json()["error"]["param"] or ""), r.json()


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([{"role": "user", "content": "hi", "name": "bob"}], "name"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": "x", "tool_calls": []}], "messages[0].tool_calls"),
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}
                    ],
                }
            ],
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
def test_bad_turns_are_a_400_naming_the_field(server, messages, param):
    r = httpx.post(
        server[0] + "/v1/chat/completions", json={"model": "tiny", "messages": messages}, timeout=30
    )
    assert r.status_code == 400, r.text
    assert param in (r.json()["error"]["param"] or ""), r.json()
