"""`yuyan generate` and `yuyan chat` run end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
from tests.conftest import cli_in_process


@pytest.mark.parametrize("family", ["llama"])
def test_generate_cli(run_cli, tiny_checkpoint, tmp_path):
    p = run_cli(
        "generate",
        "--model",
        tiny_checkpoint,
        "--prompt",
        "def f",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0",
        "--n",
        "1",
        "--json",
        check=True,
    )
    rec = json.loads(p.stdout.strip().splitlines()[-1])
    assert rec["prompt"] == "def f" and len(rec["completions"][0]["token_ids"]) <= 8
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("import os\nclass A:\n", encoding="utf-8")
    p = run_cli(
        "generate",
        "--model",
        tiny_checkpoint,
        "--prompts-file",
        prompts,
        "--max-new-tokens",
        "5",
        "--seed",
        "1",
        "--top-k",
        "20",
        "--quantize",
        "int8",
        "--json",
        check=True,
    )
    assert [json.loads(ln)["prompt"] for ln in p.stdout.strip().splitlines()] == ["import os", "class A:"]
    # streaming from stdin equals the non-streamed text
    s = run_cli(
        "generate",
        "--model",
        tiny_checkpoint,
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--stream",
        input="x = ",
        check=True,
    )
    g = run_cli(
        "generate",
        "--model",
        tiny_checkpoint,
        "--max-new-tokens",
        "12",
        "--temperature",
        "0",
        "--beams",
        "1",
        "--prompt",
        "x = ",
        check=True,
    )
    assert s.stdout == g.stdout
    spec = run_cli("generate", "--model", tiny_checkpoint, "--max-new-tokens", "12", "--temperature", "0",
                   "--speculative", "3", "--stream", input="x = ", check=True)  # fmt: skip
    assert spec.stdout == g.stdout  # speculative decoding streams the same greedy text
    bad = run_cli("generate", "--model", tiny_checkpoint, "--prompt", "x", "--top-p", "1.5")
    assert bad.returncode == 2 and bad.stderr.startswith("error: invalid sampling setting: top_p")
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize("family", ["gpt2"])
def test_chat_cli(run_cli, tiny_checkpoint):
    p = run_cli(
        "chat",
        "--model",
        tiny_checkpoint,
        "--max-new-tokens",
        "6",
        "--seed",
        "0",
        input="hello\n/reset\nwho are you?\n/exit\nnot read\n",
        check=True,
    )
    lines = p.stdout.splitlines()
    assert "(history cleared)" in lines and len(lines) >= 3


def test_every_generation_setting_is_an_option_of_generate(capsys, monkeypatch):
    from yuyan.cli.common import HELP, settings

    monkeypatch.setenv("COLUMNS", "300")  # rich cuts long option names in a narrow terminal
    from yuyan.generate import GenerationConfig

    flat = set(GenerationConfig().to_dict())
    assert {s.name for s in settings()} == flat  # the flat form: sampling's fields beside the others
    assert set(HELP) == flat  # each setting has its line of help
    code, out, _ = cli_in_process(capsys, "generate", "--help")
    assert code == 0
    words = set(out.replace("│", " ").replace(",", " ").split())
    for s in settings():
        assert s.flags[0] in words, s.name
    assert "--beams" in out and "--no-sliding-window" in out
    # a chat streams one reply a turn: the settings it cannot honour are not offered
    code, out, _ = cli_in_process(capsys, "chat", "--help")
    assert code == 0 and "--top-p" in out and "0.95" in out
    assert not {"--n", "--num-beams", "--logprobs", "--stop-token-ids", "--context-overflow"} & set(
        out.replace("│", " ").split()
    )


@pytest.mark.parametrize("family", ["gpt2"])
def test_generation_flags_reach_the_config(tiny_checkpoint, capsys, monkeypatch):
    import yuyan.generate
    from yuyan.generate import Completion

    seen = []

    def fake_generate(model, tokenizer, prompts, config):
        seen.append(config)
        return [[Completion("", [], "length")] for _ in prompts]

    monkeypatch.setattr(yuyan.generate, "generate", fake_generate)
    code, _, err = cli_in_process(
        capsys, "generate", "--model", tiny_checkpoint, "--prompt", "x", "--json",
        "--frequency-penalty", "0.5", "--presence-penalty", "0.25", "--stop", "\n", "--stop", "END",
        "--logprobs", "2", "--stop-token-ids", "3", "--stop-token-ids", "7", "--context-overflow", "error",
        "--no-sliding-window", "--min-p", "0.1", "--seed", "4", "--n", "2",
    )  # fmt: skip
    assert code == 0, err
    cfg = seen[0]
    assert cfg.sampling.frequency_penalty == 0.5 and cfg.sampling.presence_penalty == 0.25
    assert cfg.stop == ["\n", "END"] and cfg.stop_token_ids == [3, 7] and cfg.logprobs == 2
    assert cfg.context_overflow == "error" and cfg.sliding_window is False
    assert (cfg.sampling.min_p, cfg.sampling.seed, cfg.sampling.n) == (0.1, 4, 2)
    # the command's own defaults (max_new_tokens 128, temperature 0.8); beam settings, --beams spelling
    assert cfg.max_new_tokens == 128 and cfg.sampling.temperature == 0.8
    code, _, err = cli_in_process(
        capsys, "generate", "--model", tiny_checkpoint, "--prompt", "x", "--beams", "3", "--n", "2",
        "--length-penalty", "0.5", "--early-stopping", "never",
    )  # fmt: skip
    assert code == 0, err
    assert (seen[1].num_beams, seen[1].length_penalty, seen[1].early_stopping) == (3, 0.5, "never")
    cli_in_process(
        capsys, "generate", "--model", tiny_checkpoint, "--prompt", "x", "--early-stopping", "true"
    )
    assert seen[2].early_stopping is True


def test_a_bad_setting_is_one_error_line_from_validate(capsys, tmp_path):
    missing = tmp_path / "no-model"  # validate() runs before the model is loaded
    for args, message in [
        (["--top-p", "1.5"], "error: invalid sampling setting: top_p"),
        (["--early-stopping", "maybe"], "error: invalid generation setting: early_stopping"),
        (["--beams", "2", "--n", "3"], "error: invalid generation setting: n (3) must be <= num_beams (2)"),
        (["--context-overflow", "wrap"], "error: invalid generation setting: context_overflow"),
    ]:
        code, _, err = cli_in_process(capsys, "generate", "--model", missing, "--prompt", "x", *args)
        assert code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("family", ["gpt2"])
def test_logprobs_and_stop_strings_in_the_output(tiny_checkpoint, capsys):
    args = ["generate", "--model", tiny_checkpoint, "--prompt", "def f", "--max-new-tokens", "6",
            "--temperature", "0", "--json"]  # fmt: skip
    code, out, _ = cli_in_process(capsys, *args, "--logprobs", "2")
    assert code == 0
    comp = json.loads(out)["completions"][0]
    assert [t["token_id"] for t in comp["logprobs"]] == comp["token_ids"]
    assert all(len(t["top"]) == 2 and t["logprob"] <= 0 for t in comp["logprobs"])
    # two stop strings: the text is cut before the first of either
    full = comp["text"]
    a, b = full[1:3], full[4:5]
    code, out, _ = cli_in_process(capsys, *args, "--stop", a, "--stop", b)
    cut = min(i for i in (full.find(a), full.find(b)) if i >= 0)
    assert code == 0 and json.loads(out)["completions"][0]["text"] == full[:cut]
    code, _, err = cli_in_process(capsys, *args[:-1], "--logprobs", "2")
    assert code == 2 and err.startswith("error: --logprobs") and "--json" in err


def test_eval_scores_given_predictions_without_generation_options(capsys, tmp_path):
    preds = tmp_path / "preds.jsonl"
    preds.write_text(json.dumps({"prediction": "a cat", "reference": "a cat"}) + "\n", encoding="utf-8")
    code, _, err = cli_in_process(capsys, "eval", "bleu", "--predictions", preds, "--temperature", "0.5")
    assert code == 2 and err.startswith("error: --predictions are scored as given; drop --temperature")
    code, out, err = cli_in_process(capsys, "eval", "bleu", "--predictions", preds)
    assert code == 0, err
