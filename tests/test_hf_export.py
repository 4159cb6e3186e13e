"""HF export of a chat model against transformers itself: end-of-turn tokens, the chat template, the pipeline.

A tiny Llama-family model is trained in-process (a few hundred Adam steps on one conversation) to answer a
fixed turn, end it with `<|end|>`, and then go on writing a next user turn: an export whose end tokens
missed `<|end|>` would run past the turn. transformers' `pipeline("text-generation")` in chat mode on the
exported folder must stop exactly where yuyan's `Conversation` (the core of `yuyan chat`) stops, and the
exported chat template must give the ids of the server's own templating (`developer` read as `system`,
tools, tool calls and tool results as apps/tools.py renders them).
"""

from __future__ import annotations

import json

import pytest
import torch
from tests.conftest import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from yuyan.apps.conversation import Conversation
from yuyan.generate import GenerationConfig
from yuyan.model.checkpoint import LanguageModel
from yuyan.model.hf import export_hf
from yuyan.model.transformer import Transformer
from yuyan.serve.config import ServeConfig
from yuyan.serve.protocol import Prompts, chat_request
from yuyan.serve.schemas import ChatCompletionRequest

SYSTEM, USER, REPLY, NEXT = "be brief", "hi there", "hello 你好 😀", "more please"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "今天的天气",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "time"}},
]


def _ids(x) -> list[int]:
    x = x["input_ids"] if hasattr(x, "keys") else x
    return [int(i) for i in (x[0] if x and isinstance(x[0], list) else x)]


@pytest.fixture(scope="module")
def chat_lm(tmp_path_factory, tokenizer) -> LanguageModel:
    """A model that greedily answers (SYSTEM, USER) with REPLY <|end|> and then writes <|user|>NEXT<|end|>."""
    tok = tokenizer
    assert set(tok.chat_ids) == {"<|system|>", "<|user|>", "<|assistant|>", "<|end|>"}
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}], add_generation_prompt=True
    )[0]
    end, user = tok.chat_ids["<|end|>"], tok.chat_ids["<|user|>"]
    rest = [*tok.encode(REPLY), end, user, *tok.encode(NEXT), end]
    seq = torch.tensor([prompt + rest])
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", vocab_size=tok.vocab_size))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(400):
        logits = model(seq[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits[0], seq[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    with torch.no_grad():  # the no-cache greedy oracle: the model goes on past the end of the turn
        x = torch.tensor([prompt])
        for _ in range(len(rest)):
            x = torch.cat([x, model(x)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert x[0, len(prompt) :].tolist() == rest, f"the tiny model did not learn its turn (loss {loss.item()})"
    return LanguageModel(model, tok, tmp_path_factory.mktemp("sft"), {"task": "sft"})


@pytest.fixture(scope="module")
def exported(chat_lm, tmp_path_factory):
    return export_hf(chat_lm, None, tmp_path_factory.mktemp("export") / "hf")


def test_every_end_of_turn_token_is_an_eos_token(exported, tokenizer):
    end, eot = tokenizer.chat_ids["<|end|>"], tokenizer.eot_id
    config = json.loads((exported / "config.json").read_text())
    gen = json.loads((exported / "generation_config.json").read_text())
    tok_cfg = json.loads((exported / "tokenizer_config.json").read_text())
    assert config["eos_token_id"] == gen["eos_token_id"] == [end, eot]
    assert tok_cfg["eos_token"] == "<|end|>" and set(tok_cfg["additional_special_tokens"]) >= {"<|end|>"}
    hf_tok = AutoTokenizer.from_pretrained(exported)
    assert hf_tok.eos_token_id == end and hf_tok.pad_token_id == tokenizer.pad_id != end
    assert AutoModelForCausalLM.from_pretrained(exported).generation_config.eos_token_id == [end, eot]


def test_a_base_model_keeps_end_of_text_as_its_eos_token_and_still_stops_at_a_turn(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size))
    out = export_hf(model, tokenizer, tmp_path / "hf")
    end, eot = tokenizer.chat_ids["<|end|>"], tokenizer.eot_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [eot, end]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [eot, end]
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"


def test_transformers_chat_pipeline_stops_where_yuyan_chat_stops(exported, chat_lm, tokenizer):
    greedy = GenerationConfig.from_dict({"temperature": 0, "max_new_tokens": 24})
    ours = "".join(Conversation(chat_lm, greedy, system=SYSTEM).send(USER))
    assert ours == REPLY.strip()  # yuyan stopped at <|end|>

    # the server's developer role is the system message, in the pipeline's template too
    messages = [{"role": "developer", "content": SYSTEM}, {"role": "user", "content": USER}]
    pipe = pipeline("text-generation", model=str(exported), device="cpu")
    out = pipe(messages, max_new_tokens=24, do_sample=False)
    reply = out[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip() == ours

    # token for token: generation ends with the end-of-turn token, as ours does; with end-of-text as the only
    # end token (the old export), it runs on into the next turn
    hf = AutoModelForCausalLM.from_pretrained(exported)
    hf_tok = AutoTokenizer.from_pretrained(exported)
    prompt = _ids(hf_tok.apply_chat_template(messages, add_generation_prompt=True))
    new = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)[0, len(prompt) :].tolist()
    assert new == [*tokenizer.encode(REPLY), tokenizer.chat_ids["<|end|>"]]
    run_on = hf.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=tokenizer.eot_id
    )[0, len(prompt) :].tolist()
    assert len(run_on) > len(new) and tokenizer.decode(run_on).endswith(NEXT)


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "developer", "content": "规则"}, {"role": "user", "content": "你好 😀"}],
        [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": " a1\n"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "two"}],
            },
        ],
        [{"role": "user", "content": "<|end|> typed by a user"}],
        # tools: in the system turn (after the system text), calls after the assistant's text, results in one
        # user turn
        [
            {"role": "developer", "content": "use tools"},
            {"role": "user", "content": "天气?"},
            {
                "role": "assistant",
                "content": "checking",
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "北京"}'},
                    },
                    {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": [{"type": "text", "text": "noon"}]},
            {"role": "user", "content": "thanks"},
        ],
        [
            {"role": "user", "content": "time?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "time", "arguments": "{}"}}
                ],
            },
            {"role": "tool", "tool_call_id": "c", "content": "noon"},
        ],
    ],
)
def test_exported_chat_template_matches_the_servers_templating(exported, tokenizer, messages):
    hf_tok = AutoTokenizer.from_pretrained(exported)
    for tools in (None, TOOLS):
        body = ChatCompletionRequest(model="yuyan", messages=messages, tools=tools)
        server_ids, _ = chat_request(body, Prompts.of(tokenizer, 4096), ServeConfig())
        hf_ids = _ids(hf_tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
        assert hf_ids == server_ids, (tokenizer.decode(hf_ids), tokenizer.decode(server_ids))


def test_exported_chat_template_refuses_an_unknown_role(exported):
    hf_tok = AutoTokenizer.from_pretrained(exported)
    with pytest.raises(
        Exception, match="chat roles are system, developer, user, assistant and tool, not function"
    ):
        hf_tok.apply_chat_template([{"role": "function", "content": "x"}], add_generation_prompt=True)
