"""Task pipelines (yuyan.apps) and `yuyan run`: templates checked against the no-cache greedy oracle,
label-word sentiment against a direct forward pass, the head path, clear errors, every task on the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tests.conftest import cli_in_process, tiny_config

from yuyan import apps
from yuyan.errors import UserError
from yuyan.generate.engine import generate_naive
from yuyan.model.checkpoint import LanguageModel, save_checkpoint
from yuyan.model.heads import Classifier
from yuyan.model.transformer import Transformer
from yuyan.tokenizer import EOT, Tokenizer


@pytest.fixture(scope="module")
def plain_tokenizer(texts) -> Tokenizer:
    return Tokenizer.train(texts, vocab_size=512, special_tokens=[EOT])  # no chat role tokens: a "base model"


def _lm(tokenizer, family="gpt2", seed=0) -> LanguageModel:
    torch.manual_seed(seed)
    model = Transformer(tiny_config(family, vocab_size=tokenizer.vocab_size, block_size=256)).eval()
    return LanguageModel(model, tokenizer, "memory")


def _oracle(lm, prompt_ids, n, stop_ids, stop_strings=()) -> str:
    out = generate_naive(lm.model, prompt_ids, n, stop_token_ids=set(stop_ids))
    if out and out[-1] in stop_ids:
        out = out[:-1]
    text = lm.tokenizer.decode(out)
    for s in stop_strings:
        text = text.split(s)[0]
    return text.strip()


def test_plain_templates_match_the_greedy_oracle(plain_tokenizer):
    lm = _lm(plain_tokenizer, "llama")
    tok, eot = lm.tokenizer, [lm.tokenizer.eot_id]
    assert not apps.pipelines.has_chat(lm)
    text = "The cat sat on the mat. It was warm."
    assert apps.summarize(lm, text, max_new_tokens=10) == _oracle(
        lm, tok.encode(text + "\n\nTL;DR:"), 10, eot, ["\n\n"]
    )
    assert apps.translate(lm, "hello", target="French", max_new_tokens=8) == _oracle(
        lm, tok.encode("English: hello\nFrench:"), 8, eot, ["\n"]
    )
    assert apps.qa(lm, "Where?", context="On the mat.", max_new_tokens=8) == _oracle(
        lm, tok.encode("Context: On the mat.\nQuestion: Where?\nAnswer:"), 8, eot, ["\n"]
    )
    code = apps.code(lm, "def add(a, b):", max_new_tokens=12, temperature=0.0)
    ref_ids = generate_naive(lm.model, tok.encode("def add(a, b):"), 12, stop_token_ids=set(eot))
    ref = tok.decode([t for t in ref_ids if t not in eot])
    for s in apps.pipelines.CODE_STOPS:
        ref = ref.split(s)[0]
    assert code == ref
    batch = apps.summarize(lm, [text, "Another one."], max_new_tokens=6)
    assert isinstance(batch, list) and len(batch) == 2
    # a plain-text chat on a base model uses "User:/Assistant:" markers and stops at the next "User:"
    reply = apps.chat(lm, "hi", max_new_tokens=6, temperature=0.0)
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)[0]
    assert reply == _oracle(lm, ids, 6, tok.chat_stop_ids, ["\nUser:", "\nSystem:"])


def test_chat_templates_match_the_greedy_oracle(tokenizer):
    lm = _lm(tokenizer)
    tok = lm.tokenizer
    assert apps.pipelines.has_chat(lm)
    stop = tok.chat_stop_ids
    user = apps.TEMPLATES["summarize"]["chat"].format(text="Some text.")
    ids = tok.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True)[0]
    assert apps.summarize(lm, "Some text.", max_new_tokens=8) == _oracle(lm, ids, 8, stop)
    msgs = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "你好"},
    ]
    ids = tok.apply_chat_template(
        [{"role": "system", "content": "be kind"}, *msgs], add_generation_prompt=True
    )[0]
    assert apps.chat(lm, msgs, system="be kind", max_new_tokens=8, temperature=0.0) == _oracle(
        lm, ids, 8, stop
    )
    out = apps.generate(lm, "def", max_new_tokens=5, temperature=1.0, seed=3)
    assert out == apps.generate(
        lm, "def", max_new_tokens=5, temperature=1.0, seed=3
    )  # seeded sampling repeats


def test_sentiment_by_label_words_matches_a_direct_forward(plain_tokenizer):
    lm = _lm(plain_tokenizer, "gpt2", seed=1)
    tok = lm.tokenizer
    text = "what a lovely day"
    label, probs = apps.sentiment(lm, text)
    prompt = tok.encode(f"Text: {text}\nSentiment (positive or negative):")
    ref = []
    for w in ["positive", "negative"]:
        wid = tok.encode(" " + w)
        with torch.no_grad():
            logp = F.log_softmax(lm.model(torch.tensor([prompt + wid]))[0], -1)
        ref.append(sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(wid)))
    expected = torch.tensor(ref).softmax(0)
    assert probs["positive"] == pytest.approx(float(expected[0]), abs=1e-5)
    assert label == ("positive" if expected[0] > expected[1] else "negative")
    many = apps.sentiment(lm, ["good", "坏"], labels=["好", "坏", "一般"])
    assert len(many) == 2 and all(
        set(p) == {"好", "坏", "一般"} and abs(sum(p.values()) - 1) < 1e-5 for _, p in many
    )


def test_sentiment_uses_a_trained_head(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size))
    clf = Classifier(model, ["neg", "pos"], "mean", tokenizer)
    torch.nn.init.normal_(clf.score.weight)
    ck = save_checkpoint(
        tmp_path / "clf", model, tokenizer, meta=clf.head_meta(), extra_tensors=clf.head_tensors()
    )
    got = apps.sentiment(str(ck), ["fine", "bad"])
    assert [g[0] for g in got] == [p[0] for p in clf.eval().predict(["fine", "bad"])]
    assert got[0][1] == pytest.approx(clf.predict(["fine"])[0][1])
    with pytest.raises(UserError, match="is a classifier"):
        apps.summarize(str(ck), "text")
    with pytest.raises(UserError, match="drop --labels"):
        apps.sentiment(str(ck), "x", labels=["a", "b"])


def test_pipeline_errors_are_clear(tokenizer, plain_tokenizer):
    lm = _lm(tokenizer)
    with pytest.raises(UserError, match="longer than the context"):
        apps.summarize(lm, "word " * 400)
    with pytest.raises(UserError, match="too long"):
        apps.sentiment(_lm(plain_tokenizer), "word " * 400)
    with pytest.raises(UserError, match="empty"):
        apps.qa(lm, "   ")
    with pytest.raises(UserError, match="end with a user message"):
        apps.chat(lm, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    with pytest.raises(UserError, match="two non-empty label words"):
        apps.sentiment(lm, "x", labels=["only"])
    with pytest.raises(UserError, match="languages"):
        apps.translate(lm, "x", target=" ")


def test_every_task_on_the_cli(tmp_path, tokenizer, run_cli, capsys, monkeypatch):
    torch.manual_seed(0)
    ck = save_checkpoint(
        tmp_path / "m",
        Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size, block_size=256)),
        tokenizer,
    )
    common = ["--model", ck, "--max-new-tokens", "6", "--temperature", "0"]
    for task, extra in [
        ("generate", ["--prompt", "def"]),
        ("summarize", ["--prompt", "A long story."]),
        ("translate", ["--prompt", "hello", "--target", "French"]),
        ("qa", ["--prompt", "Who?", "--context", "Lu Xun wrote it."]),
        ("code", ["--prompt", "def f(x):"]),
        ("chat", ["--prompt", "hi", "--system", "be brief"]),
    ]:
        code, out, err = cli_in_process(capsys, "run", task, *common, *extra, "--json")
        assert code == 0, (task, err)
        assert json.loads(out.strip().splitlines()[-1])["task"] == task
    code, out, _ = cli_in_process(
        capsys, "run", "chat", *common, stdin="hello\n\nhow are you?\n", monkeypatch=monkeypatch
    )
    assert code == 0 and out.count("assistant:") == 2
    f = tmp_path / "reviews.txt"
    f.write_text("great film\n很差\n", encoding="utf-8")
    code, out, _ = cli_in_process(capsys, "run", "sentiment", "--model", ck, "--file", f, "--json")
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and [r["text"] for r in rows] == ["great film", "很差"]
    assert all(r["label"] in ("positive", "negative") for r in rows)
    code, out, _ = cli_in_process(capsys, "run", "--help")
    assert code == 0 and "Examples" in out
    # through the real entry point: output, and one-line errors with status 2
    p = run_cli("run", "summarize", *common, "--prompt", "A story.")
    assert p.returncode == 0 and p.stdout.strip() == apps.summarize(str(ck), "A story.", max_new_tokens=6)
    bad = run_cli("run", "poem", "--model", ck, "--prompt", "x")
    assert bad.returncode == 2 and "error: unknown task" in bad.stderr
    long = run_cli("run", "summarize", "--model", ck, "--prompt", "word " * 400)
    assert long.returncode == 2 and "context" in long.stderr and "Traceback" not in long.stderr


def test_both_chat_commands_drive_the_one_loop(tmp_path, tokenizer, capsys, monkeypatch):
    torch.manual_seed(0)
    ck = save_checkpoint(
        tmp_path / "m", Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size)), tokenizer
    )
    script = "hello\n/reset\nhi\n/exit\nnot read\n"
    opts = ["--model", ck, "--max-new-tokens", "6", "--temperature", "0", "--system", "be brief"]
    code, chat_out, err = cli_in_process(capsys, "chat", *opts, stdin=script, monkeypatch=monkeypatch)
    assert code == 0, err
    code, run_out, err = cli_in_process(capsys, "run", "chat", *opts, stdin=script, monkeypatch=monkeypatch)
    assert code == 0, err
    assert chat_out == run_out
    lines = chat_out.splitlines()
    assert lines[1] == "(history cleared)" and len(lines) == 3
    # after /reset the reply is a fresh conversation's, and the reply is the one-shot pipeline's
    assert lines[2] == "assistant: " + apps.chat(
        str(ck), "hi", system="be brief", max_new_tokens=6, temperature=0
    )
    assert lines[0] == "assistant: " + apps.chat(
        str(ck), "hello", system="be brief", max_new_tokens=6, temperature=0
    )


def test_conversation_trims_the_oldest_turns(tokenizer):
    lm = _lm(tokenizer)  # block_size 256
    cfg = apps.task_config("chat", {"max_new_tokens": 8, "temperature": 0.0})
    conv = apps.Conversation(lm, cfg, system="be kind")
    for i in range(30):
        reply = "".join(conv.send(f"message number {i} with some words in it"))
        assert conv.messages[-1] == {"role": "assistant", "content": reply.strip()}
        assert len(conv.prompt()) <= 256 - 8  # the next reply always has room
    assert conv.messages[0] == {"role": "system", "content": "be kind"}
    assert conv.messages[1]["role"] == "user" and len(conv.messages) < 61  # old turns went, whole
    assert conv.messages[-2]["content"] == "message number 29 with some words in it"
    conv.reset()
    assert conv.messages == [{"role": "system", "content": "be kind"}]
    # a turn too long for the context alone is refused and leaves the history as it was
    with pytest.raises(UserError, match="context"):
        list(conv.send("word " * 400))
    assert conv.messages == [{"role": "system", "content": "be kind"}]


def test_chat_repl_goes_on_after_a_failed_turn(tokenizer, capsys):
    import io

    lm = _lm(tokenizer)
    conv = apps.Conversation(lm, apps.task_config("chat", {"max_new_tokens": 4, "temperature": 0.0}))
    out = io.StringIO()
    apps.repl(conv, io.StringIO("word " * 400 + "\nhi\n"), out, as_json=True)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert rows == [{"role": "assistant", "content": apps.chat(lm, "hi", max_new_tokens=4, temperature=0)}]
    assert "error:" in capsys.readouterr().err


def test_settings_a_task_cannot_use_are_refused(tokenizer, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # rich cuts long option names in a narrow terminal
    lm = _lm(tokenizer)
    with pytest.raises(UserError, match="sets n itself"):
        apps.summarize(lm, "text", n=2)
    with pytest.raises(UserError, match="unknown generation settings"):
        apps.code(lm, "def f", temprature=0)
    ck = save_checkpoint(tmp_path / "m", lm.model, tokenizer)
    code, _, err = cli_in_process(
        capsys, "run", "sentiment", "--model", ck, "--prompt", "good", "--temperature", "0"
    )
    assert code == 2 and "drop --temperature" in err
    code, _, err = cli_in_process(capsys, "run", "summarize", "--model", ck, "--prompt", "x", "--system", "s")
    assert code == 2 and "summarize does not take --system" in err
    code, out, _ = cli_in_process(capsys, "run", "--help")
    assert code == 0 and "--frequency-penalty" in out and "--logprobs" not in out
