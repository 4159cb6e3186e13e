"""yuyan (语言): the whole life of a GPT-style language model on PyTorch.

Public API: `load(spec)` → LanguageModel (model + tokenizer), `Tokenizer`, `ModelConfig`, `Transformer`.
Training, generation, evaluation and serving live in their subpackages and are re-exported here lazily.
"""

import os

# Transparent huge pages for torch's large CPU tensors (its allocator reads this before its first large
# allocation): a 124M-parameter bf16 training step allocates and frees hundreds of MB of casts and
# gradients, and faulting them in 4 KB pages cost 13-22% of the step (BENCHMARKS.md, "Training precision").
# An explicit THP_MEM_ALLOC_ENABLE=0 in the environment wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from yuyan.errors import UserError  # noqa: E402
from yuyan.model import KVCache, LanguageModel, ModelConfig, Transformer, load, preset  # noqa: E402
from yuyan.tokenizer import Tokenizer  # noqa: E402

__version__ = "0.1.0"
__all__ = [
    "load",
    "LanguageModel",
    "ModelConfig",
    "Transformer",
    "KVCache",
    "preset",
    "Tokenizer",
    "UserError",
    "train",
]


def __getattr__(name: str):
    # yuyan.train(config): the training package is callable (the pre-training recipe); imported on first use
    if name == "train":
        import importlib

        return importlib.import_module("yuyan.train")
    raise AttributeError(f"module 'yuyan' has no attribute {name!r}")
