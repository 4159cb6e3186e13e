"""Files, folders and hostile inputs (issue 15): each test shows a guarantee of RELIABILITY.md's section
"Files, folders and the command line" and fails on the code before it.

Safe output folders (yuyan.fsutil.check_output_dir), one lock per run folder, one resolver for manifest
entries, one reader of corpus folder entries, one OS-error mapper, finite weights, the tokenizer-size mask
of the decode core. Anything that could hang (a FIFO, /dev/zero) runs in a subprocess with a timeout.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_checkpoint, tiny_config
from yuyan.cli import main
from yuyan.errors import UserError
from yuyan.fsutil import MARKER, os_error_line
from yuyan.model.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from yuyan.model.transformer import Transformer

TESTS = Path(__file__).parent
ROOT = TESTS.parent


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`yuyan ARGS` in this process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code or 0, out, err


def one_error(code: int, err: str) -> str:
    """The single `error:` line of a refused command (exit 2, no traceback)."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------------- safe output folders


def test_to_hf_refuses_a_foreign_folder_and_force_keeps_its_files(tmp_path, tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    dest = tmp_path / "mine"
    (dest / "sub").mkdir(parents=True)
    (dest / "notes.txt").write_text("my notes")
    (dest / "sub" / "data.csv").write_text("1,2")
    before = tree(dest)
    line = one_error(*cli(capsys, "convert", "to-hf", ckpt, dest)[::2])
    assert "notes.txt" in line and "--force" in line
    assert tree(dest) == before  # nothing touched
    code, _, err = cli(capsys, "convert", "to-hf", ckpt, dest, "--force")
    assert code == 0, err
    after = tree(dest)
    assert after["notes.txt"] == b"my notes" and after["sub/data.csv"] == b"1,2"  # kept, not deleted
    assert "model.safetensors" in after and "config.json" in after
    # the folder is ours now: a re-run replaces our files and still keeps the user's
    code, _, err = cli(capsys, "convert", "to-hf", ckpt, dest)
    assert code == 0, err
    assert tree(dest)["notes.txt"] == b"my notes" and (dest / "sub" / "data.csv").exists()


def test_convert_never_writes_into_its_own_source(tmp_path, tokenizer, capsys):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    before = tree(ckpt)
    for dest in (ckpt, ckpt / "inside", tmp_path):  # is the source, inside it, holds it
        line = one_error(*cli(capsys, "convert", "to-hf", ckpt, dest, "--force")[::2])
        assert "input" in line
    assert tree(ckpt) == before
    load_checkpoint(ckpt)  # still whole and verified
    hf = tmp_path / "hf"
    assert cli(capsys, "convert", "to-hf", ckpt, hf)[0] == 0
    one_error(*cli(capsys, "convert", "from-hf", hf, hf)[::2])
    # re-running a command into its own previous output keeps working
    assert cli(capsys, "convert", "from-hf", hf, tmp_path / "back")[0] == 0
    assert cli(capsys, "convert", "from-hf", hf, tmp_path / "back")[0] == 0


@pytest.mark.parametrize("command", ["tokenizer", "prepare", "inspect", "eval"])
def test_every_folder_writer_refuses_a_foreign_folder(tmp_path, tokenizer, capsys, command):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    dest = tmp_path / "theirs"
    dest.mkdir()
    (dest / "thesis.tex").write_text("years of work")
    args = {
        "tokenizer": ["tokenizer", "train", "--corpus", corpus, "--vocab-size", "300", "--out", dest],
        "prepare": ["prepare", "--corpus", corpus, "--tokenizer", ckpt, "--out", dest],
        "inspect": ["inspect", "surprise", "--model", ckpt, "--text", "def f(x):", "--out", dest],
        "eval": ["eval", "perplexity", "--model", ckpt, "--corpus", corpus, "--out", dest],
    }[command]
    line = one_error(*cli(capsys, *args)[::2])
    assert "thesis.tex" in line
    assert sorted(p.name for p in dest.iterdir()) == ["thesis.tex"]
    code, _, err = cli(capsys, *args, "--force")
    assert code == 0, err
    assert (dest / "thesis.tex").read_text() == "years of work" and (dest / MARKER).exists()
    code, _, err = cli(capsys, *args)  # ours now: a re-run needs no --force
    assert code == 0, err


# ------------------------------------------------------------------------------ one lock per run folder


def _worker(out: Path, overrides: dict, resume: bool = False) -> list[str]:
    cmd = [sys.executable, str(TESTS / "_train_worker.py"), str(out), json.dumps(overrides)]
    return cmd + (["--resume"] if resume else [])


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen, timeout: float = 90) -> None:
    t = time.time()
    while not list_checkpoints(out):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() - t < timeout, "no checkpoint appeared"
        time.sleep(0.05)


