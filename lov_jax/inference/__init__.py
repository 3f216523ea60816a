"""Generation: prefill + KV-cache decode (`engine`), sampling, and the chat-level API."""

from lov_jax.inference.api import generate
from lov_jax.inference.engine import (
    GenerationConfig,
    GenerationOutput,
    Generator,
    PromptInputs,
)
from lov_jax.inference.prompting import Prompter, PromptError

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "Generator",
    "PromptError",
    "PromptInputs",
    "Prompter",
    "generate",
]
