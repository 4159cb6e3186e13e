"""Interpretability: attention weights and heatmaps, logit lens, surprise, integrated gradients (completeness),
occlusion on a classifier trained here, and every `yuyan inspect` command."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tests.conftest import make_checkpoint, tiny_config

from yuyan.errors import UserError
from yuyan.evaluate.perplexity import perplexity
from yuyan.interpret.attention import attention_weights, render_attention, token_pieces
from yuyan.interpret.attribution import Decision, integrated_gradients, occlusion, render_attribution
from yuyan.interpret.logit_lens import logit_lens
from yuyan.interpret.surprise import render_surprise, segments
from yuyan.model.transformer import Transformer
from yuyan.plots import attention_figsize, token_labels
from yuyan.tokenizer import Tokenizer

TEXT = "def add(a, b):\n    return a + b  # 加法"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Width-32 models: one thread is fastest, and it does not stall when other jobs share the cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_attention_rows_sum_to_one(tiny_model, tokenizer):
    tokens, weights = attention_weights(tiny_model, tokenizer, TEXT)
    T = len(tokenizer.encode(TEXT))
    assert len(tokens) == T and len(weights) == tiny_model.config.n_layer
    for w in weights:
        assert w.shape == (tiny_model.config.n_head, T, T)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:2]))
        assert float(w.triu(1).abs().max()) == 0.0  # causal: no weight on later tokens
    # the explicit path that produced the weights computes the same logits as the SDPA path
    ids = torch.tensor([tokenizer.encode(TEXT)])
    torch.testing.assert_close(tiny_model(ids, attn_weights=[]), tiny_model(ids), rtol=1e-4, atol=1e-5)


def test_token_pieces_label_partial_characters(tokenizer):
    ids, labels = token_pieces(tokenizer, "x 加")
    assert ids == tokenizer.encode("x 加")
    assert labels[0] == "x" and all(lab.startswith(("加[", " 加[", " ", "加")) for lab in labels[1:])
    assert token_labels(["a b", "$x", "\n", "加"], cjk=False) == ["a·b", r"\$x", "\\n", "\\u52a0"]


def test_heatmaps_are_pngs_of_the_expected_size(tokenizer, tmp_path):
    torch.manual_seed(0)
    tiny_model = Transformer(
        tiny_config("llama", vocab_size=tokenizer.vocab_size)
    ).eval()  # drawing: one family
    r = render_attention(tiny_model, tokenizer, TEXT, tmp_path, title="t")
    T, H = len(r["tokens"]), tiny_model.config.n_head
    w, h, _ = attention_figsize(H, T)
    assert len(r["pngs"]) == tiny_model.config.n_layer
    for p in r["pngs"]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(p) as im:
            im.load()
            assert im.size == (round(w * 100), round(h * 100))
            assert len(set(im.convert("L").tobytes())) > 20  # a drawn image, not a blank canvas
    with pytest.raises(UserError, match="layer 9 does not exist"):
        render_attention(tiny_model, tokenizer, TEXT, tmp_path, layers=[9])
    page = r["html"].read_text(encoding="utf-8")
    assert "<script src" not in page and "http" not in page  # self-contained
    blob = page.split('<script type="application/json" id="data">')[1].split("</script>")[0]
    data = json.loads(blob)
    assert data["tokens"] == r["tokens"] and len(data["layers"]) == tiny_model.config.n_layer
    assert abs(sum(data["layers"][0][0][-1]) - 1000) <= T  # rows stored as integers 0..1000


def test_logit_lens_last_layer_is_the_models_prediction(tiny_model, tokenizer):
    r = logit_lens(tiny_model, tokenizer, TEXT, top_k=3)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        logits = tiny_model(ids)[0]
    assert r["rows"] == ["embed"] + [f"layer {i}" for i in range(tiny_model.config.n_layer)]
    torch.testing.assert_close(r["logits"][-1], logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(r["top_ids"][-1, :, 0], logits.argmax(-1))
    # an intermediate row is the final norm + lm_head applied to that layer's residual stream
    hs = []
    with torch.no_grad():
        tiny_model.hidden(ids, hidden_states=hs)
        mid = tiny_model.lm_head(tiny_model.norm(hs[1]))[0]
    torch.testing.assert_close(r["logits"][1], mid, rtol=1e-5, atol=1e-5)


def test_surprise_matches_perplexity(tiny_model, tokenizer, tmp_path):
    r = render_surprise(tiny_model, tokenizer, TEXT, tmp_path, top=5)
    ppl = perplexity(tiny_model, tokenizer, [TEXT])
    assert len(r["losses"]) == ppl["tokens"]
    assert sum(r["losses"]) / len(r["losses"]) == pytest.approx(ppl["loss"], rel=1e-5)
    assert r["hardest"][0]["loss"] == pytest.approx(max(r["losses"]))
    segs = segments(TEXT, r["offsets"], r["losses"])
    assert "".join(s for s, _ in segs) == TEXT  # the page shows exactly the text
    assert sum(v for _, v in segs) == pytest.approx(sum(r["losses"]), rel=1e-5)
    assert "加" in r["html"].read_text(encoding="utf-8")


@pytest.mark.parametrize("baseline", ["zeros", "pad"])
def test_integrated_gradients_completeness(tiny_model, tokenizer, baseline):
    d = Decision.next_token(tiny_model, tokenizer, TEXT, target=" return")
    ig = integrated_gradients(d, steps=64, baseline=baseline, pad_id=tokenizer.pad_id)
    gap = ig["f_input"] - ig["f_baseline"]
    assert abs(gap) > 1e-3
    assert float(ig["attributions"].sum()) == pytest.approx(gap, rel=0.01)
    with torch.no_grad():
        logp = F.log_softmax(tiny_model(torch.tensor([d.ids]))[0, -1], -1)
    assert ig["f_input"] == pytest.approx(float(logp[tokenizer.encode(" return")[0]]), rel=1e-5)


def test_occlusion_measures_dropping_each_token(tiny_model, tokenizer):
    d = Decision.next_token(tiny_model, tokenizer, "x = 1 + 2")
    occ = occlusion(d)
    with torch.no_grad():

        def f(ids):
            return float(F.log_softmax(tiny_model(torch.tensor([ids]))[0, -1], -1)[d.target_id])

        assert float(occ["effects"][1]) == pytest.approx(f(d.ids) - f(d.ids[:1] + d.ids[2:]), abs=1e-5)


POS, NEG = ["good", "great", "excellent", "wonderful"], ["bad", "awful", "terrible", "boring"]
SUBJ = ["the movie", "this film", "the story", "our trip", "the meal", "that book", "the show", "my day"]
TMPL = ["{s} was {w} today", "i think {s} is {w}", "{s} felt {w} to me", "honestly {s} was {w} and long"]


def _sentences(rng, n):
    out = []
    for _ in range(n):
        lab = rng.randrange(2)
        w = rng.choice(POS if lab else NEG)
        out.append((rng.choice(TMPL).format(s=rng.choice(SUBJ), w=w), lab, w))
    return out


@pytest.fixture(scope="module")
def sentiment_classifier():
    """A tiny transformer + H5's classifier head trained a few hundred steps on synthetic sentences."""
    from yuyan.model.heads import Classifier, encode_for_classify, pad_batch

    rng = random.Random(0)
    corpus = [s for s, _, _ in _sentences(rng, 2000)]
    tok = Tokenizer.train(
        corpus, vocab_size=400, min_frequency=2
    )  # large enough that every word is one token
    assert [tok.decode([i]) for i in tok.encode("this film felt terrible")] == [
        "this",
        " film",
        " felt",
        " terrible",
    ]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest and immune to a busy machine
    torch.manual_seed(0)
    clf = Classifier(
        Transformer(tiny_config(vocab_size=tok.vocab_size, block_size=32)), ["neg", "pos"], tokenizer=tok
    )
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=0.0)
    clf.train()
    for _ in range(200):
        batch = _sentences(rng, 32)
        ids, _ = encode_for_classify(tok, [s for s, _, _ in batch], 32)
        x, n = pad_batch(ids, tok.pad_id)
        loss = F.cross_entropy(clf(x, n), torch.tensor([lab for _, lab, _ in batch]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return clf.eval(), tok


def test_occlusion_finds_the_sentiment_word(sentiment_classifier, tmp_path):
    clf, tok = sentiment_classifier
    test = _sentences(random.Random(1), 40)
    preds = clf.predict([s for s, _, _ in test])
    assert sum(p == ["neg", "pos"][lab] for (p, _), (_, lab, _) in zip(preds, test, strict=True)) >= 38
    for text, lab, word in test[:8]:
        d = Decision.classifier(clf, text, target=["neg", "pos"][lab])
        occ = occlusion(d)
        top = int(occ["effects"].argmax())
        _, labels = token_pieces(tok, text)
        assert word in labels[top], (text, labels, occ["effects"].tolist())
        ig = integrated_gradients(d, steps=64)
        gap = ig["f_input"] - ig["f_baseline"]
        assert float(ig["attributions"].sum()) == pytest.approx(gap, rel=0.01, abs=1e-4)
    r = render_attribution(Decision.classifier(clf, test[0][0]), tok, tmp_path)
    for p in r["pngs"]:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100
    assert "occlusion" in r["html"].read_text(encoding="utf-8")


def test_cli_inspect_commands(run_cli, tmp_path, tokenizer):
    tiny_checkpoint = make_checkpoint(tmp_path / "ckpt", tokenizer)  # the CLI runs once, on one family
    out = tmp_path / "o"
    r = run_cli(
        "inspect", "attention", "--model", tiny_checkpoint, "--prompt", TEXT, "--out", out, check=True
    )
    assert (
        (out / "attention_layer1.png").exists() and (out / "attention.html").exists() and "wrote" in r.stdout
    )
    run_cli("inspect", "logit-lens", "--model", tiny_checkpoint, "--prompt", TEXT, "--out", out, check=True)
    assert json.loads((out / "logit_lens.json").read_text())["rows"][0] == "embed"
    r = run_cli("inspect", "surprise", "--model", tiny_checkpoint, "--text", TEXT, "--out", out, check=True)
    assert "hardest tokens" in r.stdout and (out / "surprise.html").exists()
    r = run_cli(
        "inspect",
        "attribution",
        "--model",
        tiny_checkpoint,
        "--text",
        TEXT,
        "--target",
        " return",
        "--steps",
        "16",
        "--out",
        out,
        check=True,
    )
    data = json.loads((out / "attribution.json").read_text())
    assert data["kind"] == "next-token" and data["target"] == " return"


def test_cli_inspect_attribution_of_a_classifier(run_cli, tmp_path, sentiment_classifier):
    from yuyan.model.checkpoint import save_checkpoint

    clf, tok = sentiment_classifier
    ckpt = save_checkpoint(
        tmp_path / "clf", clf.model, tok, meta=clf.head_meta(), extra_tensors=clf.head_tensors()
    )
    r = run_cli(
        "inspect",
        "attribution",
        "--model",
        ckpt,
        "--text",
        "the movie was awful today",
        "--target",
        "neg",
        "--out",
        tmp_path / "o",
        check=True,
    )
    assert "classifier target 'neg'" in r.stdout
    data = json.loads((tmp_path / "o" / "attribution.json").read_text())
    assert "awful" in data["tokens"][max(range(len(data["tokens"])), key=lambda i: data["occlusion"][i])]