def test_a_second_run_on_a_folder_fails_at_once_naming_the_holder(tmp_path, run_cli):
    out = tmp_path / "run"
    ov = {"train.max_steps": "100000", "checkpoint.every_steps": "5", "eval.every": "0"}
    holder = subprocess.Popen(_worker(out, ov), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_checkpoint(out, holder)
        # the library path (fit) and the command line, resumed or not, both refuse while it runs
        t = time.time()
        p = subprocess.run(_worker(out, ov, resume=True), capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and f"pid {holder.pid}" in p.stderr and str(out) in p.stderr
        assert time.time() - t < 60
        for extra in (["--resume"], []):
            p = run_cli("train", *extra, "--checkpoint.dir", out, "--data.corpus", "stdlib", timeout=120)
            line = one_error(p.returncode, p.stderr)
            assert f"pid {holder.pid}" in line and str(out) in line
        assert holder.poll() is None  # the holder was not disturbed
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # the kernel dropped the killed holder's lock: a resume runs, and metrics never repeat or go back
    step = int(list_checkpoints(out)[-1].name.split("-")[1])
    p = subprocess.run(
        _worker(out, {**ov, "train.max_steps": str(step + 6)}, resume=True),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if r["split"] == "train"]
    assert steps == sorted(set(steps)) and steps[-1] == step + 6


def test_metrics_rows_that_go_backwards_are_dropped_on_resume(tmp_path):
    from yuyan.train.loop import _read_metrics  # noqa: PLC2701 (the loop's own reader, tested directly)

    f = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "split": "train"} for s in (1, 2, 3, 4, 2, 3, 5, 6)]  # an overlapping older run
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r["step"] for r in _read_metrics(f, 5)] == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------- one resolver for manifest entries

HOSTILE = r"""
import json, os, sys
from pathlib import Path
import yuyan
from yuyan.errors import UserError
results = {}
for case in sys.argv[1:]:
    try:
        yuyan.load(case)
        results[case] = "loaded"
    except UserError as e:
        results[case] = "refused: " + str(e)
print(json.dumps(results))
"""


