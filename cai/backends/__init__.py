"""Generation backends: each turns a batch of chat conversations into completions."""

from cai.backends.base import Backend, Completion, SamplingParams

__all__ = ["Backend", "Completion", "SamplingParams"]
