"""`yuyan generate` and `yuyan chat` run end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest


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