def _tamper(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    mf = dest / "manifest.json"
    m = json.loads(mf.read_text())
    edit(m, dest)
    mf.write_text(json.dumps(m))
    return dest


def test_manifest_entries_are_regular_files_inside_the_folder(tmp_path, tokenizer):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the model folder")

    def add(name, target=None):
        def edit(m, dest):
            if target is not None:
                os.symlink(target, dest / name)
            m["files"][name] = {"sha256": "0" * 64, "bytes": 1}

        return edit

    def drop_weights(m, dest):
        del m["files"]["model.safetensors"]

    cases = {
        "dotdot": add("../secret.txt"),
        "absolute": add(str(secret)),
        "symlink_out": add("link.txt", secret),
        "fifo": lambda m, d: (
            os.mkfifo(d / "pipe"),
            m["files"].update(pipe={"sha256": "0" * 64, "bytes": 1}),
        ),
        "devzero": add("zero", "/dev/zero"),
        "empty": lambda m, d: m.update(files={}),
        "uncovered": drop_weights,
        "wrong_shape": lambda m, d: m.update(files=["model.safetensors"]),
        "bad_entry": lambda m, d: m["files"].update({"config.json": "abc"}),
    }
    paths = {k: _tamper(ckpt, tmp_path / "cases" / k, edit) for k, edit in cases.items()}
    (tmp_path / "list").mkdir()
    shutil.copytree(ckpt, tmp_path / "list", dirs_exist_ok=True)
    (tmp_path / "list" / "manifest.json").write_text("[1, 2]")
    paths["not_object"] = tmp_path / "list"
    p = subprocess.run(
        [sys.executable, "-c", HOSTILE, *map(str, paths.values())],
        capture_output=True,
        text=True,
        timeout=120,  # a FIFO or /dev/zero read would hang here
    )
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads(p.stdout.strip().splitlines()[-1])
    for name, path in paths.items():
        assert res[str(path)].startswith("refused: "), (name, res[str(path)])
    assert "outside" in res[str(paths["dotdot"])] and "outside" in res[str(paths["symlink_out"])]
    assert "not a regular file" in res[str(paths["fifo"])]
    assert "outside" in res[str(paths["devzero"])]
    assert "does not cover model.safetensors" in res[str(paths["uncovered"])]


def test_config_version_newer_than_ours_is_refused(tmp_path, tokenizer):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    cfg = json.loads((ckpt / "config.json").read_text())
    for version in (999, "1", None):
        cfg["version"] = version
        (ckpt / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(UserError, match="version"):
            load_checkpoint(ckpt, verify=False)


# ----------------------------------------------------------------------- NaN weights, NaN configs


def test_nan_or_inf_weights_are_refused_naming_the_tensor(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size))
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["layers.1.self_attn.v_proj.weight"][3, 5] = float("nan")
    ckpt = save_checkpoint(tmp_path / "nan", model, tokenizer)
    with pytest.raises(UserError, match=r"layers\.1\.self_attn\.v_proj\.weight holds 1 NaN"):
        load_checkpoint(ckpt)
    with torch.no_grad():
        params["layers.1.self_attn.v_proj.weight"][3, 5] = 0.0
        model.embed_tokens.weight[0, 0] = float("inf")
    ckpt = save_checkpoint(tmp_path / "inf", model, tokenizer)
    with pytest.raises(UserError, match=r"embed_tokens\.weight"):
        load_checkpoint(ckpt)


def test_config_with_nan_or_bad_values_is_one_line_naming_config_json(tmp_path, tokenizer):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    good = json.loads((ckpt / "config.json").read_text())
    bad = [("dropout", float("nan")), ("norm_eps", float("nan")), ("dropout", 2.0), ("rope_theta", 1e999)]
    for key, value in [*bad, ("n_head", "four"), ("d_model", 0), ("n_layer", -1)]:
        (ckpt / "config.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(UserError, match="config.json"):
            load_checkpoint(ckpt, verify=False)


# -------------------------------------------------------------------------------- corpus entries

READ_CORPUS = r"""
import json, sys
from yuyan.data.corpus import CorpusStats, iter_documents
from yuyan.errors import UserError
stats = CorpusStats()
try:
    docs = list(iter_documents(sys.argv[1], "all", stats=stats))
    print(json.dumps({"docs": len(docs), "special": stats.skipped_special,
                      "bad_name": stats.skipped_bad_name, "summary": stats.summary()}))
except UserError as e:
    print(json.dumps({"error": str(e)}))
"""


def _read_corpus(spec: Path) -> dict:
    p = subprocess.run(
        [sys.executable, "-c", READ_CORPUS, str(spec)], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_corpus_skips_fifos_and_non_utf8_names_and_refuses_a_fifo_corpus(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "good.txt").write_text("hello world\n" * 10)
    os.mkfifo(d / "pipe.txt")  # opening it would block forever
    os.symlink("/dev/zero", d / "zero.txt")  # reading it would never end
    (Path(os.fsdecode(bytes(d) + b"/caf\xe9.txt"))).write_bytes(b"latin-1 name\n")
    res = _read_corpus(d)
    assert res.get("docs") == 1 and res["special"] == 2 and res["bad_name"] == 1, res
    assert "not regular files" in res["summary"] and "non-UTF-8 names" in res["summary"]
    res = _read_corpus(d / "pipe.txt")
    assert "not a regular file" in res["error"]


# ----------------------------------------------------------------------------------- OS errors


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(
    tmp_path, tokenizer, monkeypatch
):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    before = tree(ckpt)
    torch.manual_seed(1)
    model = Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size))
    failures = {
        "torch": RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4224 vs 4112"),
        "safetensors": __import__("safetensors").SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'
        ),
        "os": OSError(errno.ENOSPC, "No space left on device"),
        "readonly": OSError(errno.EROFS, "Read-only file system"),
    }
    import yuyan.model.checkpoint as C

    for kind, exc in failures.items():

        def fail(*a, exc=exc, **k):
            raise exc

        if kind == "torch":
            monkeypatch.setattr(C.torch, "save", fail)
            kw = {"trainer_state": {"step": 1}}
        else:
            monkeypatch.setattr(C, "save_file", fail)
            kw = {}
        with pytest.raises(UserError) as e:
            save_checkpoint(ckpt, model, tokenizer, **kw)
        msg = str(e.value)
        assert str(ckpt) in msg and "unchanged" in msg, msg
        if kind in ("safetensors", "os"):
            assert "no space left" in msg
        if kind == "readonly":
            assert "read-only" in msg
        monkeypatch.undo()
        assert tree(ckpt) == before  # the previous checkpoint is whole
        assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no temp folder left
    load_checkpoint(ckpt)


