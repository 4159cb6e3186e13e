"""Generation engine: cached vs uncached logits, HF generate/beam-search parity, batching, seeds, stops,
streaming, sliding window, logprobs."""

from __future__ import annotations

import pytest
import torch
from tests.conftest import tiny_config

from yuyan.errors import UserError
from yuyan.generate import Completion, GenerationConfig, generate, generate_naive, stream
from yuyan.generate.engine import decoder
from yuyan.model.transformer import Transformer

GREEDY = dict(temperature=0, stop_token_ids=[])


def _model(family: str, **kw) -> Transformer:
    torch.manual_seed(0)
    return Transformer(tiny_config(family, **kw)).eval()


# --------------------------------------------------------------------------- Hugging Face reference models
def _hf_pair(family: str, vocab: int = 96, block: int = 64):
    """A tiny random transformers model and ours with the same weights."""
    import transformers

    torch.manual_seed(0)
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(
            transformers.GPT2Config(
                vocab_size=vocab,
                n_positions=block,
                n_embd=32,
                n_layer=2,
                n_head=4,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
            )
        ).eval()
        ours = Transformer(tiny_config("gpt2", vocab_size=vocab, block_size=block)).eval()
    else:
        hf = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(
                vocab_size=vocab,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=block,
                rms_norm_eps=1e-5,
                bos_token_id=0,
                eos_token_id=0,
                pad_token_id=0,
            )
        ).eval()
        ours = Transformer(tiny_config("llama", vocab_size=vocab, block_size=block)).eval()
    _load_hf_weights(ours, hf, family)
    return hf, ours


def _load_hf_weights(ours: Transformer, hf, family: str) -> None:
    from yuyan.model.hf import hf_to_ours

    missing, unexpected = ours.load_state_dict(
        hf_to_ours(hf.state_dict(), ours, family, "test"), strict=False
    )
    assert (
        not unexpected and set(missing) <= {"lm_head.weight"} and (not missing or ours.lm_head_weight_tied())
    )


def test_cached_logits_equal_uncached(family):
    model = _model(family)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3], [20, 21, 22, 23]]
    seen = []
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=12, **GREEDY))
    core, rows = decoder(model, None, prompts, cfg)
    every = [r for rs in rows for r in rs]
    while core.rows:
        seen.append(([every.index(r) for r in core.rows], core.logits.clone()))
        core.step()
    final = every
    assert len(seen) == 12
    with torch.no_grad():
        for step, (live, logits) in enumerate(seen):
            for i, rid in enumerate(live):
                seq = final[rid].tokens[: len(prompts[rid]) + step]
                ref = model(torch.tensor([seq]))[0, -1]
                torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=0)


def test_greedy_matches_transformers(family):
    hf, ours = _hf_pair(family)
    prompt = [5, 17, 33, 2, 41, 9]
    ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt) :].tolist()
    got = generate(ours, None, [prompt], GenerationConfig.from_dict(dict(max_new_tokens=20, **GREEDY)))[0][0]
    assert got.token_ids == ref and got.finish_reason == "length"
    assert generate_naive(ours, prompt, 20) == ref


@pytest.mark.parametrize("early_stopping,length_penalty", [(False, 1.0), (True, 0.5), ("never", 2.0)])
def test_beam_search_matches_transformers(early_stopping, length_penalty):
    hf, ours = _hf_pair("llama", vocab=48)
    prompt = [5, 17, 33, 2, 41, 9]
    # the most likely first continuations become end-of-sequence tokens so that beams finish early
    eos = generate(ours, None, [prompt], GenerationConfig.from_dict(dict(max_new_tokens=3, **GREEDY)))[0][
        0
    ].token_ids[1:3]
    kw = dict(num_beams=4, max_new_tokens=10, length_penalty=length_penalty, early_stopping=early_stopping)
    ref = hf.generate(
        torch.tensor([prompt]),
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos[0],
        num_return_sequences=2,
        **kw,
    )[:, len(prompt) :].tolist()
    got = generate(
        ours, None, [prompt], GenerationConfig.from_dict(dict(temperature=0, stop_token_ids=eos, n=2, **kw))
    )[0]
    for r, g in zip(ref, got, strict=True):
        r = [t for t in r]
        while r and r[-1] == eos[0] and len(r) > len(g.token_ids) + (g.finish_reason == "stop"):
            r.pop()  # HF right-pads shorter beams with the pad (= eos) token
        expect = g.token_ids + ([r[-1]] if g.finish_reason == "stop" else [])
        assert r == expect


