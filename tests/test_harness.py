"""lm-evaluation-harness on a yuyan model, judged against lm_eval's own `hf` backend on the exported folder.

A tiny Llama-style model (random weights, a tokenizer trained in the session) is saved, exported with
`export_hf`, and scored on a 12-item, 4-choice task built here as YAML + JSONL (plus a 3-item task whose
contexts overflow the model's 128-token context, so both backends must cut from the left). Three ways:
in-process (`yuyan.evaluate.harness.HarnessLM`), lm_eval's `hf` backend on the exported folder, and lm_eval's
`local-completions` model against `yuyan serve`'s /v1/completions (echo + logprobs). Per-item
loglikelihoods must agree within 1e-4 and the accuracies exactly. Nothing is downloaded: the tasks are local
files read by the `json` dataset builder, with the Hugging Face libraries offline.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from tests.conftest import cli_in_process, tiny_config

lm_eval = pytest.importorskip("lm_eval")

from yuyan.errors import UserError  # noqa: E402
from yuyan.evaluate.harness import HarnessLM, evaluate_tasks, task_manager  # noqa: E402
from yuyan.model import load  # noqa: E402
from yuyan.model.checkpoint import save_checkpoint  # noqa: E402
from yuyan.model.hf import export_hf  # noqa: E402
from yuyan.model.transformer import Transformer  # noqa: E402

TOL = 1e-4
BLOCK = 128
TASKS = ["yuyan_mc", "yuyan_long"]

QUESTIONS = [
    ("What is 2 + 3?", ["5", "6", "23", "1"], 0),
    ("Which word is a colour?", ["table", "green", "run", "seven"], 1),
    ("The capital of France is", ["Berlin", "Madrid", "Paris", "Rome"], 2),
    ("Python lists are written with", ["()", "{}", "<>", "[]"], 3),
    ("def f(x): return x * 2. What is f(4)?", ["8", "6", "16", "4"], 0),
    ("中国的首都是", ["上海", "北京", "广州", "深圳"], 1),
    ("Which keyword defines a function?", ["class", "import", "def", "with"], 2),
    ("The opposite of hot is", ["warm", "big", "fast", "cold"], 3),
    ("A week has how many days?", ["7", "5", "10", "12"], 0),
    ("Which is a fruit? 😀", ["chair", "apple", "river", "cloud"], 1),
    ("for i in range(3): print(i) prints", ["1 2 3", "0 1", "0 1 2", "3"], 2),
    ("The sun rises in the", ["north", "south", "west", "east"], 3),
]

TASK_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub access while this module runs: the environment variables, and the flags the Hugging Face
    libraries read from them at import (they may have been imported already)."""
    import datasets.config
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as mp:
        for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            mp.setenv(k, "1")
        for mod, name in (
            (datasets.config, "HF_DATASETS_OFFLINE"),
            (datasets.config, "HF_HUB_OFFLINE"),
            (huggingface_hub.constants, "HF_HUB_OFFLINE"),
        ):
            mp.setattr(mod, name, True)
        yield


@pytest.fixture(scope="module")
def setup(offline, tmp_path_factory, tokenizer):
    """(checkpoint folder, exported HF folder, task folder)."""
    root = tmp_path_factory.mktemp("harness")
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", vocab_size=tokenizer.vocab_size, block_size=BLOCK))
    with torch.no_grad():  # logits far from uniform, so the choices' scores are far apart
        model.lm_head.weight.mul_(20)
    ckpt = save_checkpoint(root / "ckpt", model, tokenizer)
    hf = export_hf(load(ckpt), None, root / "hf")
    tasks = root / "tasks"
    tasks.mkdir()
    items = [{"question": q, "choices": c, "answer": a} for q, c, a in QUESTIONS]
    filler = "import os, sys; print(os.path.join(sys.prefix, 'lib')) " * 12  # far past 128 tokens
    long_items = [{"question": filler + q, "choices": c, "answer": a} for q, c, a in QUESTIONS[:3]]
    for name, rows in (("yuyan_mc", items), ("yuyan_long", long_items)):
        data = tasks / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        yaml = TASK_YAML.format(name=name, data=data, cache=root / "datasets")
        (tasks / f"{name}.yaml").write_text(yaml, encoding="utf-8")
    return ckpt, hf, tasks


