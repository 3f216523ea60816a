"""lov_jax: LLaVA-OneVision in JAX/Flax. Installs `lov_jax`, `data_pipelines` and `lov-jax`."""

from pathlib import Path

from setuptools import find_packages, setup


def _reqs(name: str) -> list[str]:
    lines = Path(__file__).with_name(name).read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith(("#", "-r"))]


setup(
    name="lov_jax",
    version="0.1.0",
    description="LLaVA-OneVision (SigLIP + Qwen-2) in JAX/Flax for TPU pods and GPU clusters",
    python_requires=">=3.11",
    packages=find_packages(
        include=["lov_jax", "lov_jax.*", "data_pipelines", "data_pipelines.*", "configs"]
    ),
    install_requires=_reqs("requirements.txt"),
    extras_require={
        # torch + transformers: HF parity, `lov-jax demo`, `check-parity` (never torchvision)
        "hf": ["torch==2.13.0", "transformers==5.23.0"],
        "test": _reqs("requirements-test.txt"),
        "tpu": ["jax[tpu]==0.10.2"],
        "gpu": ["jax[cuda12]==0.10.2"],
    },
    entry_points={"console_scripts": ["lov-jax=lov_jax.cli:main"]},
)
