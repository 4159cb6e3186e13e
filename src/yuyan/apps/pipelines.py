"""Task pipelines over a loaded model: generate, chat, summarize, translate, qa, sentiment, code.

Each pipeline is a prompt template plus a call into the generation engine (`yuyan.generate`), the same
function the CLI (`yuyan run TASK`) and any other interface call. Every generating pipeline takes the flat
`GenerationConfig` settings as keywords (`max_new_tokens=32, temperature=0, top_p=0.9, num_beams=2,
stop=[...]`) over its task's own defaults (`DEFAULTS`); the few settings a pipeline sets itself (`FIXED`:
it returns one text, stops where its task ends and refuses an input longer than the context) are refused,
not ignored. A model whose tokenizer has the chat role tokens gets chat-formatted prompts (an instruction
in a user turn, the answer read from the assistant turn); a base model gets the plain-text cue that base
LMs continue (GPT-2's "TL;DR:", "Question: ... Answer:"). `sentiment` uses a fine-tuned classification
head when the checkpoint has one and otherwise compares the model's log-probabilities of the label words
after a cue, so it works with any LM. Problems raise `UserError`: a prompt longer than the context, a
classifier checkpoint asked to write text, empty input.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from yuyan.apps.conversation import CHAT_DEFAULTS, CHAT_FIXED, Conversation, has_chat
from yuyan.errors import UserError
from yuyan.generate import GenerationConfig
from yuyan.generate import generate as generate_completions
from yuyan.model.checkpoint import LanguageModel

TASKS = ("generate", "chat", "summarize", "translate", "qa", "sentiment", "code")
GENERATING = ("generate", "chat", "summarize", "translate", "qa", "code")  # sentiment only scores words

# {mode: template}; chat templates are the user turn's content, plain ones are the whole prompt
TEMPLATES: dict[str, dict[str, str]] = {
    "summarize": {
        "chat": "Summarize the following text in one or two sentences.\n\n{text}",
        "plain": "{text}\n\nTL;DR:",
    },
    "translate": {
        "chat": "Translate the following {source} text into {target}. Reply with the translation only.\n\n{text}",
        "plain": "{source}: {text}\n{target}:",
    },
    "qa": {
        "chat": "{context}Question: {question}\nAnswer briefly.",
        "plain": "{context}Question: {question}\nAnswer:",
    },
    "sentiment": {
        "chat": "Is the sentiment of this text {choices}? Answer with one word.\n\n{text}",
        "plain": "Text: {text}\nSentiment ({choices}):",
    },
}
CODE_STOPS = ["\ndef ", "\nclass ", "\nif __name__", "\n\n\n"]

# each generating task's settings; a caller's settings go over them
DEFAULTS: dict[str, dict[str, Any]] = {
    "generate": {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95},
    "chat": CHAT_DEFAULTS,
    "summarize": {"max_new_tokens": 64, "temperature": 0.0},
    "translate": {"max_new_tokens": 64, "temperature": 0.0},
    "qa": {"max_new_tokens": 48, "temperature": 0.0},
    "code": {"max_new_tokens": 64, "temperature": 0.2, "top_p": 0.95},
}
FIXED = CHAT_FIXED  # one text back, the task's stop tokens, an over-long input refused: the same as a chat


def task_config(task: str, settings: Mapping[str, Any]) -> GenerationConfig:
    """DEFAULTS[task] with `settings` (flat GenerationConfig fields) over them, validated; a FIXED setting
    or an unknown name is an error that names it."""
    fixed = sorted(set(settings) & set(FIXED))
    if fixed:
        raise UserError(f"the {task} pipeline sets {', '.join(fixed)} itself; drop {', '.join(fixed)}")
    return GenerationConfig.from_dict({**DEFAULTS[task], **settings}).validate()


def as_model(model: LanguageModel | str | os.PathLike) -> LanguageModel:
    """A LanguageModel, loading a spec (checkpoint folder, HF folder, hf:NAME) when given one."""
    if isinstance(model, LanguageModel):
        return model
    from yuyan.model import load

    return load(model)


def _writer(lm: LanguageModel, task: str) -> None:
    if lm.meta.get("task") == "classify":
        raise UserError(
            f"{lm.path} is a classifier (fine-tuned with --task classify); it cannot {task} text: "
            "use `yuyan run sentiment` with it, or a language model for this task"
        )


def _complete(
    lm: LanguageModel,
    prompts: list[str | list[int]],
    config: GenerationConfig,
    stop: list[str],
    stop_ids: list[int] | None,
) -> list[str]:
    """The first completion of each prompt; the task's stop strings join the caller's."""
    cfg = replace(config, stop=[*stop, *config.stop], stop_token_ids=stop_ids, context_overflow="error")
    return [c[0].text for c in generate_completions(lm.model, lm.tokenizer, prompts, cfg)]


def _chat_prompt(lm: LanguageModel, user: str, system: str | None = None) -> list[int]:
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)[0]


def _one(x: str | list[str]) -> tuple[list[str], bool]:
    if isinstance(x, str):
        if not x.strip():
            raise UserError("the input text is empty; give some text")
        return [x], True
    if not x:
        raise UserError("no input texts given")
    return list(x), False


def _instruct(
    lm: LanguageModel,
    task: str,
    texts: list[str],
    fields: dict,
    settings: Mapping[str, Any],
    plain_stop: list[str],
) -> list[str]:
    """Fill TEMPLATES[task] for each text; chat-format when the model has chat tokens."""
    _writer(lm, task)
    cfg = task_config(task, settings)
    if has_chat(lm):
        prompts = [_chat_prompt(lm, TEMPLATES[task]["chat"].format(text=t, **fields)) for t in texts]
        outs = _complete(lm, prompts, cfg, [], lm.tokenizer.chat_stop_ids)
    else:
        prompts = [TEMPLATES[task]["plain"].format(text=t, **fields) for t in texts]
        outs = _complete(lm, prompts, cfg, plain_stop, None)
    return [o.strip() for o in outs]


# ---------------------------------------------------------------------------------------------- pipelines


def generate(model, prompt: str | list[str], **settings: Any) -> str | list[str]:
    """Continue `prompt` (free text generation)."""
    lm = as_model(model)
    _writer(lm, "generate")
    texts, single = _one(prompt)
    outs = _complete(lm, texts, task_config("generate", settings), [], None)
    return outs[0] if single else outs


def chat(model, messages: str | list[dict], system: str | None = None, **settings: Any) -> str:
    """The assistant's reply to a conversation (a list of {"role", "content"} or one user message); the
    oldest turns are dropped when the conversation does not fit the context (apps/conversation.py)."""
    lm = as_model(model)
    _writer(lm, "chat")
    if isinstance(messages, str):
        _one(messages)
        messages = [{"role": "user", "content": messages}]
    return Conversation(lm, task_config("chat", settings), system=system, messages=messages).reply()


def summarize(model, text: str | list[str], **settings: Any) -> str | list[str]:
    """A short summary of `text` (chat instruction, or "TL;DR:" on a base model)."""
    lm = as_model(model)
    texts, single = _one(text)
    outs = _instruct(lm, "summarize", texts, {}, settings, ["\n\n"])
    return outs[0] if single else outs


def translate(
    model, text: str | list[str], target: str = "Chinese", source: str = "English", **settings: Any
) -> str | list[str]:
    """`text` translated from `source` into `target` (language names, e.g. English, Chinese, French)."""
    if not target.strip() or not source.strip():
        raise UserError("name the languages: --source English --target Chinese")
    lm = as_model(model)
    texts, single = _one(text)
    outs = _instruct(lm, "translate", texts, {"source": source, "target": target}, settings, ["\n"])
    return outs[0] if single else outs


def qa(model, question: str, context: str | None = None, **settings: Any) -> str:
    """An answer to `question`, grounded in `context` when one is given."""
    lm = as_model(model)
    _one(question)
    ctx = f"Context: {context.strip()}\n" if context and context.strip() else ""
    _writer(lm, "answer questions with")
    fields = {"context": ctx, "question": question.strip()}
    cfg = task_config("qa", settings)
    if has_chat(lm):
        ids = _chat_prompt(lm, TEMPLATES["qa"]["chat"].format(**fields))
        out = _complete(lm, [ids], cfg, [], lm.tokenizer.chat_stop_ids)
    else:
        out = _complete(lm, [TEMPLATES["qa"]["plain"].format(**fields)], cfg, ["\n"], None)
    return out[0].strip()


def code(model, prefix: str, **settings: Any) -> str:
    """Code completion: the continuation of `prefix`, stopped at the next top-level def/class (CODE_STOPS)
    or at any `stop` string given."""
    lm = as_model(model)
    _writer(lm, "complete code")
    _one(prefix)
    return _complete(lm, [prefix], task_config("code", settings), CODE_STOPS, None)[0]


@torch.no_grad()
def _label_word_scores(
    lm: LanguageModel, prompts: list[list[int]], words: list[str], leading_space: bool
) -> torch.Tensor:
    """Sum of log p(label word tokens | prompt) for each prompt and word: (n_prompts, n_words)."""
    model, tok = lm.model, lm.tokenizer
    model.eval()
    dev = next(model.parameters()).device
    word_ids = [tok.encode((" " if leading_space else "") + w) for w in words]
    scores = torch.zeros(len(prompts), len(words))
    for i, p in enumerate(prompts):
        seqs = [p + w for w in word_ids]
        T = max(len(s) for s in seqs)
        if model.config.block_size < T:
            raise UserError(
                f"text of {len(p)} tokens is too long for the context of {model.config.block_size}; "
                "shorten it"
            )
        x = torch.full((len(seqs), T), tok.pad_id or 0, dtype=torch.long)
        for j, s in enumerate(seqs):
            x[j, : len(s)] = torch.tensor(s)
        logp = F.log_softmax(model(x.to(dev)).float(), -1).cpu()  # (W, T, V)
        for j, w in enumerate(word_ids):
            pos = torch.arange(len(p) - 1, len(p) - 1 + len(w))  # positions predicting the word's tokens
            scores[i, j] = logp[j, pos, torch.tensor(w)].sum()
    return scores


def sentiment(
    model, text: str | list[str], labels: list[str] | None = None, batch_size: int = 32
) -> tuple[str, dict[str, float]] | list[tuple[str, dict[str, float]]]:
    """(label, {label: probability}) per text: the fine-tuned head when the model has one, else the label
    words' probabilities under the model after a cue (normalised over `labels`, default positive/negative)."""
    lm = as_model(model)
    texts, single = _one(text)
    if lm.meta.get("task") == "classify" and "score.weight" in lm.extra_tensors:
        from yuyan.model.heads import Classifier

        if labels:
            raise UserError(
                f"{lm.path} has a trained head with labels {lm.meta.get('labels')}; drop --labels"
            )
        out = Classifier.from_language_model(lm).predict(texts, batch_size)
    else:
        words = list(labels or ["positive", "negative"])
        if len(words) < 2 or any(not w.strip() for w in words):
            raise UserError(f"sentiment by prompting needs at least two non-empty label words, got {words}")
        choices = " or ".join(words)
        if has_chat(lm):
            prompts = [
                _chat_prompt(lm, TEMPLATES["sentiment"]["chat"].format(text=t, choices=choices))
                for t in texts
            ]
            scores = _label_word_scores(lm, prompts, words, leading_space=False)
        else:
            prompts = [
                lm.tokenizer.encode(TEMPLATES["sentiment"]["plain"].format(text=t, choices=choices))
                for t in texts
            ]
            scores = _label_word_scores(lm, prompts, words, leading_space=True)
        probs = scores.softmax(-1)
        out = [(words[int(p.argmax())], {w: float(q) for w, q in zip(words, p, strict=True)}) for p in probs]
    return out[0] if single else out


PIPELINES = {
    "generate": generate,
    "chat": chat,
    "summarize": summarize,
    "translate": translate,
    "qa": qa,
    "sentiment": sentiment,
    "code": code,
}

__all__ = [
    "generate",
    "chat",
    "summarize",
    "translate",
    "qa",
    "sentiment",
    "code",
    "as_model",
    "has_chat",
    "task_config",
    "TASKS",
    "GENERATING",
    "TEMPLATES",
    "DEFAULTS",
    "FIXED",
    "PIPELINES",
]
