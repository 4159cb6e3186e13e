"""Structured output in the decode core (generate/grammar.py): JSON Schema samples validate, regexes and
Lark grammars match, greedy constrained decoding equals a naive oracle (an uncached forward per token with
llguidance's own mask), grammar rows leave unconstrained rows in the batch as they were, and bad grammars,
beams or speculation are refused or decode normally."""

from __future__ import annotations

import json
import re

import jsonschema
import llguidance
import llguidance.torch as llt
import pytest
import torch
from tests.conftest import tiny_config

from yuyan.errors import UserError
from yuyan.generate import GenerationConfig, generate
from yuyan.generate.grammar import compile_grammar, mask_bias, token_bytes
from yuyan.model.transformer import Transformer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "中文"]}, "maxItems": 2},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config("llama", block_size=256)).eval()


def cfg(**kw) -> GenerationConfig:
    return GenerationConfig.from_dict(kw).validate()


def test_json_schema_samples_all_validate(model, tokenizer):
    spec = {"type": "json_schema", "schema": SCHEMA}
    out = generate(
        model,
        tokenizer,
        ["user: ", "{"],
        cfg(max_new_tokens=120, temperature=1.0, seed=0, n=25, grammar=spec),
    )
    comps = [c for cs in out for c in cs]
    assert len(comps) == 50
    for c in comps:
        assert c.finish_reason == "stop", c
        jsonschema.validate(json.loads(c.text), SCHEMA)
    assert len({c.text for c in comps}) > 10  # sampling still samples, among what the schema allows
    obj = generate(
        model,
        tokenizer,
        ["x"],
        cfg(max_new_tokens=60, temperature=1.0, seed=1, grammar={"type": "json_object"}),
    )
    c = obj[0][0]
    assert c.finish_reason == "length" or isinstance(json.loads(c.text), dict)


def test_regex_and_lark_grammars_match(model, tokenizer):
    out = generate(
        model,
        tokenizer,
        ["id: "],
        cfg(
            max_new_tokens=40,
            temperature=0.9,
            seed=3,
            n=8,
            grammar={"type": "regex", "pattern": "[0-9]{3}-(yes|no)"},
        ),
    )
    for c in out[0]:
        assert c.finish_reason == "stop" and re.fullmatch("[0-9]{3}-(yes|no)", c.text), c
    lark = 'start: "answer: " ("yes" | "no" | "maybe")'
    out = generate(
        model,
        tokenizer,
        ["q"],
        cfg(max_new_tokens=20, temperature=1.0, seed=0, n=6, grammar={"type": "grammar", "grammar": lark}),
    )
    assert {c.text for c in out[0]} <= {"answer: yes", "answer: no", "answer: maybe"}
    assert all(c.finish_reason == "stop" for c in out[0])


