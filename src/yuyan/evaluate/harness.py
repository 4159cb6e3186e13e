"""lm-evaluation-harness on a yuyan model, in this process: `HarnessLM` is its LM interface over our model.

`HarnessLM` subclasses lm_eval's `TemplateLM` (the `LM` base its own `hf` backend builds on), so a request
is tokenised the way the `hf` backend tokenises it on our exported Hugging Face folder: the context's
trailing spaces move to the continuation, context + continuation is encoded whole and split after the
context's own tokens (byte-level BPE merges across the boundary, so encoding the two apart would give other
tokens), an empty context is replaced by the prefix token (BOS, else end-of-text), and the tokenizer.json's
post-processor runs unless the text already starts with the prefix token, as `add_special_tokens` does in
transformers. Scoring follows that backend too: requests sorted by length (longest first), `batch_size` per
forward pass, right-padded; a window longer than the context keeps its last `max_length + 1` tokens (cut
from the left, out of the context), and logits are taken only at the continuation's positions, log-softmax
in float32 (not `generate.scoring.prompt_logprobs`, which computes every position's distribution and needs
the window's last token as input). `loglikelihood_rolling` scores lm_eval's rolling windows
(`get_rolling_token_windows`, as the `hf` backend does); `generate_until` runs `yuyan.generate` with the
request's `until`, `max_gen_toks`, `temperature`/`do_sample` and the sampling settings that mean the same
in transformers and here, and refuses any other setting by name.

`evaluate_tasks` runs tasks (lm_eval's, or YAML ones under `include_path`) and returns lm_eval's results.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

from yuyan.errors import UserError

try:
    from lm_eval.api.model import TemplateLM
except ImportError:  # the `eval` extra is optional
    raise UserError("lm-evaluation-harness is not installed: pip install 'yuyan[eval]'") from None

from yuyan.evaluate.perplexity import progress_bar
from yuyan.generate import GenerationConfig, generate
from yuyan.model.checkpoint import LanguageModel

# generate_until settings that mean the same to transformers' generate() (what lm_eval's `hf` backend passes
# them to) and to GenerationConfig; any other one is refused
SAME_MEANING = (
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "num_beams",
    "length_penalty",
    "early_stopping",
)


class HarnessLM(TemplateLM):
    """lm_eval's LM over a yuyan `LanguageModel` (see the module docstring for how it matches `hf`)."""

    def __init__(self, lm: LanguageModel, batch_size: int = 8, max_length: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        self.lm = lm
        self.model = lm.model.eval()
        self.tokenizer = lm.tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or self.model.config.block_size
        if not 1 <= self.max_length <= self.model.config.block_size:
            raise UserError(
                f"max_length {self.max_length} must be between 1 and the model's context "
                f"{self.model.config.block_size}"
            )
        if self.tokenizer.eot_id is None:
            raise UserError("the model's tokenizer has no end-of-text token, which the harness needs")
        self._prefix_text = self.tokenizer.decode([self.prefix_token_id])

    # ------------------------------------------------------------------------------------ tokenisation
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def prefix_token_id(self) -> int:
        # the exported folder's bos_token: BOS where the tokenizer has one, else end-of-text
        return self.tokenizer.bos_id if self.tokenizer.bos_id is not None else self.tokenizer.eot_id

    @property
    def max_gen_toks(self) -> int:
        return 256  # the hf backend's default

    @property
    def tokenizer_name(self) -> str:
        return str(self.lm.path or "yuyan")

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kw
    ) -> list[int]:
        if add_special_tokens is None:  # transformers' default, unless the text already holds the prefix
            add_special_tokens = not string.startswith(self._prefix_text)
        if add_special_tokens:
            ids = self.tokenizer.tok.encode(string, add_special_tokens=True).ids
        else:
            ids = self.tokenizer.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    # ------------------------------------------------------------------------------------------ scoring
    @torch.inference_mode()
    def _score(self, windows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(sum logprob, greedy) of the last n tokens of each (tokens, n) window, given the tokens before.

        A window is at most max_length + 1 tokens: the model reads all but the last."""
        device = next(self.model.parameters()).device
        T = max(len(t) for t, _ in windows) - 1
        x = torch.zeros(len(windows), T, dtype=torch.long)  # right padding: causal attention ignores it
        keep = torch.zeros(len(windows), T, dtype=torch.bool)  # input positions that predict a scored token
        targets = []
        for r, (toks, n) in enumerate(windows):
            L = len(toks) - 1
            x[r, :L] = torch.tensor(toks[:-1])
            keep[r, L - n : L] = True
            targets += toks[-n:]
        h = self.model.hidden(x.to(device))[keep.to(device)]  # (N, d): only the continuations reach lm_head
        lp = self.model.logits(h).float().log_softmax(-1)  # (N, V)
        y = torch.tensor(targets, device=device)
        chosen = lp.gather(1, y[:, None])[:, 0].cpu()
        greedy = (lp.argmax(-1) == y).cpu()
        out, at = [], 0
        for _, n in windows:
            out.append((float(chosen[at : at + n].sum()), bool(greedy[at : at + n].all())))
            at += n
        return out

    def _loglikelihood_tokens(
        self, requests: list[tuple[tuple[str, str] | None, list[int], list[int]]], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        windows = []
        for _, ctx, cont in requests:
            if not ctx or not cont:
                raise UserError("a loglikelihood request needs a context token and a continuation token")
            if len(cont) > self.max_length:
                raise UserError(
                    f"a continuation of {len(cont)} tokens does not fit the model's context ({self.max_length})"
                )
            windows.append(((ctx + cont)[-(self.max_length + 1) :], len(cont)))
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))  # longest first, as hf does
        res: list[tuple[float, bool] | None] = [None] * len(windows)
        with progress_bar(not disable_tqdm) as bar:
            task = bar.add_task("loglikelihood", total=len(order))
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                for i, r in zip(batch, self._score([windows[i] for i in batch]), strict=True):
                    res[i] = r
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], r)
                bar.advance(task, len(batch))
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        owners, windows = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                owners.append(i)
                windows.append((None, ctx, cont))
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --------------------------------------------------------------------------------------- generation
    def _generation_config(self, gen_kwargs: dict) -> GenerationConfig:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        kw = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kw.pop("until", None), self.tokenizer.decode([self.eot_token_id]))
        max_gen = kw.pop("max_gen_toks")
        temperature = float(kw.pop("temperature", 0.0))
        if not kw.pop("do_sample"):
            temperature = 0.0  # normalize_gen_kwargs has set it so already
        seed = kw.pop("seed", None)
        unknown = sorted(set(kw) - set(SAME_MEANING))
        if unknown:
            raise UserError(
                f"generate_until setting(s) {', '.join(unknown)} cannot be honoured by yuyan's generate; "
                f"it takes until, max_gen_toks, do_sample, temperature, seed, {', '.join(SAME_MEANING)}"
            )
        if not 0 < max_gen < self.max_length:
            raise UserError(
                f"max_gen_toks {max_gen} must be between 1 and the model's context ({self.max_length}) - 1"
            )
        # the prompt is cut to max_length - max_gen_toks beforehand, as hf does, so nothing slides or overflows
        return GenerationConfig.from_dict(
            dict(
                max_new_tokens=max_gen,
                temperature=temperature,
                seed=seed,
                stop=[s for s in until if s],
                sliding_window=False,
                context_overflow="error",
                **kw,
            )
        ).validate()

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = defaultdict(list)  # one config per batch: group by the settings
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        res: list[str | None] = [None] * len(requests)
        with progress_bar(not disable_tqdm) as bar:
            task = bar.add_task("generate_until", total=len(requests))
            for members in groups.values():
                config = self._generation_config(requests[members[0]].args[1])
                keep = self.max_length - config.max_new_tokens
                prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=keep) for i in members}
                members = sorted(members, key=lambda i: -len(prompts[i]))
                for start in range(0, len(members), self.batch_size):
                    batch = members[start : start + self.batch_size]
                    outs = generate(self.model, self.tokenizer, [prompts[i] for i in batch], config)
                    for i, out in zip(batch, outs, strict=True):
                        res[i] = out[0].text
                        self.cache_hook.add_partial("generate_until", requests[i].args, res[i])
                    bar.advance(task, len(batch))
        return res


def task_manager(tasks: list[str], include_path: str | Path | None = None):
    """lm_eval's TaskManager holding `tasks`: the YAML tasks under include_path alone when they are all
    there (lm_eval's own catalogue of ~15k tasks takes seconds to index), else with lm_eval's as well.
    An unknown task is a UserError naming where it was looked for."""
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise UserError(f"--include-path {include_path} is not a folder of task YAML files")
    if include_path is not None:
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    tm = TaskManager(include_path=str(include_path) if include_path is not None else None)
    missing = [t for t in tasks if t not in tm.all_tasks]
    if missing:
        where = f"in {include_path} or " if include_path is not None else ""
        raise UserError(
            f"unknown task {', '.join(map(repr, missing))}: not {where}among lm_eval's tasks"
            + ("" if include_path is not None else "; pass --include-path DIR for your own task YAML")
        )
    return tm


def check_settings(tasks: list[str], limit: int | None, num_fewshot: int | None, batch_size: int) -> None:
    """One UserError for a setting that cannot run, before any task or model is loaded."""
    if not tasks:
        raise UserError("no task given; pass --tasks NAME[,NAME...]")
    for name, value, least in (
        ("limit", limit, 1),
        ("num_fewshot", num_fewshot, 0),
        ("batch_size", batch_size, 1),
    ):
        if value is not None and value < least:
            raise UserError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")


def evaluate_tasks(
    lm: LanguageModel | HarnessLM,
    tasks: list[str],
    include_path: str | Path | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    log_samples: bool = False,
    manager=None,
) -> dict:
    """lm_eval's `simple_evaluate` of `tasks` on the model; returns its results dict ("results", "configs",
    "n-samples", and with log_samples the per-item "samples"). `manager`: a TaskManager from
    `task_manager(tasks, include_path)` already built (to check the tasks before loading the model)."""
    import lm_eval

    check_settings(tasks, limit, num_fewshot, batch_size)
    manager = manager or task_manager(tasks, include_path)
    model = lm if isinstance(lm, HarnessLM) else HarnessLM(lm, batch_size)
    return lm_eval.simple_evaluate(
        model=model,
        tasks=tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=log_samples,
    )


def results_table(results: dict) -> str:
    """lm_eval's Markdown table of the results (and of the groups, when a task is a group)."""
    from lm_eval.utils import make_table

    return make_table(results) + ("\n" + make_table(results, "groups") if "groups" in results else "")


def results_json(results: dict, model: str) -> str:
    """The results as lm_eval's CLI writes them (without the per-item samples), with the model spec."""
    from lm_eval.utils import handle_non_serializable

    kept = {k: v for k, v in results.items() if k != "samples"}
    kept["config"] = {**kept.get("config", {}), "model": model, "model_type": "yuyan"}
    return json.dumps(kept, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n"


__all__ = [
    "HarnessLM",
    "check_settings",
    "evaluate_tasks",
    "task_manager",
    "results_table",
    "results_json",
    "SAME_MEANING",
]
