"""PII and secret scrubbing: find e-mail addresses, phone numbers, Chinese resident IDs, payment cards, IP
addresses, IBANs and secrets in text and replace each with a typed placeholder.

Placeholders: `<EMAIL>`, `<PHONE>`, `<CN_ID>`, `<CARD>`, `<IP>` (v4 and v6), `<IBAN>`, `<SECRET>` (API keys,
tokens, high-entropy `key = "..."` values and whole PEM private key blocks). For a `key = "..."` assignment
only the quoted value is replaced, so `api_key = "<SECRET>"` stays readable.

Every detector is a cheap regex that proposes candidates, then a check that confirms them; the check is a
maintained library where one exists (all pure Python, no model download): Google's libphonenumber port
`phonenumbers` (is_valid_number with its per-country metadata), `python-stdnum` (Luhn for cards, ISO 13616
mod-97 and per-country lengths for IBANs, `stdnum.cn.ric` for the ISO 7064 MOD 11-2 check digit, birth
date and county of a Chinese ID), `email-validator` (RFC 5321/5322 syntax, no DNS lookup) and Yelp's
`detect-secrets` (its AWS, GitHub, Slack and OpenAI plugins' patterns, and its Shannon entropy for the
generic assignments). Our own patterns cover what those do not: GitHub's fine-grained `github_pat_` tokens
and OpenAI's newer `sk-proj-`/`sk-` keys (detect-secrets knows only the legacy `T3BlbkFJ` form), IPv4/IPv6
(confirmed by the standard library's `ipaddress`) and PEM blocks. presidio needs a spaCy model download
and scrubadub pulls in more than it adds here, so neither is used.

Rules that keep look-alikes intact: digits that touch ASCII letters, digits or `_` are never a number (so
hex hashes and identifiers are left alone); an IPv4 address followed or preceded by `.digit` is a version
string (1.2.3.4.5); an IPv6 address needs at least three groups with digits in them (so slices like
`x[1::2]` stay); a phone number without `+` needs separators or the Chinese mobile shape 1[3-9]xxxxxxxxx
(a bare run of digits is more often an id or a timestamp); a card must start with 2-6 (the issuers' ranges)
and pass Luhn; a generic assignment needs a key-like name, a quoted value of 16+ characters and entropy
over 3.5 bits per character. When candidates overlap, the earlier detector in DETECTORS wins.

Scrubbing is deterministic (no randomness, no state between calls). It runs per document piece; a long
text is cut into ~1 MB pieces at whitespace (yuyan.data.corpus), so only a PEM block or a spaced number can
be split by a cut, and then is not found.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

from yuyan.data.corpus import Document, iter_documents, record_suffix
from yuyan.errors import UserError
from yuyan.fsutil import check_output_dir, mark_ours, os_error_line

PRIVACY_EXTRA = "pip install 'yuyan[privacy]'"
try:  # the optional `privacy` extra; this module is imported only when scrubbing is asked for
    import email_validator
    import phonenumbers
    from detect_secrets.plugins.aws import AWSKeyDetector
    from detect_secrets.plugins.github_token import GitHubTokenDetector
    from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString
    from detect_secrets.plugins.openai import OpenAIDetector
    from detect_secrets.plugins.slack import SlackDetector
    from stdnum import iban as std_iban
    from stdnum import luhn
    from stdnum.cn import ric
except ImportError as e:
    raise UserError(f"scrubbing needs {e.name}: {PRIVACY_EXTRA}") from None

PLACEHOLDERS = {
    "secret": "<SECRET>",
    "email": "<EMAIL>",
    "cn_id": "<CN_ID>",
    "iban": "<IBAN>",
    "card": "<CARD>",
    "ip": "<IP>",
    "phone": "<PHONE>",
}
TYPES = tuple(PLACEHOLDERS)
SCRUB_CHOICES = ("pii",)
VERSION = 1  # bump when a detector changes what it finds: shards prepared with --scrub are rebuilt
PHONE_REGIONS = ("CN", "US", "GB", "DE", "FR")  # national formats are tried in these countries' plans
ENTROPY_BITS = 3.5

_A = re.ASCII
# Each pattern starts with a literal or a character class and checks the character before it with a
# lookbehind placed after that first character: Python's re then scans for the first character in C
# instead of trying the lookbehind at every position (about 3x faster on source code).
PEM = re.compile(r"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?)-----.*?-----END \1-----", re.S)
SECRET_PATTERNS = [
    *(p for d in (AWSKeyDetector, GitHubTokenDetector, SlackDetector, OpenAIDetector) for p in d().denylist),
    re.compile(r"github_pat_[A-Za-z0-9_]{82}"),
    re.compile(r"sk-(?<![A-Za-z0-9_-]sk-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{32,}"),
]
QUOTED = re.compile(r"""(?P<q>['"])(?P<v>[^'"\s]{16,})(?P=q)""")
# what must stand before a QUOTED value for it to be a generic secret: a key-like name and `=`, `:` or `=>`
KEY_NAME = re.compile(
    r"""(?i)(?:key|secret|token|passw(?:or)?d|pwd|credential)[A-Za-z0-9_.-]{0,40}['"]?\s{0,4}(?:=|:|:=|=>)\s{0,4}\Z"""
)
EMAIL_DOMAIN = re.compile(r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}(?![A-Za-z0-9-])")
EMAIL_LOCAL = re.compile(r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]{1,64}\Z")
CN_ID = re.compile(
    r"[1-9](?<![A-Za-z0-9_][1-9])\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dX]"
    r"(?![A-Za-z0-9_])",
    _A,
)
IBAN = re.compile(
    r"[A-Z](?<![A-Za-z0-9_][A-Z])[A-Z]\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?(?![A-Za-z0-9_])"
)
CARD = re.compile(r"[2-6](?<![A-Za-z0-9_.-][2-6])\d{3}(?:[ -]?\d){9,15}(?![A-Za-z0-9_]|[.-]\d)", _A)
IPV4 = re.compile(r"[0-9](?<![A-Za-z0-9_.][0-9])[0-9]{0,2}(?:\.[0-9]{1,3}){3}(?![A-Za-z0-9_]|\.[0-9])")
IPV6_SEED = re.compile(r":[0-9A-Fa-f]{0,4}:")  # every IPv6 address with a '::' or 3+ groups has one
IPV6_CHARS = frozenset("0123456789abcdefABCDEF:")
_PHONE_END = r"(?![A-Za-z0-9_]|[.-]\d)"
PHONES = [  # one pattern per shape (four literal-prefixed scans beat one alternation)
    re.compile(
        r"\+(?<![A-Za-z0-9_+.-]\+)\d{1,3}[ .-]?(?:\(\d{1,5}\)[ .-]?)?\d{1,5}(?:[ .-]?\d{1,5}){1,5}"
        + _PHONE_END
    ),
    re.compile(r"\((?<![A-Za-z0-9_+.-]\()\d{1,5}\) ?\d{1,5}(?:[ -]\d{1,5}){0,4}" + _PHONE_END),  # (area) ...
    re.compile(r"[0-9](?<![A-Za-z0-9_+.-][0-9])[0-9]{0,4}[ -][0-9]{1,5}(?:[ -][0-9]{1,5}){0,4}" + _PHONE_END),
    re.compile(r"1(?<![A-Za-z0-9_+.-]1)[3-9][0-9]{9}" + _PHONE_END),  # Chinese mobile, no separators
]


def _entropy(value: str) -> float:
    return Base64HighEntropyString().calculate_shannon_entropy(value)


def _find_secrets(text: str) -> Iterable[tuple[int, int]]:
    if "-----BEGIN" in text:
        for m in PEM.finditer(text):
            yield m.span()
    for p in SECRET_PATTERNS:
        for m in p.finditer(text):
            yield m.span()
    for m in QUOTED.finditer(text):
        v = m.group("v")
        if (
            KEY_NAME.search(text, max(0, m.start() - 64), m.start())
            and any(c.isdigit() for c in v)
            and _entropy(v) > ENTROPY_BITS
        ):
            yield m.span("v")


def _find_emails(text: str) -> Iterable[tuple[int, int]]:
    """The domain is found from its '@' (a literal, fast to scan for), the local part backwards from it."""
    if "@" not in text:
        return
    for m in EMAIL_DOMAIN.finditer(text):
        local = EMAIL_LOCAL.search(text, max(0, m.start() - 64), m.start())
        if local is None:
            continue
        try:
            email_validator.validate_email(
                text[local.start() : m.end()], check_deliverability=False, globally_deliverable=False
            )
        except email_validator.EmailNotValidError:
            continue
        yield local.start(), m.end()


def _find_cn_ids(text: str) -> Iterable[tuple[int, int]]:
    for m in CN_ID.finditer(text):
        if ric.is_valid(m.group()):
            yield m.span()


def _find_ibans(text: str) -> Iterable[tuple[int, int]]:
    for m in IBAN.finditer(text):
        if std_iban.is_valid(m.group()):
            yield m.span()


def _find_cards(text: str) -> Iterable[tuple[int, int]]:
    for m in CARD.finditer(text):
        s = m.group()
        digits = s.replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and not (" " in s and "-" in s) and luhn.is_valid(digits):
            yield m.span()


def _find_ips(text: str) -> Iterable[tuple[int, int]]:
    for m in IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())
        except ValueError:
            continue
        yield m.span()
    end = 0
    for m in IPV6_SEED.finditer(text):
        if m.start() < end:
            continue
        a, end = m.start(), m.end()
        while a > 0 and end - a < 45 and text[a - 1] in IPV6_CHARS:
            a -= 1
        while end < len(text) and end - a < 45 and text[end] in IPV6_CHARS:
            end += 1
        s = text[a:end]
        if (a and (text[a - 1].isalnum() or text[a - 1] in "_.")) or (
            end < len(text) and text[end].isalnum()
        ):
            continue
        if sum(1 for g in s.split(":") if g) < 3 or not any(c.isdigit() for c in s):
            continue
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            continue
        yield a, end


