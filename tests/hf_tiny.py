"""Re-export for tests: tiny random HF checkpoints."""

from lov_jax.convert.tiny_hf import make_tiny_hf

__all__ = ["make_tiny_hf"]
