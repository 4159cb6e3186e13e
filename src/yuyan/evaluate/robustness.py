"""Robustness of a classifier: its accuracy on perturbed copies of a labelled set, and how often a
perturbation flips an item it got right.

Attacks, each changing `rate` of the eligible units of a text (rounded, at least one when any is eligible;
a text with none is left as it is and counted):

- `typo`: words of 3+ ASCII letters; each chosen word gets one QWERTY slip at a random position: the letter
  replaced by a neighbouring key, deleted, or a neighbouring key inserted after it.
- `homoglyph`: characters with a look-alike in HOMOGLYPHS (Latin <-> Cyrillic/Greek, e.g. a/а, o/ο),
  replaced by it; the text looks the same and tokenizes differently.
- `synonym`: English words in the built-in SYNONYMS table (a few hundred common words; WordNet is not used
  because every registry package of it downloads its data at run time), replaced by a synonym, with the
  capitalisation kept.
- `zh_homophone` (同音): Chinese characters of COMMON_ZH that share their pinyin (with tone, pypinyin's
  most common reading) with another one there, replaced by such a character.
- `zh_similar` (形近): characters in a group of ZH_SIMILAR (visually confusable: 己已巳, 未末, ...), replaced
  by another member of the group.

Reproducible: text i under attack a draws from `random.Random(f"{seed}:{a}:{i}")`, so one item's
perturbation does not depend on the others or on the order of the attacks.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable

from yuyan.errors import UserError

ATTACKS = ("typo", "homoglyph", "synonym", "zh_homophone", "zh_similar")

QWERTY_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")


def _qwerty_neighbours() -> dict[str, str]:
    pos = {c: (r, i) for r, row in enumerate(QWERTY_ROWS) for i, c in enumerate(row)}
    out = {}
    for c, (r, i) in pos.items():
        # same row left/right, and the keys above and below (rows are offset by about half a key)
        near = [(r, i - 1), (r, i + 1), (r - 1, i), (r - 1, i + 1), (r + 1, i - 1), (r + 1, i)]
        out[c] = "".join(QWERTY_ROWS[a][b] for a, b in near if 0 <= a < 3 and 0 <= b < len(QWERTY_ROWS[a]))
    return out


QWERTY = _qwerty_neighbours()

# Latin -> a Cyrillic or Greek character drawn the same in common fonts; the reverse map is added below
_LATIN_LOOKALIKES = {
    "a": "а",
    "c": "с",
    "e": "е",
    "i": "і",
    "j": "ј",
    "o": "о",
    "p": "р",
    "s": "ѕ",
    "x": "х",
    "y": "у",
    "A": "А",
    "B": "В",
    "C": "С",
    "E": "Е",
    "H": "Н",
    "I": "І",
    "K": "К",
    "M": "М",
    "O": "О",
    "P": "Р",
    "T": "Т",
    "X": "Х",
    "Y": "У",
    "v": "ν",
    "N": "Ν",
    "Z": "Ζ",
}
HOMOGLYPHS = {**_LATIN_LOOKALIKES, **{v: k for k, v in _LATIN_LOOKALIKES.items()}}

_SYNONYM_GROUPS = [
    "good great fine excellent",
    "bad poor awful terrible",
    "happy glad joyful cheerful",
    "sad unhappy gloomy miserable",
    "big large huge enormous",
    "small little tiny minor",
    "fast quick rapid swift",
    "slow sluggish unhurried",
    "movie film picture",
    "story plot tale",
    "boring dull tedious",
    "funny amusing humorous",
    "beautiful lovely pretty gorgeous",
    "ugly unattractive hideous",
    "smart clever bright intelligent",
    "stupid foolish silly dumb",
    "like enjoy love",
    "hate dislike detest",
    "begin start commence",
    "end finish conclude",
    "buy purchase acquire",
    "help assist aid",
    "show display exhibit",
    "think believe reckon",
    "make create produce",
    "use employ utilize",
    "get obtain receive",
    "want desire wish",
    "try attempt",
    "choose pick select",
    "answer reply respond",
    "ask inquire query",
    "easy simple effortless",
    "hard difficult tough",
    "strange odd weird peculiar",
    "important significant crucial",
    "new fresh novel",
    "old ancient aged",
    "rich wealthy affluent",
    "angry mad furious",
    "afraid scared frightened",
    "quiet silent calm",
    "loud noisy",
    "clean tidy neat",
    "dirty filthy messy",
    "wrong incorrect mistaken",
    "right correct accurate",
    "actor performer",
    "book novel volume",
    "car automobile vehicle",
    "house home dwelling",
    "job work occupation",
    "money cash funds",
    "price cost",
    "problem issue trouble",
    "idea notion concept",
    "great superb",
    "very really extremely",
    "often frequently",
    "maybe perhaps possibly",
    "also too additionally",
    "mostly largely mainly",
    "totally completely entirely",
    "awesome amazing wonderful",
    "worst poorest",
    "best finest",
]
SYNONYMS: dict[str, tuple[str, ...]] = {}
for _group in _SYNONYM_GROUPS:
    _words = _group.split()
    for _w in _words:
        SYNONYMS.setdefault(_w, tuple(x for x in _words if x != _w))

# about 500 of the most frequent Chinese characters: the pool homophones are drawn from
COMMON_ZH = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后"
    "小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长"
    "知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最"
    "间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市"
    "眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计"
    "或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让"
    "认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办"
    "运武半候七必城父强步完革深区即求品士转量空甚众技轻程告江语英基派满式李息写呢识极令黄德收脸钱党倒未持"
    "取设始版双历越史商千片容研像找友孩站广改议形委早房音火际则首单据导影失拿网香似斯专石若兵弟谁校读志飞"
    "观争究包组造落视济喜离虽坐集编宝谈府拉黑且随格尽剑讲布杀微怕母调局根曾准团段终乐切级克精哪官示冷器"
)

# groups of visually similar characters (形近字), each a string of two or more
ZH_SIMILAR = (
    "己已巳",
    "未末",
    "土士",
    "人入八",
    "大太犬",
    "日曰",
    "刀力",
    "天夭",
    "王玉主",
    "目自",
    "千干于",
    "午牛",
    "贝见",
    "鸟乌",
    "今令",
    "问间",
    "休体",
    "拔拨",
    "辨辩辫",
    "历厉",
    "狠很",
    "候侯",
    "戍戌戊",
    "即既",
    "侍待持",
    "晴睛请情清",
    "析折拆",
    "密蜜",
    "哀衷",
    "免兔",
    "师帅",
    "苦若",
    "钓钩",
    "洒酒",
    "幻幼",
    "壁璧",
    "峰锋蜂",
    "栽裁载",
    "暮幕墓慕",
    "崇祟",
    "冶治",
    "母毋",
    "乒乓兵",
    "往住",
    "徒徙",
    "买卖",
    "特持",
    "很狠",
    "象像",
    "做作",
    "坐座",
    "己巳",
)
ZH_SIMILAR_MAP: dict[str, str] = {}
for _g in ZH_SIMILAR:
    for _c in _g:
        ZH_SIMILAR_MAP[_c] = "".join(sorted(set(ZH_SIMILAR_MAP.get(_c, "")) | (set(_g) - {_c})))

_WORD = re.compile(r"[A-Za-z]+")


def _count(n: int, rate: float) -> int:
    """Units to change out of n eligible: round(rate * n), at least one when any is eligible."""
    return 0 if n == 0 or rate <= 0 else min(n, max(1, round(rate * n)))


def _replace_chars(text: str, positions: list[int], pick: Callable[[str], str]) -> str:
    chars = list(text)
    for i in positions:
        chars[i] = pick(chars[i])
    return "".join(chars)


def _typo(word: str, rng: random.Random) -> str:
    i = rng.randrange(len(word))
    c = word[i]
    near = QWERTY[c.lower()]
    key = rng.choice(near)
    key = key.upper() if c.isupper() else key
    kind = rng.choice(("substitute", "delete", "insert"))
    if kind == "substitute":
        return word[:i] + key + word[i + 1 :]
    if kind == "delete":
        return word[:i] + word[i + 1 :]
    return word[: i + 1] + key + word[i + 1 :]


def _match_case(word: str, repl: str) -> str:
    if word.isupper() and len(word) > 1:
        return repl.upper()
    return repl[:1].upper() + repl[1:] if word[:1].isupper() else repl


def _word_attack(text: str, rate: float, rng: random.Random, eligible, change) -> tuple[str, int, int]:
    words = [m for m in _WORD.finditer(text) if eligible(m.group())]
    chosen = sorted(rng.sample(range(len(words)), _count(len(words), rate)))
    out, pos = [], 0
    for j in chosen:
        m = words[j]
        out += [text[pos : m.start()], change(m.group(), rng)]
        pos = m.end()
    out.append(text[pos:])
    return "".join(out), len(words), len(chosen)


def _char_attack(text: str, rate: float, rng: random.Random, table: dict[str, str]) -> tuple[str, int, int]:
    eligible = [i for i, c in enumerate(text) if c in table]
    chosen = sorted(rng.sample(eligible, _count(len(eligible), rate)))
    return _replace_chars(text, chosen, lambda c: rng.choice(table[c])), len(eligible), len(chosen)


def pinyin_of(char: str) -> str:
    """The most common reading of one character, with its tone number (pypinyin, Style.TONE3)."""
    try:
        from pypinyin import Style, pinyin
    except ImportError:
        raise UserError("the zh_homophone attack needs pypinyin: pip install 'yuyan[privacy]'") from None
    return pinyin(char, style=Style.TONE3, heteronym=False)[0][0]


@functools.cache
def homophones() -> dict[str, str]:
    """Each character of COMMON_ZH that shares its pinyin with others there -> those others."""
    groups: dict[str, list[str]] = {}
    for c in dict.fromkeys(COMMON_ZH):
        groups.setdefault(pinyin_of(c), []).append(c)
    return {c: "".join(x for x in g if x != c) for g in groups.values() if len(g) > 1 for c in g}


def perturb(text: str, attack: str, rate: float, rng: random.Random) -> tuple[str, int, int]:
    """(perturbed text, eligible units, units changed) for one attack of ATTACKS."""
    if attack == "typo":
        return _word_attack(text, rate, rng, lambda w: len(w) >= 3 and w.isascii(), _typo)
    if attack == "synonym":
        return _word_attack(
            text,
            rate,
            rng,
            lambda w: w.lower() in SYNONYMS,
            lambda w, r: _match_case(w, r.choice(SYNONYMS[w.lower()])),
        )
    if attack == "homoglyph":
        return _char_attack(text, rate, rng, HOMOGLYPHS)
    if attack == "zh_homophone":
        return _char_attack(text, rate, rng, homophones())
    if attack == "zh_similar":
        return _char_attack(text, rate, rng, ZH_SIMILAR_MAP)
    raise UserError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")


def parse_attacks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """A comma list (or list) of attack names, checked."""
    names = [a.strip() for a in (spec.split(",") if isinstance(spec, str) else spec) if a.strip()]
    bad = [a for a in names if a not in ATTACKS]
    if bad or not names:
        raise UserError(f"unknown --attacks {', '.join(bad) or '(none)'}; choose from {', '.join(ATTACKS)}")
    return list(dict.fromkeys(names))


def perturb_all(texts: list[str], attack: str, rate: float, seed: int) -> tuple[list[str], int, int]:
    """Every text under one attack (text i seeded by `seed`, `attack` and i); with eligible and changed
    unit totals."""
    out, eligible, changed = [], 0, 0
    for i, t in enumerate(texts):
        p, e, c = perturb(t, attack, rate, random.Random(f"{seed}:{attack}:{i}"))
        out.append(p)
        eligible += e
        changed += c
    return out, eligible, changed


def evaluate_robustness(
    classifier,
    examples: list[tuple[str, str]],
    attacks: list[str] | tuple[str, ...] = ATTACKS,
    rate: float = 0.1,
    seed: int = 0,
    batch_size: int = 32,
) -> dict:
    """Accuracy clean and under each attack, and the attack success rate: the fraction of items predicted
    right on the clean text that are predicted wrong on the perturbed one (None when none was right).

    classifier: a `yuyan.model.heads.Classifier` with a tokenizer (anything with `predict(texts,
    batch_size)` returning (label, probabilities) pairs)."""
    if not 0 < rate <= 1:
        raise UserError(f"--rate {rate} is not in (0, 1]; it is the fraction of eligible units changed")
    attacks = parse_attacks(attacks)
    texts = [t for t, _ in examples]
    # a gold label may be the data's value behind a class name ("0" for "neg"): compare names
    name_of = getattr(classifier, "name_of", lambda y: y)
    gold = [name_of(y) or y for _, y in examples]
    clean = [lab for lab, _ in classifier.predict(texts, batch_size=batch_size)]
    right = [p == y for p, y in zip(clean, gold, strict=True)]
    n = len(examples)
    metrics: dict = {"examples": n, "accuracy_clean": sum(right) / n}
    details = {}
    for a in attacks:
        perturbed, eligible, changed = perturb_all(texts, a, rate, seed)
        preds = [lab for lab, _ in classifier.predict(perturbed, batch_size=batch_size)]
        ok = [p == y for p, y in zip(preds, gold, strict=True)]
        flipped = sum(1 for r, o in zip(right, ok, strict=True) if r and not o)
        success = flipped / sum(right) if any(right) else None
        metrics[f"accuracy_{a}"] = sum(ok) / n
        metrics[f"success_rate_{a}"] = success
        details[a] = {
            "accuracy": sum(ok) / n,
            "success_rate": success,
            "flipped": flipped,
            "texts_changed": sum(1 for t, p in zip(texts, perturbed, strict=True) if t != p),
            "eligible_units": eligible,
            "changed_units": changed,
            "example": next(
                ({"clean": t, "perturbed": p} for t, p in zip(texts, perturbed, strict=True) if t != p), None
            ),
        }
    metrics["attacks"] = details
    return metrics


__all__ = [
    "ATTACKS",
    "COMMON_ZH",
    "HOMOGLYPHS",
    "QWERTY",
    "SYNONYMS",
    "ZH_SIMILAR",
    "ZH_SIMILAR_MAP",
    "evaluate_robustness",
    "homophones",
    "parse_attacks",
    "perturb",
    "perturb_all",
    "pinyin_of",
]
