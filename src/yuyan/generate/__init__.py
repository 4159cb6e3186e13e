"""Generation: logits processors and sampling (sampling.py), the decoding engine (engine.py)."""

from yuyan.generate.sampling import SamplingParams, SamplingTensors, stack_params

__all__ = ["SamplingParams", "SamplingTensors", "stack_params"]