def test_beam_search_without_eos_matches_transformers():
    hf, ours = _hf_pair("gpt2")
    prompts = [[5, 17, 33, 2, 41, 9], [7, 8]]
    got = generate(
        ours, None, prompts, GenerationConfig.from_dict(dict(num_beams=4, max_new_tokens=8, **GREEDY))
    )
    for p, g in zip(prompts, got, strict=True):
        ref = hf.generate(
            torch.tensor([p]),
            do_sample=False,
            num_beams=4,
            max_new_tokens=8,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(p) :].tolist()
        assert g[0].token_ids == ref


def test_batched_prompts_equal_alone(family):
    model = _model(family)
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [40], [11, 12, 13]]
    for cfg in (
        GenerationConfig.from_dict(dict(max_new_tokens=10, **GREEDY)),
        GenerationConfig.from_dict(
            dict(max_new_tokens=10, temperature=0.9, top_k=20, seed=3, stop_token_ids=[])
        ),
    ):
        batched = generate(model, None, prompts, cfg)
        for p, b in zip(prompts, batched, strict=True):
            assert b[0].token_ids == generate(model, None, [p], cfg)[0][0].token_ids


def test_seeds_reproducible_and_n_samples():
    model = _model("gpt2")
    cfg = GenerationConfig.from_dict(
        dict(max_new_tokens=12, temperature=1.5, n=3, seed=11, stop_token_ids=[])
    )
    a = generate(model, None, [[1, 2, 3]], cfg)[0]
    b = generate(model, None, [[1, 2, 3]], cfg)[0]
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    assert len({tuple(c.token_ids) for c in a}) == 3  # the n samples differ
    other = generate(model, None, [[1, 2, 3]], cfg.with_sampling(seed=12))[0]
    assert [c.token_ids for c in other] != [c.token_ids for c in a]


def test_sliding_window_runs_past_context(family):
    model = _model(family, block_size=16)
    prompt = list(range(1, 21))  # longer than the context: truncated from the left
    with pytest.warns(UserWarning, match="truncated"):
        got = generate(
            model, None, [prompt, [3, 4]], GenerationConfig.from_dict(dict(max_new_tokens=64, **GREEDY))
        )
    assert [len(g[0].token_ids) for g in got] == [64, 64]
    assert got[0][0].token_ids == generate_naive(model, prompt, 64)
    assert got[1][0].token_ids == generate_naive(model, [3, 4], 64)
    no_window = generate(
        model,
        None,
        [[3, 4]],
        GenerationConfig.from_dict(dict(max_new_tokens=64, sliding_window=False, **GREEDY)),
    )
    assert len(no_window[0][0].token_ids) == 15 and no_window[0][0].finish_reason == "length"
    with pytest.raises(UserError, match="longer than the context"):
        generate(model, None, [prompt], GenerationConfig.from_dict(dict(context_overflow="error", **GREEDY)))


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_k=-2),
        dict(n=0),
        dict(min_p=2),
        dict(num_beams=0),
        dict(num_beams=2, n=3),
        dict(context_overflow="x"),
        dict(num_beams=2, top_k=5),
    ],
)
def test_invalid_settings_raise(kw):
    with pytest.raises(UserError):
        generate(_model("gpt2"), None, [[1]], GenerationConfig.from_dict(dict(**kw)))


