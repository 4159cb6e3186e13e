"""Every CLI command refuses bad input with exit status 2 and exactly one `error:` line, never a traceback.

One table of bad inputs (missing, corrupt and hostile files, bad settings, invalid text) runs through every
command `yuyan --help` lists, in this process (cli.main, as the `yuyan` script calls it): an exception that
escapes main() fails the test with its row, so does any exit status but 2 or any stderr but one line.
`test_table_covers_every_command` keeps the table in step with the commands the app registers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint, tiny_config
from yuyan.cli import app, main
from yuyan.model.checkpoint import save_checkpoint
from yuyan.model.hf import export_hf
from yuyan.model.transformer import Transformer

SURROGATE = "caf\udce9"  # what Python makes of the bytes b"caf\xe9" in sys.argv (surrogateescape)

# (command words, arguments with {placeholders}, a word the error line must hold)
TABLE = [
    ("prepare", "--corpus {missing} --tokenizer {model} --out {new}", "corpus"),
    ("prepare", "--corpus {fifo} --tokenizer {model} --out {new}", "regular file"),
    ("prepare", "--corpus {corpus} --tokenizer {missing} --out {new}", "tokenizer"),
    ("prepare", "--corpus {corpus} --tokenizer {model} --out {foreign}", "not empty"),
    ("prepare", "--corpus {corpus} --tokenizer {model} --out {new} --scrub nosuch", "scrub"),
    ("scrub", "--corpus {missing} --out {new}", "corpus"),
    ("scrub", "--corpus {corpus} --out {foreign}", "not empty"),
    ("train", "--config {missing}.toml", "missing"),
    ("train", "--checkpoint.dir {new} --train.lr abc", "train.lr"),
    ("train", "--checkpoint.dir {new} --nosuch.key 1", "nosuch"),
    ("train", "--checkpoint.dir {new} --train.clock sundial", "train.clock"),
    ("train", "--checkpoint.dir {foreign} --data.corpus {corpus}", "not empty"),
    ("demo", "--out {foreign}", "not empty"),
    ("demo", "--out {new} --minutes 0", "minutes"),
    ("generate", "--model {missing} --prompt hi", "not found"),
    ("generate", "--model {bad_manifest} --prompt hi", "manifest"),
    ("generate", "--model {nan} --prompt hi", "NaN"),
    ("generate", "--model {newer} --prompt hi", "version"),
    ("generate", "--model {model} --prompt {surrogate}", "UTF-8"),
    ("generate", "--model {model} --prompt hi --temperature -1", "temperature"),
    ("generate", "--model {model} --prompts-file {missing}", "prompts file"),
    ("chat", "--model {missing}", "not found"),
    ("chat", "--model {model} --top-p 7", "top_p"),
    ("finetune", "--model {model} --data {corpus} --out {new} --task nosuch", "task"),
    ("finetune", "--model {missing} --data {corpus} --out {new} --task lm", "not found"),
    ("finetune", "--model {model} --data {corpus} --out {foreign} --task lm", "not empty"),
    ("finetune", "--model {model} --data {corpus} --out {new} --task lm --dp-epsilon 0", "dp-epsilon"),
    ("finetune", "--model {model} --data {headerless} --out {new} --task classify", "no header row"),
    (
        "finetune",
        "--model {model} --data {headerless} --out {new} --task classify --text-field 0 --label-field 7",
        "no column 7",
    ),
    (
        "finetune",
        "--model {model} --data {headerless} --out {new} --task classify --text-field 0 --label-field 1 --labels a,b,c",
        "--labels",
    ),
    ("finetune", "--model {model} --data {corpus} --out {new} --task lm --labels a,b", "--labels"),
    (
        "finetune",
        "--model {model} --data {corpus} --out {new} --task lm --dp-epsilon 8 --dp-delta 1",
        "dp-delta",
    ),
    ("finetune", "--model {model} --data {corpus} --out {new} --task lm --pooling mean", "classify only"),
    ("finetune", "--model {model} --data {corpus} --out {new} --task sft --no-bucket", "classify only"),
    ("finetune", "--model {model} --data {corpus} --out {new} --task sft --lm-weight 0.5", "classify only"),
    (
        "finetune",
        "--model {model} --data {corpus} --out {new} --task classify --lm-weight -1",
        "classify.lm_weight",
    ),
    (
        "finetune",
        "--model {model} --data {corpus} --out {new} --task lm --pretrain-minutes 1",
        "classify only",
    ),
    ("finetune", "--data {corpus} --out {new} --task classify", "no model"),
    (
        "finetune",
        "--model {model} --data {corpus} --out {new} --task classify --pretrain-minutes 1",
        "--model",
    ),
    ("finetune", "--data {corpus} --out {new} --task classify --pretrain-minutes -1", "pretrain-minutes"),
    (
        "finetune",
        "--model {model} --data {corpus} --out {new} --task classify --pretrain-corpus {corpus}",
        "give both",
    ),
    ("finetune", "--model {model} --data {corpus} --out {new} --task lm --best-metric accuracy", "metric"),
    (
        "finetune",
        "--model {model} --data {corpus} --out {new} --task classify --best-metric f2",
        "best-metric",
    ),
    ("finetune", "--model {model} --data {corpus} --out {new} --task lm --patience -1", "patience"),
    ("finetune", "--model {model} --data {corpus} --out {new} --task classify --dropout 1.5", "dropout"),
    ("finetune", "--model {model} --data {corpus} --out {new} --task classify --pooling max", "pooling"),
    (
        "finetune",
        "--model {model} --data {corpus} --out {new} --task classify --val-examples -1",
        "val_examples",
    ),
    ("train", "--checkpoint.dir {new} --dp-epsilon -1", "dp-epsilon"),
    ("audit canaries insert", "--corpus {missing} --out {new}", "corpus"),
    ("audit canaries insert", "--corpus {corpus} --out {foreign}", "not empty"),
    ("audit canaries insert", "--corpus {corpus} --out {new} --repeats x", "repeats"),
    ("audit canaries report", "--model {model} --canaries {missing}", "canaries"),
    ("audit canaries report", "--model {missing} --canaries {corpus}", "not found"),
    ("audit extraction", "--model {model} --corpus {missing}", "corpus"),
    ("audit extraction", "--model {model} --corpus {corpus} --n 0", "--n"),
    ("serve", "--model {missing}", "not found"),
    ("serve", "--model {model} --http-nice 30", "--http-nice"),
    ("serve", "--model {model} --background-share 0", "--background-share"),
    ("run", "nosuch --model {model} --prompt hi", "task"),
    ("run", "qa --model {model} --prompt hi --source English", "--source"),
    ("run", "generate --model {model} --prompt {surrogate}", "UTF-8"),
    ("tokenizer train", "--corpus {missing} --out {new}", "corpus"),
    ("tokenizer train", "--corpus {corpus} --out {foreign}", "not empty"),
    ("tokenizer encode", "--tokenizer {missing} hello", "tokenizer.json"),
    ("tokenizer encode", "--tokenizer {model} {surrogate}", "UTF-8"),
    ("tokenizer decode", "--tokenizer {model} 1 abc", "integers"),
    ("tokenizer decode", "--tokenizer {model} 99999", "vocabulary"),
    ("tokenizer info", "--tokenizer {bad_tokenizer}", "tokenizer.json"),
    ("convert from-hf", "{missing} {new}", "not found"),
    ("convert from-hf", "{model} {new}", "already a yuyan checkpoint"),
    ("convert from-hf", "{hf_no_head} {new}", "classifier head"),
    ("convert to-hf", "{model} {model}", "input"),
    ("convert to-hf", "{model} {foreign}", "not empty"),
    ("convert to-hf", "{bad_manifest} {new}", "manifest"),
    ("convert to-gguf", "{model} {new}.gguf --outtype q4", "--outtype"),
    ("convert to-gguf", "{model} {foreign}", "folder"),
    ("convert to-gguf", "{missing} {new}.gguf", "not found"),
    ("eval perplexity", "--model {model} --corpus {missing}", "corpus"),
    ("eval perplexity", "--model {model} --corpus {corpus} --out {foreign}", "not empty"),
    ("eval bleu", "", "--data"),
    ("eval rouge", "--predictions {missing}", "not found"),
    ("eval classify", "--model {model} --data {missing}", "not found"),
    ("eval classify", "--model {model} --data {headerless}", "no header row"),
    (
        "eval classify",
        "--model {model} --data {headerless} --text-field 0 --label-field 1",
        "no classification head",
    ),
    ("eval harness", "--model {model} --tasks ,", "no task"),
    ("eval harness", "--model {model} --tasks nosuch_task_xyz --include-path {missing}", "include-path"),
    ("eval harness", "--model {model} --tasks t --limit 0", "--limit"),
    ("eval robustness", "--model {model} --data {missing}", "not found"),
    ("eval robustness", "--model {model} --data {headerless}", "no header row"),
    ("eval robustness", "--model {model} --data {corpus} --attacks nosuch", "attacks"),
    ("eval speed", "--model {model} --batch-sizes x", "batch-sizes"),
    ("eval compare", "{missing} {missing}", "not found"),
    ("eval compare", "{corpus} {corpus}", "JSON"),
    ("inspect attention", "--model {model} --text hi --layers x", "--layers"),
    ("inspect logit-lens", "--model {nan} --text hi --out {new}", "NaN"),
    ("inspect surprise", "--model {model} --text hi --out {foreign}", "not empty"),
    ("inspect attribution", "--model {missing} --text hi --out {new}", "not found"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer) -> dict[str, str]:
    """The placeholders of TABLE: a good checkpoint and broken ones, a FIFO, a foreign folder, a corpus."""
    d = tmp_path_factory.mktemp("cli_errors")
    model = make_checkpoint(d / "model", tokenizer)
    bad = make_checkpoint(d / "bad_manifest", tokenizer)
    (bad / "manifest.json").write_text(json.dumps({"format": "yuyan", "files": ["model.safetensors"]}))
    torch.manual_seed(0)
    m = Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size))
    with torch.no_grad():
        m.lm_head.weight[0, 0] = float("nan")
    nan = save_checkpoint(d / "nan", m, tokenizer)
    newer = make_checkpoint(d / "newer", tokenizer)
    cfg = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**cfg, "version": 999}))
    (newer / "manifest.json").unlink()  # the version check, not the checksum, must refuse it
    (d / "bad_tokenizer").mkdir()
    (d / "bad_tokenizer" / "tokenizer.json").write_text("{not json")
    foreign = d / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    corpus = d / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 200)
    os.mkfifo(d / "fifo")
    headerless = d / "reviews.tsv"  # text<TAB>label rows, no header line
    headerless.write_text("".join(f"review {i}\t{['neg', 'pos'][i % 2]}\n" for i in range(6)))
    clean = Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size))
    hf_no_head = export_hf(
        clean, tokenizer, d / "hf_no_head"
    )  # says it holds a classifier head, lacks the file
    hf_cfg = json.loads((hf_no_head / "config.json").read_text())
    hf_cfg.update(yuyan_classifier={"pooling": "last"}, id2label={"0": "neg", "1": "pos"})
    (hf_no_head / "config.json").write_text(json.dumps(hf_cfg))
    (hf_no_head / "manifest.json").unlink()
    return {
        "model": str(model),
        "bad_manifest": str(bad),
        "nan": str(nan),
        "newer": str(newer),
        "bad_tokenizer": str(d / "bad_tokenizer"),
        "foreign": str(foreign),
        "corpus": str(corpus),
        "fifo": str(d / "fifo"),
        "missing": str(d / "missing"),
        "headerless": str(headerless),
        "hf_no_head": str(hf_no_head),
        "surrogate": SURROGATE,
    }


@pytest.mark.parametrize(("command", "args", "needle"), TABLE, ids=[f"{c} {a}" for c, a, _ in TABLE])
def test_bad_input_is_exit_2_and_one_error_line(files, tmp_path, monkeypatch, capsys, command, args, needle):
    monkeypatch.chdir(tmp_path)  # commands with a default output folder write it here
    monkeypatch.setenv("YUYAN_DECODE_KERNEL", "0")  # the table tests error lines, not the C++ kernel's build
    values = {**files, "new": str(tmp_path / "new")}
    argv = command.split() + [a.format(**values) for a in args.split()]
    with pytest.raises(SystemExit) as e:
        main(argv)  # any other exception is a traceback the user would see: the test fails with it
    _, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert e.value.code == 2, f"exit {e.value.code}: {err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert needle.lower() in lines[0].lower(), lines[0]
    assert sorted(p.name for p in Path(files["foreign"]).iterdir()) == ["thesis.tex"]  # never touched


def _commands(group, prefix: str = "") -> set[str]:
    import typer.main

    click_group = typer.main.get_group(group) if not hasattr(group, "commands") else group
    out = set()
    for name, cmd in click_group.commands.items():
        if hasattr(cmd, "commands"):
            out |= _commands(cmd, f"{prefix}{name} ")
        else:
            out.add(prefix + name)
    return out


def test_table_covers_every_command():
    import yuyan.cli.entry  # noqa: F401 (registers every command on the app)

    assert _commands(app) == {c for c, _, _ in TABLE}


def _leaf_commands(cmd, path=()):
    if hasattr(cmd, "commands"):
        for name, sub in cmd.commands.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def test_every_option_says_its_default_in_help():
    """Every option of every command either shows its default ([default: X]) or says in its help what
    leaving it out does; plain on-switches (absent: off) and required options are exempt."""
    import typer

    from yuyan.cli import app

    silent = []
    for name, cmd in _leaf_commands(typer.main.get_command(app)):
        for p in cmd.params:
            if "Option" not in type(p).__name__ or p.required or p.hidden:
                continue
            if p.is_flag and p.default is False and not p.secondary_opts:
                continue
            shown = p.show_default is not False and p.default is not None and p.default not in ([], ())
            if not shown and "default" not in (p.help or "").lower():
                silent.append(f"{name} {p.opts[0]}")
    assert not silent, silent
