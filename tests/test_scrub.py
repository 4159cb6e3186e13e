"""PII scrubbing (yuyan/data/scrub.py): every type found in a generated corpus, look-alikes left intact,
exact placeholder output, report counts, prepare --scrub vs prepare of a scrubbed copy, determinism.

The planted numbers are made with check digits computed here from the standards (ISO 7064 MOD 11-2 for
the Chinese ID, Luhn for cards, ISO 13616 mod-97 for IBANs), independently of python-stdnum, which the
scrubber uses; each look-alike differs from a planted item only by what makes it invalid.
"""

from __future__ import annotations

import json
import random
import string

import pytest

from yuyan.data.scrub import PLACEHOLDERS, TYPES, find_pii, scrub_corpus, scrub_text
from yuyan.data.shards import prepare


def cn_id(rng: random.Random, valid: bool = True) -> str:
    body = "110105" + f"{rng.randint(1950, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}"
    body += f"{rng.randint(0, 999):03d}"
    check = "10X98765432"[sum(int(d) * (2 ** (17 - i) % 11) for i, d in enumerate(body)) % 11]
    if not valid:
        check = "10X98765432"[("10X98765432".index(check) + 1) % 11]
    return body + check


def luhn_digit(digits: str) -> str:
    total = 0
    for i, d in enumerate(reversed(digits)):
        v = int(d) * (2 if i % 2 == 0 else 1)
        total += v - 9 if v > 9 else v
    return str((10 - total % 10) % 10)


def card(rng: random.Random, valid: bool = True, sep: str = " ") -> str:
    body = "4" + "".join(rng.choice(string.digits) for _ in range(14))
    last = luhn_digit(body)
    digits = body + (last if valid else str((int(last) + 1) % 10))
    return sep.join(digits[i : i + 4] for i in range(0, 16, 4))


def iban(rng: random.Random, valid: bool = True) -> str:
    bban = "".join(rng.choice(string.digits) for _ in range(18))
    check = 98 - int(bban + "131400") % 97  # D=13 E=14, then "00"
    if not valid:
        check = check % 97 + 1
    return f"DE{check:02d}{bban}"


def secrets(rng: random.Random) -> list[str]:
    alnum = string.ascii_letters + string.digits
    rand = lambda n, chars=alnum: "".join(rng.choice(chars) for _ in range(n))  # noqa: E731
    return [
        "AKIA" + rand(16, string.ascii_uppercase + string.digits),
        "ghp_" + rand(36),
        "github_pat_" + rand(82),
        "sk-proj-" + rand(48),
        "xoxb-" + rand(11, string.digits) + "-" + rand(24, string.ascii_lowercase + string.digits),
    ]


PEM_BLOCK = "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEAx4Vb\nq8XkP2m==\n-----END RSA PRIVATE KEY-----"

LOOKALIKES = [
    "from sklearn import svm; import sk_learn_helpers; sk_learn = 1",
    "version 1.2.3.4.5 and __version__ = '10.2.0.1.7'",
    "sha = 9b74c9897bac770ffc029102a200c5de2f1e8c0a4b6d7e8f90a1b2c3d4e5f607",
    "digest = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",
    "commit 4c0873d391e987982fbbd3a94a8fe5ccb19ba61c, at 2024-01-15 10:20:30",
    "x[1::2] + y[::3]; t = 12:30:45; mac 00:1a:2b:3c:4d:5e",
    "order 20240115001 and count 1234567",
    "decorator @property and a@b",
]


def planted(rng: random.Random) -> dict[str, list[str]]:
    return {
        "email": [
            f"user{rng.randint(0, 999)}.name@mail-{rng.randint(0, 99)}.example.org",
            "zhang.wei@qq.com",
        ],
        "phone": [
            f"138{rng.randint(10000000, 99999999)}",
            "139-1234-5678",
            "+86 139 1234 5678",
            "+1 650-253-0000",
            "(650) 253-0000",
            "+44 20 7946 0958",
        ],
        "cn_id": [cn_id(rng) for _ in range(3)],
        "card": [card(rng), card(rng, sep="-"), card(rng, sep="")],
        "ip": [
            f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
            "2001:db8::8a2e:370:7334",
        ],
        "iban": [iban(rng), "GB82 WEST 1234 5698 7654 32"],
        "secret": [*secrets(rng), PEM_BLOCK],
    }


def negatives(rng: random.Random) -> list[str]:
    return [
        cn_id(rng, valid=False),
        "11010519990230123X",  # 30 February
        card(rng, valid=False),
        iban(rng, valid=False),
        *LOOKALIKES,
    ]


def make_corpus(root, seed: int = 0) -> dict:
    """Files with planted items (one per line, amid filler) and look-alikes; returns {file: {type: n}}."""
    rng = random.Random(seed)
    want = {}
    (root / "sub").mkdir(parents=True)
    for k in range(6):
        items = planted(rng)
        lines = []
        for kind, values in items.items():
            lines += [f"line {kind} {i}: contact {v} today." for i, v in enumerate(values)]
        lines += [f"not pii: {x}" for x in negatives(rng)]
        rng.shuffle(lines)
        name = f"sub/doc{k}.txt" if k % 2 else f"doc{k}.md"
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
        want[name] = {kind: len(v) for kind, v in items.items()}
    return want