def oracle(model, tokenizer, prompt: list[int], grammar: str, steps: int) -> list[int]:
    """Greedy decoding with an uncached forward pass per token and llguidance's mask applied directly."""
    V = model.config.vocab_size
    m = llguidance.LLMatcher(
        llguidance.LLTokenizer(tokenizer.to_str(), n_vocab=V, eos_token=tokenizer.eot_id), grammar
    )
    ids, out = list(prompt), []
    for _ in range(steps):
        bits = torch.zeros(1, (V + 31) // 32, dtype=torch.int32)
        llt.fill_next_token_bitmask(m, bits, 0)
        allowed = [(int(bits[0, t // 32]) >> (t % 32)) & 1 == 1 for t in range(V)]
        with torch.no_grad():
            logits = model(torch.tensor([ids]))[0, -1].float()
        logits[torch.tensor([not a for a in allowed])] = float("-inf")
        logits[tokenizer.vocab_size :] = float("-inf")
        t = int(logits.argmax())
        if t == tokenizer.eot_id:
            break
        out.append(t)
        ids.append(t)
        m.consume_token(t)
        if m.is_stopped():
            break
    return out


def test_greedy_constrained_decoding_equals_the_oracle(model, tokenizer):
    spec = {"type": "json_schema", "schema": SCHEMA}
    grammar = compile_grammar(tokenizer, spec, model.config.vocab_size)
    prompts = [tokenizer.encode("name: "), tokenizer.encode("{}")]
    got = generate(model, tokenizer, prompts, cfg(max_new_tokens=80, temperature=0, grammar=spec))
    for p, comps in zip(prompts, got, strict=True):
        assert comps[0].token_ids == oracle(model, tokenizer, p, grammar, 80)


def test_grammar_rows_leave_the_other_rows_alone(model, tokenizer):
    """One decode batch mixes a constrained and an unconstrained request (the server's case)."""
    from yuyan.generate.core import Decoder, check_prompt

    plain = cfg(max_new_tokens=20, temperature=0)
    con = cfg(max_new_tokens=20, temperature=0, grammar={"type": "regex", "pattern": "[a-z]+"})
    p = tokenizer.encode("def f(x):")
    alone = generate(model, tokenizer, [p], plain)[0][0]
    core = Decoder(model, tokenizer, 2)
    B = model.config.block_size
    (a,), (b,) = core.admit([check_prompt(p, plain, B, 512), check_prompt(p, con, B, 512)], [plain, con])
    while core.rows:
        core.step()
    assert a.completion().token_ids == alone.token_ids
    assert re.fullmatch("[a-z]+", b.completion().text)


def test_bad_grammars_and_combinations(model, tokenizer):
    with pytest.raises(UserError, match="invalid regex grammar"):
        generate(model, tokenizer, ["x"], cfg(grammar={"type": "regex", "pattern": "a(b"}))
    with pytest.raises(UserError, match="invalid json_schema grammar"):
        generate(model, tokenizer, ["x"], cfg(grammar={"type": "json_schema", "schema": {"type": "frob"}}))
    with pytest.raises(UserError, match="beam search does not combine with a grammar"):
        cfg(num_beams=2, grammar={"type": "json_object"})
    with pytest.raises(UserError, match="grammar must be a table"):
        cfg(grammar={"type": "yaml"})
    # speculation covers plain greedy decoding only: a grammar row decodes normally, to the same tokens
    spec = {"type": "regex", "pattern": "[a-z ]{1,30}"}
    a = generate(model, tokenizer, ["q"], cfg(max_new_tokens=16, temperature=0, grammar=spec))[0][0]
    b = generate(model, tokenizer, ["q"], cfg(max_new_tokens=16, temperature=0, grammar=spec, speculative=4))[
        0
    ][0]
    assert a.token_ids == b.token_ids and re.fullmatch("[a-z ]{1,30}", a.text)


def test_logprobs_are_the_models_and_max_tokens_cuts(model, tokenizer):
    spec = {"type": "json_schema", "schema": SCHEMA}
    c = generate(model, tokenizer, ["x"], cfg(max_new_tokens=5, temperature=0, logprobs=2, grammar=spec))[0][
        0
    ]
    assert c.finish_reason == "length" and len(c.token_ids) == 5  # at max_tokens the JSON is unfinished
    ids = tokenizer.encode("x")
    with torch.no_grad():
        lp = model(torch.tensor([ids]))[0, -1].float().log_softmax(-1)
    assert c.logprobs[0].logprob == pytest.approx(float(lp[c.token_ids[0]]), abs=1e-5)


@pytest.mark.parametrize("byteorder", ["little", "big"])
def test_mask_bias_reads_every_bit(monkeypatch, byteorder):
    """Bit j of word w is token 32w + j: 0 where set, -inf where not, on either unpacking path, with a
    vocabulary that ends inside a word."""
    import sys

    monkeypatch.setattr(sys, "byteorder", byteorder)  # "big" takes the shifting path
    g = torch.Generator().manual_seed(0)
    V = 32 * 5 + 7
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, 6), dtype=torch.int32, generator=g)
    want = torch.tensor(
        [
            [0.0 if (int(bitmask[r, t // 32]) >> (t % 32)) & 1 else float("-inf") for t in range(V)]
            for r in range(3)
        ]
    )
    assert torch.equal(mask_bias(bitmask, V), want)


def test_token_bytes_spell_the_text(tokenizer):
    vocab, special = token_bytes(tokenizer)
    text = "def f(x):\n\treturn 语言 😀 café"
    assert b"".join(vocab[i] for i in tokenizer.encode(text)).decode() == text
    assert tokenizer.eot_id in special and vocab[tokenizer.eot_id] == b""


@pytest.mark.parametrize("family", ["gpt2"])
def test_generate_cli_grammar(run_cli, tiny_checkpoint):
    spec = json.dumps({"type": "regex", "pattern": "[0-9]{2,4}"})
    p = run_cli(
        "generate",
        "-m",
        str(tiny_checkpoint),
        "-p",
        "n =",
        "--grammar",
        spec,
        "--json",
        "--seed",
        "0",
        "--n",
        "3",
        check=True,
    )
    comps = json.loads(p.stdout)["completions"]
    assert len(comps) == 3 and all(re.fullmatch("[0-9]{2,4}", c["text"]) for c in comps), comps
    bad = run_cli(
        "generate", "-m", str(tiny_checkpoint), "-p", "x", "--grammar", '{"type": "regex", "pattern": "a("}'
    )
    assert (
        bad.returncode != 0
        and bad.stderr.startswith("error: invalid regex grammar")
        and "Traceback" not in bad.stderr
    )
