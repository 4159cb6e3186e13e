"""Task pipelines: `yuyan.apps.summarize(lm, text)` and the same names as `yuyan run TASK --model M`.

generate, chat, summarize, translate, qa, sentiment (a fine-tuned head or label-word prompting) and code
completion; `lm` is a loaded `LanguageModel` or any `yuyan.load` spec, and the generating pipelines take
`GenerationConfig` settings as keywords (pipelines.py). `Conversation` and `repl` are the one chat loop
behind `yuyan chat` and `yuyan run chat` (conversation.py).
"""

from yuyan.apps.conversation import Conversation, repl
from yuyan.apps.pipelines import (
    DEFAULTS,
    GENERATING,
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
    task_config,
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
    "task_config",
    "Conversation",
    "repl",
    "TASKS",
    "GENERATING",
    "TEMPLATES",
    "DEFAULTS",
    "PIPELINES",
]
