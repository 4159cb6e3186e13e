"""Tokenizer: exact round trip (hypothesis), HF GPT-2- and Llama-style tokenizer.json folders (compared with
transformers' own fast tokenizer), streaming decode, chat template mask, bad input and the CLI commands."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from yuyan.errors import UserError
from yuyan.tokenizer import CHAT_TOKENS, EOT, Tokenizer

TRICKY = [
    "",
    "语言模型是一种概率模型。",
    "emoji 😀👩‍👩‍👧 mixed 中文 and English — café",
    "def f(x):\r\n\treturn x  \r\n",
    "trailing spaces   \n\t\t\n",
    "nul \x00 byte and \x01\x7f controls",
    "<|endoftext|> is special",
    "𠀀𪚥 rare CJK, Ω≈ç√, عربى, हिन्दी",
]


@settings(max_examples=300, deadline=None)
@given(st.text())
@example("\r\n")
@example("\x00")
@example(" \t \n")
@example("龘😀")
def test_round_trip_any_unicode(tokenizer, s):
    assert tokenizer.decode(tokenizer.encode(s)) == s


@pytest.mark.parametrize("s", TRICKY)
def test_round_trip_tricky(tokenizer, s):
    ids = tokenizer.encode(s)
    assert tokenizer.decode(ids) == s
    assert tokenizer.encode_batch([s, s]) == [ids, ids]


def test_save_load_same_ids_and_fingerprint(tokenizer, tmp_path):
    tokenizer.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.fingerprint == tokenizer.fingerprint
    assert back.encode(TRICKY[2]) == tokenizer.encode(TRICKY[2])
    assert back.eot_id == tokenizer.token_to_id(EOT)
    assert set(back.chat_ids) == set(CHAT_TOKENS)


def _gpt2_style(texts) -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|endoftext|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return tok


def _llama_style(texts) -> HFTokenizer:
    """SentencePiece-like BPE as in Llama 2's tokenizer.json: '▁' for spaces, byte fallback <0xNN>."""
    base = HFTokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator(
        texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    )
    spec = json.loads(base.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = HFTokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_loads_hf_tokenizer_json_folder(style, texts, tmp_path):
    from transformers import PreTrainedTokenizerFast

    hf = (_gpt2_style if style == "gpt2" else _llama_style)(texts[:10])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = Tokenizer.load(tmp_path)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    samples = ["def main():\n    return 42", "Hello 世界 😀 tabs\tand  spaces", "x\r\ny"]
    for s in samples:
        ids = tok.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids) == s
    if style == "gpt2":
        assert tok.eot_id == hf.token_to_id("<|endoftext|>")
    else:
        assert (tok.eot_id, tok.bos_id) == (hf.token_to_id("</s>"), hf.token_to_id("<s>"))
        assert any(hf.id_to_token(i).startswith("<0x") for i in tok.encode("😀"))  # byte fallback in use
    # no chat tokens: the plain-text template, assistant turns end with the EOT token
    ids, mask = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    )
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert learned == tok.encode("yo") + tok.encode("\n") + [tok.eot_id]


def _stream_pieces(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = tok.stream()
    pieces = [dec.push(i) for i in ids]
    return [p for p in pieces if p] + [dec.flush()]


@pytest.mark.parametrize("style", ["ours", "llama"])
def test_stream_decode_never_breaks_a_character(style, tokenizer, texts):
    tok = tokenizer if style == "ours" else Tokenizer(_llama_style(texts[:10]))
    s = "print('龘𠀀 语言 😀') # café ok\n  spaced  words"
    ids = tok.encode(s)
    # some character really is split across tokens (else the test would prove nothing)
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces = _stream_pieces(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == s
    assert "".join(tok.stream()(ids)) == s


def test_chat_template_mask_covers_assistant_content_and_end(tokenizer):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4 四"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ids, mask = tokenizer.apply_chat_template(msgs)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    end = tokenizer.token_to_id("<|end|>")
    learned = [i for i, m in zip(ids, mask, strict=True) if m]
    assert learned == tokenizer.encode("4 四") + [end] + tokenizer.encode("6") + [end]
    a = tokenizer.token_to_id("<|assistant|>")
    assert all(m == 0 for i, m in zip(ids, mask, strict=True) if i == a)  # role markers are not learned
    assert tokenizer.decode(ids) == (
        "<|system|>be brief<|end|><|user|>2+2?<|end|><|assistant|>4 四<|end|><|user|>and 3+3?<|end|><|assistant|>6<|end|>"
    )
    gen, gmask = tokenizer.apply_chat_template(msgs[:2], add_generation_prompt=True)
    assert gen[-1] == a and gmask[-1] == 0
    with pytest.raises(UserError):
        tokenizer.apply_chat_template([{"role": "robot", "content": "x"}])


def test_bad_inputs(tmp_path, texts):
    with pytest.raises(UserError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train(texts[:2], vocab_size=200)


def test_tokenizer_cli(run_cli, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"f{i}.txt").write_text(f"文本 {i}: the quick brown fox {i * 7} jumps\n" * 40)
    out = tmp_path / "tok"
    r = run_cli("tokenizer", "train", "--corpus", corpus, "--vocab-size", 300, "--out", out, check=True)
    assert "trained vocab 300" in r.stdout and "bytes/token" in r.stdout
    r = run_cli("tokenizer", "encode", "--tokenizer", out, "--", "fox 文本 😀", check=True)
    ids = r.stdout.split()
    tok = Tokenizer.load(out)
    assert list(map(int, ids)) == tok.encode("fox 文本 😀")
    r = run_cli("tokenizer", "decode", "--tokenizer", out, *ids, check=True)
    assert r.stdout == "fox 文本 😀"
    r = run_cli("tokenizer", "info", "--tokenizer", out, "--corpus", corpus, "--split", "all", check=True)
    assert "vocab size: 300" in r.stdout and "bytes/token on" in r.stdout
    r = run_cli("tokenizer", "encode", "--tokenizer", tmp_path / "nope", "x")
    assert (
        r.returncode == 2 and r.stderr.startswith("error: no tokenizer.json") and "Traceback" not in r.stderr
    )
