"""Generation: logits processors and sampling (sampling.py), the decoding engine (engine.py)."""

from yuyan.generate.engine import Completion, GenerationConfig, TokenLogprob, generate, generate_naive, stream
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