def test_every_type_found_and_lookalikes_kept(tmp_path):
    rng = random.Random(1)
    for _ in range(20):
        for kind, values in planted(rng).items():
            for v in values:
                text = f"see {v} now"
                assert scrub_text(text) == (f"see {PLACEHOLDERS[kind]} now", {kind: 1}), (kind, v)
        for x in negatives(rng):
            assert find_pii(x) == [], (x, find_pii(x))


def test_placeholders_exact():
    text = (
        "Mail alice@example.com, 电话13812345678 或 +1 (650) 253-0000; ID 11010519491231002X; "
        "card 4111 1111 1111 1111; ip 192.168.1.20; IBAN DE89 3704 0044 0532 0130 00; "
        'api_key = "a8Fk29dLq0ZpX7vB3nM5"; AKIAIOSFODNN7EXAMPLE'
    )
    out, counts = scrub_text(text)
    assert out == (
        "Mail <EMAIL>, 电话<PHONE> 或 <PHONE>; ID <CN_ID>; card <CARD>; ip <IP>; IBAN <IBAN>; "
        'api_key = "<SECRET>"; <SECRET>'
    )
    assert dict(counts) == {"email": 1, "phone": 2, "cn_id": 1, "card": 1, "ip": 1, "iban": 1, "secret": 2}
    assert scrub_text(f"x\n{PEM_BLOCK}\ny") == ("x\n<SECRET>\ny", {"secret": 1})
    assert set(PLACEHOLDERS) == set(TYPES)


def test_scrub_corpus_report_and_copies(tmp_path):
    src = tmp_path / "src"
    want = make_corpus(src)
    report = scrub_corpus(str(src), tmp_path / "out").to_dict()
    on_disk = json.loads((tmp_path / "out" / "scrub_report.json").read_text())
    assert on_disk == report
    assert report["files"] == want
    assert report["totals"] == {t: sum(f[t] for f in want.values()) for t in TYPES}
    for name in want:
        copy = (tmp_path / "out" / "corpus" / name).read_text(encoding="utf-8")
        assert find_pii(copy) == []
        assert all(f"not pii: {x}" in copy for x in LOOKALIKES)  # look-alikes untouched
        assert copy == scrub_text((src / name).read_text(encoding="utf-8"))[0]
    # deterministic: a second run writes the same bytes
    scrub_corpus(str(src), tmp_path / "out2")
    for name in want:
        assert (tmp_path / "out" / "corpus" / name).read_bytes() == (
            tmp_path / "out2" / "corpus" / name
        ).read_bytes()


def test_scrub_refuses_a_foreign_folder(tmp_path):
    from yuyan.errors import UserError

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("mail bob@example.com\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        scrub_corpus(str(tmp_path / "src"), tmp_path / "foreign")
    scrub_corpus(str(tmp_path / "src"), tmp_path / "foreign", force=True)
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "mine"
    assert (tmp_path / "foreign" / "corpus" / "a.txt").read_text() == "mail <EMAIL>\n"


def test_prepare_scrub_equals_prepare_of_scrubbed_copy(tmp_path, tokenizer):
    src = tmp_path / "src"
    make_corpus(src)
    rows = [{"text": f"record {i}: call 139-1234-5678 or mail a{i}@b.example.com"} for i in range(30)]
    lines = [json.dumps(r) for r in rows]
    lines[3], lines[7] = "not json", ""  # a bad line and a blank one keep their line numbers in the copy
    (src / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = prepare(str(src), tokenizer, tmp_path / "p1", progress=False, scrub="pii")
    scrub_corpus(str(src), tmp_path / "clean")
    prepare(str(tmp_path / "clean" / "corpus"), tokenizer, tmp_path / "p2", progress=False)
    for split in ("train", "val"):
        assert (tmp_path / "p1" / f"{split}.bin").read_bytes() == (
            tmp_path / "p2" / f"{split}.bin"
        ).read_bytes()
    assert meta["scrub"] == "pii-v1" and meta["scrub_totals"]["email"] == 6 * 2 + 28
    report = json.loads((tmp_path / "p1" / "scrub_report.json").read_text())
    assert report["totals"] == meta["scrub_totals"] and report["files"]["records.jsonl:1"] == {
        "email": 1,
        "phone": 1,
    }
    # the same settings do nothing; without --scrub the shards are rebuilt (and the report goes)
    assert prepare(str(src), tokenizer, tmp_path / "p1", progress=False, scrub="pii").get("up_to_date")
    plain = prepare(str(src), tokenizer, tmp_path / "p1", progress=False)
    assert not plain.get("up_to_date") and plain["scrub"] is None
    assert not (tmp_path / "p1" / "scrub_report.json").exists()
