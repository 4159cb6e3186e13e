"""yuyan (语言): the whole life of a GPT-style language model on PyTorch.

Public API: `load(spec)` → LanguageModel (model + tokenizer), `Tokenizer`, `ModelConfig`, `Transformer`.
Training, generation, evaluation and serving live in their subpackages and are re-exported here lazily.
"""

from yuyan.errors import UserError
from yuyan.model import KVCache, LanguageModel, ModelConfig, Transformer, load, preset
from yuyan.tokenizer import Tokenizer

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