# --------------------------------------------------------------------------- text: stops, streaming, logprobs
def test_stop_strings_and_tokens(tokenizer):
    model = _model("gpt2", vocab_size=tokenizer.vocab_size)
    base = generate(
        model, tokenizer, ["def f"], GenerationConfig.from_dict(dict(max_new_tokens=30, **GREEDY))
    )[0][0]
    assert len(base.text) > 6
    stop = base.text[3:6]
    cut = generate(
        model,
        tokenizer,
        ["def f"],
        GenerationConfig.from_dict(dict(max_new_tokens=30, stop=[stop], **GREEDY)),
    )[0][0]
    assert cut.text == base.text[: base.text.find(stop)] and cut.finish_reason == "stop"
    pieces = list(
        stream(
            model,
            tokenizer,
            "def f",
            GenerationConfig.from_dict(dict(max_new_tokens=30, stop=[stop], **GREEDY)),
        )
    )
    assert "".join(pieces) == cut.text and all(stop not in p for p in pieces)
    tid = base.token_ids[4]
    by_id = generate(
        model,
        tokenizer,
        ["def f"],
        GenerationConfig.from_dict(dict(max_new_tokens=30, temperature=0, stop_token_ids=[tid])),
    )[0][0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == base.token_ids[: base.token_ids.index(tid)]


class _Scripted(Transformer):
    """A test double whose greedy continuation is a fixed token sequence: logits favour script[pos + 1]."""

    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__(tiny_config("gpt2", vocab_size=vocab_size, block_size=256))
        self.script = script
        self.lm_head = torch.nn.Identity()

    def hidden(self, idx, pos=None, cache=None, **kw):
        B, T = idx.shape
        if pos is None:
            start = cache.lengths[:, None] if cache is not None else 0
            pos = start + torch.arange(T)[None, :].expand(B, T)
        nxt = torch.tensor(self.script + [0])[(pos + 1).clamp(max=len(self.script))]
        return torch.nn.functional.one_hot(nxt, self.config.vocab_size).float() * 10


def test_stream_chinese_whole_characters(tokenizer):
    prompt, answer = "语言模型", "是一种概率模型。我们用它来生成文本、翻译和回答问题。"
    p_ids, a_ids = tokenizer.encode(prompt), tokenizer.encode(answer)
    assert len(a_ids) > len(answer) // 2  # many characters span several byte-level tokens
    model = _Scripted(tokenizer.vocab_size, p_ids + a_ids).eval()
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=len(a_ids), **GREEDY))
    full = generate(model, tokenizer, [prompt], cfg)[0][0]
    assert full.token_ids == a_ids and full.text == answer
    pieces = list(stream(model, tokenizer, prompt, cfg))
    assert "".join(pieces) == answer and len(pieces) > 5
    assert all("\ufffd" not in p for p in pieces)
    # a stop string in the middle: cut there, and no piece ever shows its beginning
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=len(a_ids), stop=["生成文"], **GREEDY))
    pieces = list(stream(model, tokenizer, prompt, cfg))
    assert (
        "".join(pieces)
        == answer[: answer.index("生成文")]
        == generate(model, tokenizer, [prompt], cfg)[0][0].text
    )
    assert not any("生" in p for p in pieces)


def test_logprobs_reported(family):
    model = _model(family)
    out = generate(
        model, None, [[1, 2, 3]], GenerationConfig.from_dict(dict(max_new_tokens=5, logprobs=3, **GREEDY))
    )[0][0]
    assert isinstance(out, Completion) and len(out.logprobs) == 5
    with torch.no_grad():
        seq = [1, 2, 3]
        for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
            ref = model(torch.tensor([seq]))[0, -1].log_softmax(-1)
            assert lp.token_id == tok and abs(lp.logprob - float(ref[tok])) < 1e-5
            assert [t for t, _, _ in lp.top] == ref.topk(3).indices.tolist()
            seq.append(tok)


