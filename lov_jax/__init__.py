"""LLaVA-OneVision in JAX/Flax."""


def __getattr__(name: str):
    # Lazy: `import lov_jax` stays light (no jax / orbax until a checkpoint is loaded).
    if name == "load_pretrained":
        from lov_jax.pretrained import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'lov_jax' has no attribute {name!r}")