def _valid_phone(s: str) -> bool:
    """libphonenumber's is_valid_number: `+...` in its own country; a national number (10+ digits, one
    kind of separator, so dates and number lists stay) in one of PHONE_REGIONS."""
    digits = sum(c.isdigit() for c in s)
    international = s.startswith("+")
    if not (7 if international else 10) <= digits <= 15:
        return False
    if not international and " " in s.replace(") ", ")") and "-" in s:
        return False
    regions: tuple[str | None, ...] = (None,) if international else PHONE_REGIONS
    for region in regions:
        try:
            n = phonenumbers.parse(s, region)
        except phonenumbers.NumberParseException:
            continue
        if phonenumbers.is_valid_number(n):
            return True
    return False


def _find_phones(text: str) -> Iterable[tuple[int, int]]:
    for pattern in PHONES:
        for m in pattern.finditer(text):
            if _valid_phone(m.group()):
                yield m.span()


# the order is the priority when two candidates overlap
DETECTORS: dict[str, Callable[[str], Iterable[tuple[int, int]]]] = {
    "secret": _find_secrets,
    "email": _find_emails,
    "cn_id": _find_cn_ids,
    "iban": _find_ibans,
    "card": _find_cards,
    "ip": _find_ips,
    "phone": _find_phones,
}