def test_logprobs_include_the_stop_token(family):
    """A row that ends on a stop id reports that token's logprob last (vLLM and OpenAI do; lm_eval's
    local-completions reads the last entry as the sampled token's), though its id is not in token_ids."""
    model = _model(family)
    free = generate(model, None, [[1, 2, 3]], GenerationConfig.from_dict(dict(max_new_tokens=6, **GREEDY)))
    stop_id = free[0][0].token_ids[3]  # greedy's 4th token, made a stop id
    cfg = GenerationConfig.from_dict(
        dict(max_new_tokens=6, logprobs=2, temperature=0, stop_token_ids=[stop_id])
    )
    out = generate(model, None, [[1, 2, 3]], cfg)[0][0]
    first = free[0][0].token_ids.index(stop_id)
    assert out.finish_reason == "stop" and out.token_ids == free[0][0].token_ids[:first]
    assert [e.token_id for e in out.logprobs] == out.token_ids + [stop_id]
    with torch.no_grad():
        ref = model(torch.tensor([[1, 2, 3, *out.token_ids]]))[0, -1].log_softmax(-1)
    assert abs(out.logprobs[-1].logprob - float(ref[stop_id])) < 1e-5


def test_penalties_change_greedy_output():
    model = _model("gpt2")
    plain = generate(model, None, [[1, 2]], GenerationConfig.from_dict(dict(max_new_tokens=20, **GREEDY)))[0][
        0
    ].token_ids
    pen = generate(
        model,
        None,
        [[1, 2]],
        GenerationConfig.from_dict(dict(max_new_tokens=20, repetition_penalty=50.0, **GREEDY)),
    )[0][0].token_ids
    assert len(set(pen)) == 20 and 1 not in pen and 2 not in pen  # nothing seen may repeat
    assert len(set(plain)) < 20


@pytest.mark.parametrize("kernel", ["on", "off"])
def test_decode_layout_keeps_values_outputs_training_and_checkpoints(
    tmp_path, tokenizer, kernel, monkeypatch, request
):
    """generate() swaps in DecodeLinear (the decode kernel) or, without the kernel, stores linear weights
    column-major for MKL's skinny products; nothing else may change."""
    from yuyan.generate import kernels
    from yuyan.generate.kernels import decode_layout
    from yuyan.model.checkpoint import load_checkpoint, save_checkpoint

    if kernel == "on":
        request.getfixturevalue("decode_kernel")  # skips off x86-64 Linux, fails if it does not build
    else:
        monkeypatch.setattr(kernels, "_state", {"op": None})
    layout = (lambda w: w.is_contiguous()) if kernel == "on" else (lambda w: w.stride() == (1, w.shape[0]))
    model = _model("gpt2", vocab_size=tokenizer.vocab_size)
    ref = _model("gpt2", vocab_size=tokenizer.vocab_size)
    ref.load_state_dict(model.state_dict())
    x = torch.randint(0, model.config.vocab_size, (2, 12))
    before = model(x)
    decode_layout(model)
    w = model.layers[0].mlp.up_proj.weight
    assert w.shape == ref.layers[0].mlp.up_proj.weight.shape and layout(w)
    assert (type(model.lm_head) is kernels.DecodeLinear) == (kernel == "on")
    assert model.lm_head.weight is model.embed_tokens.weight  # still tied
    assert all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values(), strict=True)
    )
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=10, **GREEDY))
    assert generate(model, None, [[1, 2, 3]], cfg)[0][0].token_ids == generate_naive(ref, [1, 2, 3], 10)
    decode_layout(model)  # idempotent
    assert layout(model.layers[0].mlp.up_proj.weight)
    # it still trains to the same gradients, and saves and loads
    for m in (model, ref):
        m.train()
        m(x, targets=torch.roll(x, -1, 1)).backward()
    for (n, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-4, msg=n)
    save_checkpoint(tmp_path / "ck", model, tokenizer)
    loaded = load_checkpoint(tmp_path / "ck")
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.model.state_dict().values(), ref.state_dict().values(), strict=True)
    )


def test_stream_releases_held_back_text_at_the_end(tokenizer):
    prompt, answer = "语言模型", "是一种概率模型。"
    p_ids, a_ids = tokenizer.encode(prompt), tokenizer.encode(answer)
    model = _Scripted(tokenizer.vocab_size, p_ids + a_ids).eval()
    cfg = GenerationConfig.from_dict(
        dict(max_new_tokens=len(a_ids), stop=["。Z"], **GREEDY)
    )  # the text ends with a stop prefix
    assert (
        "".join(stream(model, tokenizer, prompt, cfg))
        == answer
        == generate(model, tokenizer, [prompt], cfg)[0][0].text
    )