def test_os_error_mapper_names_path_and_fix():
    assert "free some space" in os_error_line(OSError(errno.ENOSPC, "x", "/data/f"))
    assert os_error_line(OSError(errno.EACCES, "x", "/data/f")).startswith("/data/f: permission denied")
    line = os_error_line(
        RuntimeError("[enforce fail at inline_container.cc:1] . PytorchStreamWriter failed"), "/d"
    )
    assert line.startswith("/d") and "full" in line


# ------------------------------------------------------------------ tokenizer smaller than the model


def test_padded_vocabulary_ids_are_never_chosen_and_never_vanish(tokenizer):
    from yuyan.generate import GenerationConfig, SamplingParams, generate

    V = tokenizer.vocab_size
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", vocab_size=V + 16)).eval()  # padded like GPT-2's 50304
    with torch.no_grad():
        model.lm_head.weight[:V] = 0.0  # every real id scores 0; the padding rows score higher at most steps
        model.lm_head.weight[V:] = torch.randn(16, model.config.d_model) * 10
    # (the end-of-text id, which would score like every real id, must not end the test early)
    greedy = SamplingParams(temperature=0.0)
    for sampling, beams in ((greedy, 1), (SamplingParams(temperature=1.0, seed=3), 1), (greedy, 3)):
        ((c,),) = generate(
            model,
            tokenizer,
            ["def f(x):"],
            GenerationConfig(max_new_tokens=12, sampling=sampling, stop_token_ids=[V - 1], num_beams=beams),
        )
        assert len(c.token_ids) == 12 and max(c.token_ids) < V, (beams, c.token_ids)
        assert c.text == tokenizer.decode(c.token_ids)
    with pytest.raises(UserError, match=f"token id {V}"):  # decoding an id the tokenizer lacks: an error
        tokenizer.decode([5, V, 7])


def test_a_tokenizer_larger_than_the_model_is_refused_at_load(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = Transformer(tiny_config("gpt2", vocab_size=tokenizer.vocab_size - 8))
    ckpt = save_checkpoint(tmp_path / "small", model, tokenizer)
    with pytest.raises(UserError, match="tokenizer"):
        load_checkpoint(ckpt)


# ------------------------------------------------------------------------------------- CLI argv


def test_invalid_utf8_bytes_in_a_prompt_argument_are_one_line(tmp_path, tokenizer):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    env = {**os.environ, "PYTHONUTF8": "1"}
    p = subprocess.run(
        [sys.executable, "-m", "yuyan", "generate", "--model", str(ckpt), "--prompt", b"caf\xe9 \xff"],
        capture_output=True,
        timeout=120,
        env=env,
    )
    line = one_error(p.returncode, p.stderr.decode("utf-8", "replace"))
    assert "UTF-8" in line


def test_a_fifo_as_tokenizer_json_or_config_json_is_refused_not_read(tmp_path, tokenizer):
    ckpt = make_checkpoint(tmp_path / "ckpt", tokenizer)
    for name in ("tokenizer.json", "config.json"):
        d = tmp_path / name.split(".")[0]
        shutil.copytree(ckpt, d)
        (d / "manifest.json").unlink()  # no checksum to stop it first: the reader itself must refuse
        (d / name).unlink()
        os.mkfifo(d / name)
        code = f"import yuyan\ntry:\n    yuyan.load({str(d)!r})\nexcept yuyan.UserError as e:\n    print(e)"
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and "not a regular file" in p.stdout, p.stdout + p.stderr[-2000:]
