"""Robustness attacks (yuyan/evaluate/robustness.py): each changes what it says it changes, at the stated
rate, only on eligible units, reproducibly by seed; `yuyan eval robustness` on a tiny classifier trained
here reports the accuracies a direct recomputation gives."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import cli_in_process, tiny_config
from yuyan.evaluate.robustness import (
    ATTACKS,
    HOMOGLYPHS,
    QWERTY,
    SYNONYMS,
    ZH_SIMILAR,
    ZH_SIMILAR_MAP,
    homophones,
    perturb,
    perturb_all,
    pinyin_of,
)

EN = "The movie was good and the story was really great, but the ending felt slow and boring to many people."
ZH = "我们今天去北京看电影，这个故事很好，但是结局有点长，大家都说还可以再看一次。"


def _diff_positions(a: str, b: str) -> list[int]:
    assert len(a) == len(b)
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]


@pytest.mark.parametrize("rate", [0.1, 0.3, 1.0])
def test_char_attacks_change_rate_of_eligible_characters(rate):
    for attack, text, table in (
        ("homoglyph", EN, HOMOGLYPHS),
        ("zh_similar", ZH, ZH_SIMILAR_MAP),
        ("zh_homophone", ZH, homophones()),
    ):
        out, eligible, changed = perturb(text, attack, rate, random.Random(0))
        n = sum(c in table for c in text)
        assert eligible == n > 0 and changed == max(1, round(rate * n))
        diffs = _diff_positions(text, out)
        assert len(diffs) == changed and all(out[i] in table[text[i]] for i in diffs)
        if attack == "zh_homophone":  # the same reading, and still a Chinese character
            assert all(pinyin_of(out[i]) == pinyin_of(text[i]) for i in diffs)
            assert all("\u4e00" <= out[i] <= "\u9fff" for i in diffs)
        if attack == "zh_similar":
            assert all(any(text[i] in g and out[i] in g for g in ZH_SIMILAR) for i in diffs)


@pytest.mark.parametrize("rate", [0.1, 0.5, 1.0])
def test_word_attacks_change_rate_of_eligible_words(rate):
    words = re.findall(r"[A-Za-z]+|[^A-Za-z]+", EN)
    # typo: one QWERTY slip in each chosen word of 3+ letters, every other word and all punctuation kept
    out, eligible, changed = perturb(EN, "typo", rate, random.Random(1))
    n = sum(1 for w in words if w.isalpha() and len(w) >= 3)
    assert eligible == n and changed == max(1, round(rate * n))
    got = re.findall(r"[A-Za-z]+|[^A-Za-z]+", out)
    assert len(got) == len(words)  # a typo inside a word never splits or joins words
    changed_words = [(a, b) for a, b in zip(words, got, strict=True) if a != b]
    assert len(changed_words) == changed
    for a, b in changed_words:
        assert len(a) >= 3 and abs(len(a) - len(b)) <= 1
        if len(a) == len(b):  # a substitution by a neighbouring key
            (i,) = _diff_positions(a, b)
            assert b[i].lower() in QWERTY[a[i].lower()]
        elif len(b) == len(a) - 1:
            assert any(a[:i] + a[i + 1 :] == b for i in range(len(a)))
        else:
            assert any(
                b[:i] + b[i + 1 :] == a and b[i].lower() in QWERTY[a[i - 1].lower()] for i in range(1, len(b))
            )
    # synonym: only words of the table, each replaced by one of its synonyms
    out, eligible, changed = perturb(EN, "synonym", rate, random.Random(1))
    got = re.findall(r"[A-Za-z]+|[^A-Za-z]+", out)
    assert eligible == sum(w.lower() in SYNONYMS for w in words) > 0
    swaps = [(a, b) for a, b in zip(words, got, strict=True) if a != b]
    assert len(swaps) == changed == max(1, round(rate * eligible))
    assert all(b.lower() in SYNONYMS[a.lower()] for a, b in swaps)


def test_seeded_and_ineligible_text_untouched():
    texts = [EN, ZH, EN + ZH] * 3
    for attack in ATTACKS:
        a, _, _ = perturb_all(texts, attack, 0.3, seed=0)
        assert a == perturb_all(texts, attack, 0.3, seed=0)[0]
        assert a != perturb_all(texts, attack, 0.3, seed=1)[0]
    # a text with nothing eligible stays as it is
    assert perturb("12345 !!", "typo", 0.5, random.Random(0)) == ("12345 !!", 0, 0)
    assert perturb(EN, "zh_similar", 0.5, random.Random(0)) == (EN, 0, 0)


def _train_classifier(tokenizer, data):
    from yuyan.model.heads import Classifier, encode_for_classify, pad_batch
    from yuyan.model.transformer import Transformer

    torch.manual_seed(0)
    clf = Classifier(
        Transformer(tiny_config(vocab_size=tokenizer.vocab_size)), ["neg", "pos"], tokenizer=tokenizer
    )
    ids, _ = encode_for_classify(tokenizer, [t for t, _ in data], 64)
    x, n = pad_batch(ids, tokenizer.pad_id or 0)
    y = torch.tensor([clf.labels.index(lab) for _, lab in data])
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3)
    for _ in range(40):
        opt.zero_grad()
        F.cross_entropy(clf(x, n), y).backward()
        opt.step()
    return clf.eval()


def test_cli_matches_direct_recomputation(tmp_path, tokenizer, capsys):
    from yuyan.model.checkpoint import save_checkpoint

    pos = ["good", "great", "lovely", "好", "棒"]
    neg = ["bad", "awful", "boring", "差", "糟糕"]
    subjects = ["the movie", "this story", "the actor", "这个作品", "那个故事"]
    data = [
        (f"{s} was {a}", lab) for s in subjects for lab, words in (("pos", pos), ("neg", neg)) for a in words
    ]
    clf = _train_classifier(tokenizer, data)
    ckpt = save_checkpoint(
        tmp_path / "clf", clf.model, tokenizer, meta=clf.head_meta(), extra_tensors=clf.head_tensors()
    )
    csv = tmp_path / "test.csv"
    csv.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in data), encoding="utf-8")
    code, out, err = cli_in_process(
        capsys, "eval", "robustness", "--model", str(ckpt), "--data", str(csv), "--rate", "0.5",
        "--seed", "3", "--out", str(tmp_path / "o"),
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((tmp_path / "o" / "robustness.json").read_text(encoding="utf-8"))["metrics"]
    assert (tmp_path / "o" / "robustness.md").exists() and "accuracy_clean" in out
    texts, gold = [t for t, _ in data], [y for _, y in data]
    clean = [p for p, _ in clf.predict(texts)]
    right = [p == y for p, y in zip(clean, gold, strict=True)]
    assert res["accuracy_clean"] == pytest.approx(sum(right) / len(data)) and sum(right) / len(data) > 0.9
    for attack in ATTACKS:
        perturbed, _, _ = perturb_all(texts, attack, 0.5, 3)
        preds = [p for p, _ in clf.predict(perturbed)]
        ok = [p == y for p, y in zip(preds, gold, strict=True)]
        flipped = sum(r and not o for r, o in zip(right, ok, strict=True))
        assert res[f"accuracy_{attack}"] == pytest.approx(sum(ok) / len(data)), attack
        assert res[f"success_rate_{attack}"] == pytest.approx(flipped / sum(right)), attack
        assert res["attacks"][attack]["texts_changed"] == sum(
            a != b for a, b in zip(texts, perturbed, strict=True)
        )
    assert all(res["attacks"][a]["texts_changed"] > 0 for a in ("typo", "homoglyph", "synonym", "zh_similar"))
