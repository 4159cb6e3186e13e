"""Task pipelines over a loaded model: generate, chat, summarize, translate, qa, sentiment, code.

Each pipeline is a prompt template plus a call into the generation engine (`yuyan.generate.engine`), the
same function the CLI (`yuyan run TASK`) and any other interface call. A model whose tokenizer has the
chat role tokens gets chat-formatted prompts (an instruction in a user turn, the answer read from the
assistant turn); a base model gets the plain-text cue that base LMs continue (GPT-2's "TL;DR:",
"Question: ... Answer:"). `sentiment` uses a fine-tuned classification head when the checkpoint has one and
otherwise compares the model's log-probabilities of the label words after a cue, so it works with any LM.
Problems raise `UserError`: a prompt longer than the context, a classifier checkpoint asked to write text,
empty input.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from yuyan.errors import UserError
from yuyan.model.checkpoint import LanguageModel

TASKS = ("generate", "chat", "summarize", "translate", "qa", "sentiment", "code")

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


def as_model(model: LanguageModel | str | os.PathLike) -> LanguageModel:
    """A LanguageModel, loading a spec (checkpoint folder, HF folder, hf:NAME) when given one."""
    if isinstance(model, LanguageModel):
        return model
    from yuyan.model import load

    return load(model)


def has_chat(lm: LanguageModel) -> bool:
    from yuyan.tokenizer import CHAT_TOKENS

    return all(t in lm.tokenizer.chat_ids for t in CHAT_TOKENS)


def _writer(lm: LanguageModel, task: str) -> None:
    if lm.meta.get("task") == "classify":
        raise UserError(
            f"{lm.path} is a classifier (fine-tuned with --task classify); it cannot {task} text: "
            "use `yuyan run sentiment` with it, or a language model for this task"
        )


def _complete(
    lm: LanguageModel,
    prompts: list[str | list[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop: list[str] | None,
    stop_ids: list[int] | None,
    repetition_penalty: float = 1.0,
) -> list[str]:
    from yuyan.generate.engine import GenerationConfig, generate

    cfg = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=list(stop or []),
        stop_token_ids=stop_ids,
        context_overflow="error",
        repetition_penalty=repetition_penalty,
    )
    return [c[0].text for c in generate(lm.model, lm.tokenizer, prompts, cfg)]


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
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    plain_stop: list[str],
) -> list[str]:
    """Fill TEMPLATES[task] for each text; chat-format when the model has chat tokens."""
    _writer(lm, task)
    if has_chat(lm):
        prompts = [_chat_prompt(lm, TEMPLATES[task]["chat"].format(text=t, **fields)) for t in texts]
        outs = _complete(
            lm, prompts, max_new_tokens, temperature, top_p, 0, seed, None, lm.tokenizer.chat_stop_ids
        )
    else:
        prompts = [TEMPLATES[task]["plain"].format(text=t, **fields) for t in texts]
        outs = _complete(lm, prompts, max_new_tokens, temperature, top_p, 0, seed, plain_stop, None)
    return [o.strip() for o in outs]


# ---------------------------------------------------------------------------------------------- pipelines


def generate(
    model,
    prompt: str | list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_p: float = 0.95,
    top_k: int = 0,
    seed: int | None = None,
    stop: list[str] | None = None,
    repetition_penalty: float = 1.0,
) -> str | list[str]:
    """Continue `prompt` (free text generation)."""
    lm = as_model(model)
    _writer(lm, "generate")
    texts, single = _one(prompt)
    outs = _complete(
        lm, texts, max_new_tokens, temperature, top_p, top_k, seed, stop, None, repetition_penalty
    )
    return outs[0] if single else outs


def chat(
    model,
    messages: str | list[dict],
    system: str | None = None,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
) -> str:
    """The assistant's reply to a conversation (a list of {"role", "content"} or one user message)."""
    lm = as_model(model)
    _writer(lm, "chat")
    if isinstance(messages, str):
        _one(messages)
        messages = [{"role": "user", "content": messages}]
    if not messages or messages[-1].get("role") != "user":
        raise UserError('a chat must end with a user message; add {"role": "user", "content": ...}')
    msgs = ([{"role": "system", "content": system}] if system else []) + list(messages)
    ids = lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True)[0]
    stop = None if has_chat(lm) else ["\nUser:", "\nSystem:"]  # plain-text role markers on a base model
    return _complete(
        lm, [ids], max_new_tokens, temperature, top_p, 0, seed, stop, lm.tokenizer.chat_stop_ids
    )[0].strip()


def summarize(
    model,
    text: str | list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str | list[str]:
    """A short summary of `text` (chat instruction, or "TL;DR:" on a base model)."""
    lm = as_model(model)
    texts, single = _one(text)
    outs = _instruct(lm, "summarize", texts, {}, max_new_tokens, temperature, top_p, seed, ["\n\n"])
    return outs[0] if single else outs


def translate(
    model,
    text: str | list[str],
    target: str = "Chinese",
    source: str = "English",
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str | list[str]:
    """`text` translated from `source` into `target` (language names, e.g. English, Chinese, French)."""
    if not target.strip() or not source.strip():
        raise UserError("name the languages: --source English --target Chinese")
    lm = as_model(model)
    texts, single = _one(text)
    outs = _instruct(
        lm,
        "translate",
        texts,
        {"source": source, "target": target},
        max_new_tokens,
        temperature,
        top_p,
        seed,
        ["\n"],
    )
    return outs[0] if single else outs


def qa(
    model,
    question: str,
    context: str | None = None,
    max_new_tokens: int = 48,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> str:
    """An answer to `question`, grounded in `context` when one is given."""
    lm = as_model(model)
    _one(question)
    ctx = f"Context: {context.strip()}\n" if context and context.strip() else ""
    _writer(lm, "answer questions with")
    fields = {"context": ctx, "question": question.strip()}
    if has_chat(lm):
        ids = _chat_prompt(lm, TEMPLATES["qa"]["chat"].format(**fields))
        out = _complete(
            lm, [ids], max_new_tokens, temperature, top_p, 0, seed, None, lm.tokenizer.chat_stop_ids
        )
    else:
        out = _complete(
            lm,
            [TEMPLATES["qa"]["plain"].format(**fields)],
            max_new_tokens,
            temperature,
            top_p,
            0,
            seed,
            ["\n"],
            None,
        )
    return out[0].strip()


def code(
    model,
    prefix: str,
    max_new_tokens: int = 64,
    temperature: float = 0.2,
    top_p: float = 0.95,
    seed: int | None = None,
    stop: list[str] | None = None,
) -> str:
    """Code completion: the continuation of `prefix`, stopped at the next top-level def/class."""
    lm = as_model(model)
    _writer(lm, "complete code")
    _one(prefix)
    return _complete(
        lm, [prefix], max_new_tokens, temperature, top_p, 0, seed, CODE_STOPS if stop is None else stop, None
    )[0]


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
    "TASKS",
    "TEMPLATES",
    "PIPELINES",
]
