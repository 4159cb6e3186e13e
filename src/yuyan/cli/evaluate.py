"""`yuyan eval ...`: perplexity / bits per byte, BLEU, ROUGE, classification (and its robustness to
perturbations), speed, compare, and
lm-evaluation-harness tasks (`harness`).

Each command is a thin call into `yuyan.evaluate`; it prints the metrics and, with `--out DIR`, writes
`DIR/<kind>.json` and `DIR/<kind>.md` (atomic writes). `harness` prints lm_eval's own table and writes
lm_eval's results JSON to `--output FILE`.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from yuyan.cli.app import app
from yuyan.cli.common import (
    FORCE,
    MODEL,
    MODEL_HELP,
    generation_options,
    load_model,
    output_dir,
    setting_flags,
)
from yuyan.errors import UserError
from yuyan.generate import GenerationConfig

eval_app = typer.Typer(
    help="Evaluate a model: perplexity, bleu, rouge, classify, robustness, speed, harness (lm-eval); compare two results.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")

# --model for the text metrics: needed to generate from --data, not to score --predictions
GENERATING_MODEL = typer.Option(
    None,
    "--model",
    "-m",
    help=MODEL_HELP + " (to generate from --data; default: none, needed only with --data)",
)
OUT = typer.Option(
    None, "--out", help="folder for the JSON result and the Markdown report (default: none, print only)"
)


def _emit(result: dict, out: Path | None, name: str | None = None, appendix: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    from yuyan.evaluate.report import format_value, write_result

    table = Table(title=f"{result['eval']} — {result.get('model') or ''}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in result["metrics"].items():
        if not isinstance(v, dict):
            table.add_row(k, format_value(v))
    Console(soft_wrap=True).print(table)
    if out is not None:
        j, m = write_result(result, out, name, appendix)
        print(f"wrote {j} and {m}")


def _claim(out: Path | None, force: bool, *sources) -> None:
    """--out follows the safe-output rule (checked before any work): see cli/common.py output_dir."""
    if out is not None:
        output_dir(out, force, *sources, command="eval")


# the cost of decoding in bf16 is measured by scoring in it; fp32 by default so results stay comparable
PPL_DTYPE_HELP = "weights fp32|bf16|auto while scoring (auto: what decoding would choose on this machine)"


def _load(model: str, device: str | None = None, dtype: str | None = None):
    import torch

    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(model, device=dev, dtype=dtype)


@eval_app.command("perplexity")
def perplexity_cmd(
    model: str = MODEL,
    corpus: str = typer.Option(..., "--corpus", help="file, folder, glob, JSONL or 'stdlib'"),
    split: str = typer.Option(
        None, help="corpus split all|train|val (default: val for stdlib, all otherwise)"
    ),
    text_field: str = typer.Option("text", help="JSONL field that holds the text"),
    block_size: int = typer.Option(None, help="window length in tokens (default: the model's context)"),
    stride: int = typer.Option(
        None, help="window step; each token keeps >= block_size - stride context (default block/2)"
    ),
    batch_size: int = typer.Option(8, help="windows per forward pass"),
    dtype: str = typer.Option("fp32", "--dtype", help=PPL_DTYPE_HELP),
    max_bytes: int = typer.Option(
        None, help="score only the first N bytes of the corpus (default: all of it)"
    ),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
    out: Path = OUT,
    force: bool = FORCE,
) -> None:
    """Loss, perplexity and bits per byte over a corpus (sliding window for long texts).

    Example: yuyan eval perplexity --model runs/demo/final --corpus stdlib --stride 128 --out runs/eval
    """
    from yuyan.evaluate.perplexity import perplexity
    from yuyan.evaluate.report import make_result

    _claim(out, force, model)
    split = split or ("val" if corpus == "stdlib" else "all")
    texts = _read_corpus(corpus, split, text_field, max_bytes)
    lm = _load(model, device, dtype)
    r = perplexity(lm.model, lm.tokenizer, texts, block_size, stride, batch_size, progress=True)
    _emit(make_result("perplexity", model, r, {"corpus": corpus, "split": split}), out)


def _read_corpus(spec: str, split: str | None, text_field: str, max_bytes: int | None) -> list[str]:
    """Texts of a corpus spec (yuyan.data.corpus); split defaults to val for stdlib, all for your own files."""
    from yuyan.data.corpus import iter_documents

    split = split or ("val" if spec == "stdlib" else "all")
    texts, total = [], 0
    for d in iter_documents(spec, split=split, text_field=text_field):
        text = d.text
        if max_bytes is not None and total + len(text.encode("utf-8")) > max_bytes:
            text = text.encode("utf-8")[: max_bytes - total].decode("utf-8", errors="ignore")
        texts.append(text)
        total += len(text.encode("utf-8"))
        if max_bytes is not None and total >= max_bytes:
            break
    if not texts:
        raise UserError(f"corpus {spec!r} (split {split}) holds no text; check the path or pattern")
    return texts


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise UserError(f"data file {path} not found; pass a JSONL file")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{path}:{n} is not valid JSON; each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{n} must be a JSON object")
            rows.append(row)
    if not rows:
        raise UserError(f"{path} holds no rows")
    return rows


def _field(rows: list[dict], name: str, path: Path) -> list:
    for n, r in enumerate(rows, 1):
        if name not in r:
            raise UserError(
                f"{path} row {n} has no {name!r} field (fields: {sorted(r)}); name it with the --*-field options"
            )
    return [r[name] for r in rows]


def _pairs(
    model, data, predictions, prompt_field, reference_field, prediction_field, gen
) -> tuple[list, list, dict]:
    """(predictions, references, settings) from --predictions FILE or by generating from --data FILE."""
    if (data is None) == (predictions is None):
        raise UserError(
            "pass exactly one of --data FILE (prompts to generate from) or --predictions FILE (given outputs)"
        )
    if predictions is not None:
        changed = {k for k, v in gen.to_dict().items() if v != EVAL_CONFIG.to_dict()[k]}
        if changed:
            raise UserError(
                f"--predictions are scored as given; drop {setting_flags(changed)} (for generating from --data)"
            )
        rows = _read_jsonl(predictions)
        return (
            [str(p) for p in _field(rows, prediction_field, predictions)],
            _field(rows, reference_field, predictions),
            {"predictions": str(predictions)},
        )
    if model is None:
        raise UserError("--data needs --model to generate predictions; or pass --predictions FILE")
    rows = _read_jsonl(data)
    prompts = [str(p) for p in _field(rows, prompt_field, data)]
    refs = _field(rows, reference_field, data)
    from yuyan.generate import generate

    lm = _load(model)
    outs = generate(lm.model, lm.tokenizer, prompts, gen)
    return [o[0].text.strip() for o in outs], refs, {"data": str(data), **gen.to_dict()}


def _text_metric(
    kind, model, data, predictions, tokenize, prompt_field, reference_field, prediction_field, gen, out
):
    from yuyan.evaluate.report import make_result
    from yuyan.evaluate.text_metrics import bleu, rouge

    preds, refs, settings = _pairs(
        model, data, predictions, prompt_field, reference_field, prediction_field, gen
    )
    if kind == "bleu":
        r = bleu(preds, refs, tokenize)
    else:
        r = rouge(preds, refs)
    r["examples"] = len(preds)
    _emit(make_result(kind, model, r, settings), out)


_DATA = typer.Option(
    None,
    "--data",
    help="JSONL with prompt and reference fields: generate, then score (default: none; give it or --predictions)",
)
_PRED = typer.Option(
    None,
    "--predictions",
    help="JSONL with prediction and reference fields: score as given (default: none; give it or --data)",
)
_PF = typer.Option("prompt", help="prompt field in --data")
_RF = typer.Option("reference", help="reference field (a string or a list of strings)")
_XF = typer.Option("prediction", help="prediction field in --predictions")
# one prediction per prompt is scored: n and logprobs would be computed and thrown away
EVAL_DEFAULTS = {"max_new_tokens": 64, "temperature": 0.0, "seed": 0}
EVAL_EXCLUDE = ("n", "logprobs")
EVAL_CONFIG = GenerationConfig.from_dict(EVAL_DEFAULTS)  # what no generation option changed


@eval_app.command("bleu")
@generation_options(EVAL_DEFAULTS, exclude=EVAL_EXCLUDE)
def bleu_cmd(
    model: str = GENERATING_MODEL,
    data: Path = _DATA,
    predictions: Path = _PRED,
    tokenize: str = typer.Option(
        None, help="sacrebleu tokenizer 13a|zh|intl (default: zh if references hold CJK, else 13a)"
    ),
    prompt_field: str = _PF,
    reference_field: str = _RF,
    prediction_field: str = _XF,
    out: Path = OUT,
    force: bool = FORCE,
    gen: GenerationConfig = None,
) -> None:
    """Corpus BLEU (sacrebleu) of generated or given outputs against references.

    Example: yuyan eval bleu --predictions preds.jsonl --tokenize zh --out runs/eval
    """
    _claim(out, force, model)
    _text_metric(
        "bleu",
        model,
        data,
        predictions,
        tokenize,
        prompt_field,
        reference_field,
        prediction_field,
        gen,
        out,
    )


@eval_app.command("rouge")
@generation_options(EVAL_DEFAULTS, exclude=EVAL_EXCLUDE)
def rouge_cmd(
    model: str = GENERATING_MODEL,
    data: Path = _DATA,
    predictions: Path = _PRED,
    prompt_field: str = _PF,
    reference_field: str = _RF,
    prediction_field: str = _XF,
    out: Path = OUT,
    force: bool = FORCE,
    gen: GenerationConfig = None,
) -> None:
    """ROUGE-1/2/L (rouge-score, CJK characters kept as tokens) of generated or given outputs.

    Example: yuyan eval rouge --model runs/sum/final --data test.jsonl --max-new-tokens 60 --out runs/eval
    """
    _claim(out, force, model)
    _text_metric(
        "rouge",
        model,
        data,
        predictions,
        None,
        prompt_field,
        reference_field,
        prediction_field,
        gen,
        out,
    )


@eval_app.command("classify")
def classify_cmd(
    model: str = MODEL,
    data: Path = typer.Option(..., "--data", help="CSV, TSV or JSONL with text and label columns"),
    text_field: str = typer.Option(
        "text", help="text column, by name or 0-based index (a file without header)"
    ),
    label_field: str = typer.Option("label", help="label column, by name or 0-based index"),
    batch_size: int = typer.Option(32, help="texts per forward pass"),
    out: Path = OUT,
    force: bool = FORCE,
) -> None:
    """Accuracy, macro-F1, per-class precision / recall / F1 and the confusion matrix of a fine-tuned
    classifier, labelled with its class names; with --out, also confusion_matrix.png.

    Example: yuyan eval classify --model runs/sentiment/final --data test.tsv --out runs/eval
    """
    from yuyan.evaluate.classify import evaluate_classifier, read_labelled, report_lines, report_markdown
    from yuyan.evaluate.report import make_result
    from yuyan.model.heads import Classifier

    _claim(out, force, model)
    examples = read_labelled(data, text_field, label_field)
    clf = Classifier.from_pretrained(model)
    r = evaluate_classifier(clf, examples, batch_size)
    if out is not None:
        from yuyan.plots import plot_confusion_matrix

        png = plot_confusion_matrix(
            r["confusion"], r["labels"], out / "confusion_matrix.png", title=f"{data.name}"
        )
        r["confusion_png"] = str(png)
    _emit(make_result("classify", model, r, {"data": str(data)}), out, appendix=report_markdown(r))
    for line in report_lines(r):
        print(line)


@eval_app.command("robustness")
def robustness_cmd(
    model: str = MODEL,
    data: Path = typer.Option(..., "--data", help="CSV, TSV or JSONL with text and label columns"),
    attacks: str = typer.Option(
        "typo,homoglyph,synonym,zh_homophone,zh_similar", "--attacks", help="comma list of perturbations"
    ),
    rate: float = typer.Option(
        0.1, "--rate", help="fraction of each text's eligible words/characters changed"
    ),
    seed: int = typer.Option(0, "--seed", help="perturbations are reproducible by seed"),
    text_field: str = typer.Option(
        "text", help="text column, by name or 0-based index (a file without header)"
    ),
    label_field: str = typer.Option("label", help="label column, by name or 0-based index"),
    batch_size: int = typer.Option(32, help="texts per forward pass"),
    out: Path = OUT,
    force: bool = FORCE,
) -> None:
    """Accuracy of a fine-tuned classifier clean and under typos, homoglyphs, synonyms and Chinese
    homophone / look-alike swaps, with each attack's success rate (originally right items it flips).

    Example: yuyan eval robustness --model runs/sentiment/final --data test.csv --rate 0.1 --out runs/eval
    """
    from yuyan.evaluate.classify import read_labelled
    from yuyan.evaluate.report import make_result
    from yuyan.evaluate.robustness import evaluate_robustness, parse_attacks
    from yuyan.model.heads import Classifier

    names = parse_attacks(attacks)
    _claim(out, force, model)
    examples = read_labelled(data, text_field, label_field)
    clf = Classifier.from_pretrained(model)
    r = evaluate_robustness(clf, examples, names, rate, seed, batch_size)
    settings = {"data": str(data), "attacks": names, "rate": rate, "seed": seed}
    _emit(make_result("robustness", model, r, settings), out)


@eval_app.command("speed")
def speed_cmd(
    model: str = MODEL,
    prompt_len: int = typer.Option(None, help="prompt tokens (default 32, less for short contexts)"),
    new_tokens: int = typer.Option(None, help="tokens to decode (default 64)"),
    batch_sizes: str = typer.Option("1,8", help="comma-separated batch sizes"),
    repeats: int = typer.Option(2, help="timed runs per batch size (the best is reported)"),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
    threads: int = typer.Option(None, help="CPU threads for torch (default: torch's choice)"),
    out: Path = OUT,
    force: bool = FORCE,
) -> None:
    """Time to first token, decode tokens/s at batch 1 and 8, peak memory, parameters, FLOPs per token.

    Example: yuyan eval speed --model runs/demo/final --out runs/eval
    """
    import torch

    from yuyan.evaluate.report import make_result
    from yuyan.evaluate.speed import speed

    _claim(out, force, model)
    try:
        sizes = tuple(int(x) for x in batch_sizes.split(",") if x.strip())
    except ValueError:
        raise UserError(f"--batch-sizes {batch_sizes!r} must be comma-separated integers, e.g. 1,8") from None
    if not sizes or min(sizes) < 1:
        raise UserError("--batch-sizes needs positive integers, e.g. 1,8")
    if threads is not None:
        if threads < 1:
            raise UserError("--threads must be at least 1")
        torch.set_num_threads(threads)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    lm = load_model(model, device=dev)
    r = speed(lm.model, prompt_len, new_tokens, sizes, repeats)
    _emit(make_result("speed", model, r), out)


@eval_app.command("compare")
def compare_cmd(
    a: Path = typer.Argument(..., help="first result JSON"),
    b: Path = typer.Argument(..., help="second result JSON"),
    out: Path = OUT,
    force: bool = FORCE,
) -> None:
    """Two results side by side with differences (B − A and relative).

    Example: yuyan eval compare runs/a/perplexity.json runs/b/perplexity.json
    """
    from rich.console import Console
    from rich.table import Table

    from yuyan.evaluate.report import atomic_write_text, compare, compare_markdown, format_value

    cmp = compare(a, b)
    _claim(out, force)
    t = Table(title=f"A: {cmp['a']['model']}  vs  B: {cmp['b']['model']}")
    for col in ("metric", "A", "B", "B − A", "relative"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for r in cmp["rows"]:
        rel = f"{100 * r['rel']:+.2f}%" if r["rel"] is not None else ""
        diff = f"{r['diff']:+.4g}" if r["diff"] is not None else ""
        t.add_row(r["metric"], format_value(r["a"]), format_value(r["b"]), diff, rel)
    Console(soft_wrap=True).print(t)
    if out is not None:
        j = atomic_write_text(
            Path(out) / "compare.json", json.dumps(cmp, indent=2, ensure_ascii=False) + "\n"
        )
        m = atomic_write_text(Path(out) / "compare.md", compare_markdown(cmp))
        print(f"wrote {j} and {m}")


@eval_app.command("harness")
def harness_cmd(
    model: str = MODEL,
    tasks: str = typer.Option(
        ..., "--tasks", help="comma-separated lm_eval task names, e.g. arc_easy,mytask"
    ),
    include_path: Path = typer.Option(
        None, "--include-path", help="folder of your own task YAML files (default: lm_eval's tasks only)"
    ),
    limit: int = typer.Option(
        None, "--limit", help="score only the first N items of each task (default: all)"
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="requests per forward pass"),
    num_fewshot: int = typer.Option(
        None, "--num-fewshot", help="examples before each item (default: the task's)"
    ),
    output: Path = typer.Option(
        None, "--output", help="write lm_eval's results as JSON to this file (default: not written)"
    ),
    device: str = typer.Option(None, help="cpu or cuda (default: cuda if available)"),
) -> None:
    """lm-evaluation-harness tasks scored in-process on the model (needs the eval extra: lm-eval).

    Example: yuyan eval harness --model runs/demo/final --tasks mytask --include-path tasks/ --output r.json
    """
    from yuyan.evaluate.harness import (
        check_settings,
        evaluate_tasks,
        results_json,
        results_table,
        task_manager,
    )

    names = [t.strip() for t in tasks.split(",") if t.strip()]
    check_settings(names, limit, num_fewshot, batch_size)
    if output is not None and output.is_dir():
        raise UserError(f"--output {output} is a folder; pass a file name such as results.json")
    manager = task_manager(names, include_path)  # an unknown task fails before the model loads
    lm = _load(model, device)
    r = evaluate_tasks(
        lm, names, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size, manager=manager
    )
    print(results_table(r))
    if output is not None:
        from yuyan.evaluate.report import atomic_write_text

        atomic_write_text(output, results_json(r, model))
        print(f"wrote {output}")
