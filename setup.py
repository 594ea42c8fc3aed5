"""Package + (later) csrc build. CPU: `pip install torch==2.13.0` first, then `pip install -e .[dev]`."""

from setuptools import find_packages, setup

setup(
    name="engine",
    version="0.1.0",
    description="Megatron-style training engine for continual pretraining and EfficientScale",
    python_requires=">=3.10",
    packages=find_packages(include=["engine", "engine.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "psutil",  # undeclared dependency of megatron-core's dist_checkpointing async writer
        "einops",
        "numpy",
        "pyyaml",
        "sentencepiece",
        "tensorboard",
        "safetensors",
        "tokenizers",  # HF tokenizer.json files
    ],
    extras_require={
        # transformer-engine: within what megatron-core 0.16.1 supports (its dev extra: <2.12).
        # Pick the core wheel matching the cluster's CUDA: transformer-engine[core_cu12|core_cu13].
        "gpu": ["transformer-engine[pytorch]>=2.3,<2.12", "flash-attn"],
        "hf": ["transformers"],
        "dev": ["pytest", "pytest-timeout", "hypothesis", "ruff", "transformers"],
    },
    entry_points={"console_scripts": ["engine=engine.cli:main"]},
)