def find_pii(text: str, types: Iterable[str] = TYPES) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans of `text`, sorted by start."""
    taken: list[tuple[int, int, str]] = []
    for kind in types:
        for a, b in DETECTORS[kind](text):
            if not any(a < tb and ta < b for ta, tb, _ in taken):
                taken.append((a, b, kind))
    return sorted(taken)


def scrub_text(text: str, types: Iterable[str] = TYPES) -> tuple[str, Counter]:
    """`text` with every item found replaced by its placeholder, and the count per type."""
    spans = find_pii(text, types)
    if not spans:
        return text, Counter()
    out, pos = [], 0
    for a, b, kind in spans:
        out += [text[pos:a], PLACEHOLDERS[kind]]
        pos = b
    out.append(text[pos:])
    return "".join(out), Counter(kind for _, _, kind in spans)


class ScrubReport:
    """Counts per type, overall and per file (files with nothing found are not listed)."""

    def __init__(self) -> None:
        self.totals: Counter = Counter()
        self.files: dict[str, Counter] = {}
        self.docs = 0
        self.bytes = 0

    def add(self, source: str, counts: Counter, nbytes: int) -> None:
        self.docs += 1
        self.bytes += nbytes
        if counts:
            self.totals.update(counts)
            self.files.setdefault(source, Counter()).update(counts)

    def to_dict(self) -> dict:
        return {
            "format": "yuyan-scrub-report",
            "version": VERSION,
            "placeholders": PLACEHOLDERS,
            "documents": self.docs,
            "bytes": self.bytes,
            "totals": {t: self.totals.get(t, 0) for t in TYPES},
            "files": {f: {t: c[t] for t in TYPES if c[t]} for f, c in sorted(self.files.items())},
        }

    def table(self, max_files: int = 20):
        """A rich Table: one row per file (the most hits first, at most `max_files`), then the totals."""
        from rich.table import Table

        t = Table(title=f"scrubbed {self.docs} documents, {self.bytes / 1e6:.2f} MB")
        t.add_column("file")
        for kind in TYPES:
            t.add_column(PLACEHOLDERS[kind], justify="right")
        ranked = sorted(self.files.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
        for f, c in ranked[:max_files]:
            t.add_row(f, *(str(c[k]) for k in TYPES))
        if len(ranked) > max_files:
            t.add_row(f"... {len(ranked) - max_files} more files (see scrub_report.json)", *[""] * len(TYPES))
        t.add_row("total", *(str(self.totals[k]) for k in TYPES), style="bold")
        return t


class Scrubber:
    """What `prepare --scrub` and `yuyan scrub` apply to every document: scrub_text plus a report."""

    def __init__(self, mode: str = "pii") -> None:
        if mode not in SCRUB_CHOICES:
            raise UserError(f"unknown --scrub {mode!r}; the only choice is pii")
        self.mode = mode
        self.report = ScrubReport()

    @property
    def fingerprint(self) -> str:
        """What meta.json records, so shards made with another setting (or detector version) are rebuilt."""
        return f"{self.mode}-v{VERSION}"

    def __call__(self, text: str, source: str) -> str:
        out, counts = scrub_text(text)
        self.report.add(source, counts, len(text.encode("utf-8")))
        return out


# ------------------------------------------------------------------------------- scrubbed copies
REPORT = "scrub_report.json"
COPY_DIR = "corpus"  # OUT/corpus holds the copies, so OUT's report and marker are never part of it
_RECORD = re.compile(r"(.+):([0-9]+)")


def _record_of(doc: Document) -> tuple[str, int] | None:
    """(output file, line) of a record's document, None for a text file's. A record's source is
    `base:n` (yuyan.data.corpus); its copy is base.jsonl line n, so the copy keeps its split key."""
    m = _RECORD.fullmatch(doc.source)
    if m is None:
        return None
    base = m.group(1)
    suffix = record_suffix(base)
    if suffix is None and "." in Path(base).name:  # a text file whose name ends in :digits
        return None
    return base[: len(base) - len(suffix or "")] + ".jsonl", int(m.group(2))


class _CopyWriter:
    """Writes scrubbed documents under `root`: a text file's pieces into one file at its relative path,
    a record into line n of base.jsonl (blank lines keep the numbering of skipped and bad lines)."""

    def __init__(self, root: Path, text_field: str):
        self.root, self.text_field = root, text_field
        self.files: dict[str, object] = {}
        self.lines: dict[str, int] = {}
        self.record: tuple[str, int] | None = None
        self.parts: list[str] = []

    def _file(self, rel: str):
        if rel not in self.files:
            path = self.root / rel
            if not path.resolve().is_relative_to(self.root.resolve()):
                raise UserError(f"corpus file {rel!r} lies outside the corpus root; cannot copy it")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.files[rel] = open(path, "w", encoding="utf-8", newline="")  # noqa: SIM115 (closed in close())
            self.lines[rel] = 0
        return self.files[rel]

    def write(self, doc: Document, text: str) -> None:
        rec = _record_of(doc)
        if rec != self.record:
            self._flush_record()
        if rec is None:
            self._file(doc.source).write(text)
        else:
            self.record = rec
            self.parts.append(text)

    def _flush_record(self) -> None:
        if self.record is not None:
            rel, n = self.record
            f = self._file(rel)
            f.write("\n" * (n - 1 - self.lines[rel]))
            f.write(json.dumps({self.text_field: "".join(self.parts)}, ensure_ascii=False) + "\n")
            self.lines[rel] = n
        self.record, self.parts = None, []

    def close(self) -> None:
        self._flush_record()
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()


def scrub_corpus(
    spec: str,
    out_dir: str | os.PathLike,
    text_field: str = "text",
    extensions: list[str] | tuple[str, ...] | None = None,
    force: bool = False,
    mode: str = "pii",
) -> ScrubReport:
    """Scrubbed copies of corpus `spec` in `out_dir`/corpus (one file per text file, base.jsonl per record
    file) and `out_dir`/scrub_report.json. Written under a temp folder and renamed into place, the report
    last; `out_dir` follows the safe-output rule (yuyan.fsutil)."""
    scrubber = Scrubber(mode)
    docs = iter_documents(spec, "all", text_field, extensions)  # checks the spec before anything is written
    out = mark_ours(
        check_output_dir(out_dir, force=force, sources=(None if spec == "stdlib" else spec,)), "scrub"
    )
    tmp = out / f".scrub-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        writer = _CopyWriter(tmp / COPY_DIR, text_field)
        try:
            for doc in docs:
                writer.write(doc, scrubber(doc.text, doc.source))
        finally:
            writer.close()
        _publish(tmp, out, scrubber.report)
    except OSError as e:
        raise UserError(os_error_line(e, out)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return scrubber.report


def _publish(tmp: Path, out: Path, report: ScrubReport) -> None:
    """The new copies replace the old ones (two renames: a kill between them leaves no copies, never half
    of them), then the report, which is written last and so only ever describes copies that are whole."""
    (tmp / COPY_DIR).mkdir(exist_ok=True)
    old = tmp / "old"
    if (out / COPY_DIR).exists():
        os.replace(out / COPY_DIR, old)
    os.replace(tmp / COPY_DIR, out / COPY_DIR)
    with open(tmp / REPORT, "w", encoding="utf-8") as f:
        f.write(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp / REPORT, out / REPORT)


__all__ = [
    "DETECTORS",
    "PLACEHOLDERS",
    "PRIVACY_EXTRA",
    "REPORT",
    "COPY_DIR",
    "SCRUB_CHOICES",
    "TYPES",
    "ScrubReport",
    "Scrubber",
    "find_pii",
    "scrub_corpus",
    "scrub_text",
]
