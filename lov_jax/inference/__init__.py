"""Generation: prefill + KV-cache decode (`engine`), sampling, and the chat-level API."""

from lov_jax.inference.api import generate, request_inputs
from lov_jax.inference.engine import (
    GenerationConfig,
    GenerationOutput,
    Generator,
    PromptInputs,
)

__all__ = [
    "GenerationConfig",
    "GenerationOutput",
    "Generator",
    "PromptInputs",
    "generate",
    "request_inputs",
]