def per_item(results: dict, task: str) -> list[list[float]]:
    """Each item's loglikelihood of each choice, in document order (lm_eval's logged samples)."""
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def compare(a: dict, b: dict, task: str) -> float:
    """The largest |difference| of the two runs' per-item loglikelihoods; their accuracies must agree."""
    la, lb = per_item(a, task), per_item(b, task)
    assert len(la) == len(lb) and all(len(x) == len(y) for x, y in zip(la, lb, strict=True))
    diff = max(abs(x - y) for ra, rb in zip(la, lb, strict=True) for x, y in zip(ra, rb, strict=True))
    assert a["results"][task]["acc,none"] == b["results"][task]["acc,none"]
    return diff


@pytest.fixture(scope="module")
def ours(setup):
    ckpt, _, tasks = setup
    return evaluate_tasks(load(ckpt), TASKS, tasks, num_fewshot=2, batch_size=3, log_samples=True)


def test_in_process_equals_hf_backend_on_the_exported_model(setup, ours):
    _, hf, tasks = setup
    ref = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf), "device": "cpu", "dtype": "float32"},
        tasks=TASKS,
        num_fewshot=2,
        batch_size=4,
        task_manager=task_manager(TASKS, tasks),
        log_samples=True,
    )
    for task in TASKS:
        diff = compare(ours, ref, task)
        print(f"{task}: in-process vs hf max |loglikelihood diff| {diff:.2e}")
        assert diff < TOL
    # the long task's contexts really were cut (2 shots + a long question > 128 tokens)
    lm = HarnessLM(load(setup[0]))
    doc = ours["samples"]["yuyan_long"][0]
    assert len(lm.tok_encode(doc["arguments"][0][0])) > BLOCK
    # the scores are not all alike: a bug that returned a constant would not pass
    lls = [x for row in per_item(ours, "yuyan_mc") for x in row]
    assert max(lls) - min(lls) > 1.0


def served_run(ckpt, hf, tasks, **kw) -> dict:
    """lm_eval's `local-completions` model on yuyan_mc against `yuyan serve`'s app over the checkpoint."""
    from tests._serve_util import running

    from yuyan.serve import ServeConfig, create_app

    # fp32 decode weights: bf16 (what --dtype auto picks where it pays) would move the scores by ~1e-2
    app = create_app(load(ckpt), ServeConfig(model_name="tiny", dtype="fp32"))
    with running(app) as base:
        return lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": "tiny",
                "base_url": f"{base}/v1/completions",
                "tokenizer_backend": "huggingface",
                "tokenizer": str(hf),
                "tokenized_requests": True,
                "max_length": BLOCK,
                "max_retries": 1,
                "batch_size": 4,
            },
            tasks=["yuyan_mc"],
            task_manager=task_manager(["yuyan_mc"], tasks),
            log_samples=True,
            **kw,
        )


def test_local_completions_through_the_server_equals_in_process(setup, ours):
    ckpt, hf, tasks = setup
    served = served_run(ckpt, hf, tasks, num_fewshot=2)
    diff = compare(ours, served, "yuyan_mc")
    print(f"yuyan_mc: local-completions via yuyan serve vs in-process max |loglikelihood diff| {diff:.2e}")
    assert diff < TOL