def _speculate(model, draft, prompts, cfg) -> list:
    """Run prompts to the end through a core that drafts with `draft`; the rows, prompt by prompt."""
    from yuyan.generate.core import Decoder
    from yuyan.generate.speculative import Speculator

    capacity = max(map(len, prompts)) + cfg.max_new_tokens + cfg.speculative + 1
    core = Decoder(model, None, len(prompts), capacity, Speculator(draft, cfg.speculative))
    rows = [rs[0] for rs in core.admit(prompts, [cfg] * len(prompts))]
    while core.rows:
        core.step()
    return rows


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_speculative_decoding_equals_plain_greedy(family):
    """Drafting k tokens with the int8 copy (mostly accepted) or with an unrelated model (mostly rejected)
    and verifying them in one pass gives exactly the plain greedy tokens and finish reasons, for ragged
    batched prompts, stop tokens hit at different steps, and max_new_tokens inside a round."""
    from yuyan.generate import speculative

    model = _model(family)
    torch.manual_seed(1)
    unrelated = Transformer(tiny_config(family)).eval()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    free = generate(model, None, prompts, GenerationConfig.from_dict(dict(max_new_tokens=24, **GREEDY)))
    stops = [[], [free[1][0].token_ids[6], free[0][0].token_ids[10]]]
    for stop in stops:
        for most in (1, 7, 24):
            cfg = GenerationConfig.from_dict(dict(max_new_tokens=most, temperature=0, stop_token_ids=stop))
            want = [(c[0].token_ids, c[0].finish_reason) for c in generate(model, None, prompts, cfg)]
            if stop and most == 24:  # the stop tokens really end rows
                assert [r for _, r in want].count("stop") >= 2
            for draft in (speculative.int8_draft(model), unrelated):
                for k in (1, 2, 4):
                    cfg.speculative = k
                    rows = _speculate(model, draft, prompts, cfg)
                    got = [(c.token_ids, c.finish_reason) for c in (r.completion() for r in rows)]
                    assert got == want, (stop, most, k)
    # generate() uses it when asked and it applies; sampling, or no room in the context, decode normally
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=10, speculative=3, **GREEDY))
    assert speculative.usable(model, prompts, cfg)
    assert generate(model, None, prompts, cfg)[1][0].token_ids == free[1][0].token_ids[:10]
    assert not speculative.usable(
        model, prompts, GenerationConfig.from_dict(dict(max_new_tokens=10, speculative=3))
    )
    assert not speculative.usable(
        model, prompts, GenerationConfig.from_dict(dict(max_new_tokens=60, speculative=3, **GREEDY))
    )
    with pytest.raises(UserError, match="speculative"):
        GenerationConfig.from_dict(dict(speculative=-1)).validate()


def test_nonfinite_logits_are_the_models_fault_not_the_requests(tokenizer):
    import time

    from yuyan.generate.scheduler import Failed, Scheduler

    model = Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size)).eval()
    # weights that overflow on some inputs: the head's output turns nan on every decode step after the prompt
    model.lm_head.register_forward_hook(lambda m, i, out: out * float("nan") if i[0].shape[-2] == 1 else out)
    ids = tokenizer.encode("import os")
    cfg = GenerationConfig.from_dict(dict(max_new_tokens=4, **GREEDY))
    with pytest.raises(UserError, match="model produced non-finite logits"):
        generate(model, tokenizer, [ids], cfg)
    events: list = []
    with Scheduler(model, tokenizer, max_batch=2, max_queue=2) as s:
        s.submit(ids, cfg, emit=events.append)
        deadline = time.time() + 30
        while not any(isinstance(e, Failed) for e in events) and time.time() < deadline:
            time.sleep(0.01)
    failed = next(e for e in events if isinstance(e, Failed))
    assert "non-finite logits" in failed.message and not failed.invalid  # a 500, not the client's temperature
