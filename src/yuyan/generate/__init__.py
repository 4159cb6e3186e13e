"""Generation: settings (config.py), logits processors and sampling (sampling.py), the decode core
(core.py) that `generate()`/`stream()` (engine.py), the server's scheduler (scheduler.py) and speculative
decoding (speculative.py) drive, and beam search (beams.py)."""

from yuyan.generate.config import Completion, GenerationConfig, TokenLogprob
from yuyan.generate.engine import generate, generate_naive, stream
from yuyan.generate.sampling import SamplingParams, SamplingTensors, stack_params

__all__ = [
    "Completion",
    "GenerationConfig",
    "SamplingParams",
    "SamplingTensors",
    "TokenLogprob",
    "generate",
    "generate_naive",
    "stack_params",
    "stream",
]
