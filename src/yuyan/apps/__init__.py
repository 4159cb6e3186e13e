"""Task pipelines: `yuyan.apps.summarize(lm, text)` and the same names as `yuyan run TASK --model M`.

generate, chat, summarize, translate, qa, sentiment (a fine-tuned head or label-word prompting) and code
completion; `lm` is a loaded `LanguageModel` or any `yuyan.load` spec. See pipelines.py.
"""

from yuyan.apps.pipelines import (
    PIPELINES,
    TASKS,
    TEMPLATES,
    as_model,
    chat,
    code,
    generate,
    qa,
    sentiment,
    summarize,
    translate,
)

__all__ = [
    "generate",
    "chat",
    "summarize",
    "translate",
    "qa",
    "sentiment",
    "code",
    "as_model",
    "TASKS",
    "TEMPLATES",
    "PIPELINES",
]