def test_local_completions_when_the_model_would_end_the_text(setup, tokenizer, tmp_path):
    """The same comparison on a model whose next token is always end-of-text (vLLM returns that token and
    its logprob; lm_eval's local-completions counts on it)."""
    _, hf_ref, tasks = setup
    torch.manual_seed(0)
    model = Transformer(tiny_config("llama", vocab_size=tokenizer.vocab_size, block_size=BLOCK))
    with torch.no_grad():  # a large feature 0 everywhere, read by the end-of-text row of lm_head
        model.lm_head.weight.mul_(20)
        model.embed_tokens.weight[:, 0] = 3.0
        model.lm_head.weight[tokenizer.eot_id, 0] = 3.0
    ckpt = save_checkpoint(tmp_path / "eot", model, tokenizer)
    ours = evaluate_tasks(load(ckpt), ["yuyan_mc"], tasks, limit=4, log_samples=True)
    served = served_run(ckpt, hf_ref, tasks, limit=4)
    assert compare(ours, served, "yuyan_mc") < TOL


def test_rolling_and_generate_until(setup):
    """loglikelihood_rolling sums one score per token over lm_eval's windows (a text 3x the context);
    generate_until is greedy decoding cut at `until`, and a setting it cannot honour is refused."""
    from lm_eval.api.instance import Instance

    from yuyan.generate import GenerationConfig, generate

    lm = HarnessLM(load(setup[0]), batch_size=2)
    text = "def add(a, b):\n    return a + b\n" * 30
    full = [lm.prefix_token_id] + lm.tok_encode(text)
    assert len(full) > 2 * BLOCK
    want = 0.0
    with torch.no_grad():  # by hand: each token scored once, with as much context as fits before it
        for s in range(1, len(full), BLOCK):
            e = min(s + BLOCK, len(full))
            lp = lm.model(torch.tensor([full[max(0, e - 1 - BLOCK) : e - 1]])).float().log_softmax(-1)[0]
            want += float(lp[-(e - s) :].gather(1, torch.tensor(full[s:e])[:, None]).sum())
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    assert abs(got - want) < TOL

    prompt = "def add(a, b):\n"
    gen = {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False}
    (out,) = lm.generate_until([Instance("generate_until", {}, (prompt, gen), 0)])
    cfg = GenerationConfig.from_dict(
        {"max_new_tokens": 12, "temperature": 0, "stop": ["\n\n", "<|endoftext|>"]}
    )
    assert out == generate(lm.model, lm.tokenizer, [prompt], cfg)[0][0].text
    bad = {"until": ["\n"], "do_sample": False, "typical_p": 0.9}
    with pytest.raises(UserError, match="typical_p"):
        lm.generate_until([Instance("generate_until", {}, (prompt, bad), 0)])


def test_cli_harness_writes_json_and_refuses_clearly(setup, capsys, tmp_path, monkeypatch):
    ckpt, _, tasks = setup
    out = tmp_path / "r.json"
    args = ["eval", "harness", "--model", ckpt, "--tasks", "yuyan_mc", "--include-path", tasks]
    code, stdout, err = cli_in_process(capsys, *args, "--limit", 6, "--batch-size", 2, "--output", out)
    assert code == 0, err
    assert "yuyan_mc" in stdout and "acc" in stdout and f"wrote {out}" in stdout
    r = json.loads(out.read_text())
    assert r["n-samples"]["yuyan_mc"]["effective"] == 6
    assert 0 <= r["results"]["yuyan_mc"]["acc,none"] <= 1 and r["config"]["model"] == str(ckpt)

    args = ["eval", "harness", "--model", ckpt, "--tasks", "nope_task", "--include-path", tasks]
    code, _, err = cli_in_process(capsys, *args)
    assert code != 0 and "nope_task" in err and str(tasks) in err and len(err.strip().splitlines()) == 1

    for mod in [
        m for m in sys.modules if m == "lm_eval" or m.startswith(("lm_eval.", "yuyan.evaluate.harness"))
    ]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    code, _, err = cli_in_process(capsys, "eval", "harness", "--model", ckpt, "--tasks", "yuyan_mc")
    assert code != 0 and "pip install 'yuyan[eval]'" in err and len(err.strip().splitlines()) == 1
