"""lmjax: a JAX/Flax codebase for studying how language models scale."""
from setuptools import find_packages, setup

setup(
    name="lmjax",
    version="0.1.0",
    description="Train transformer ladders, fit scaling laws with honest uncertainty.",
    packages=find_packages(include=["lmjax", "lmjax.*"]),
    python_requires=">=3.11",  # jax 0.10.2 and orbax 0.12.8 need it
    install_requires=[
        # Versions tested together; the upper bounds keep fast-moving APIs from breaking us.
        # The whole suite passes on jax 0.10.2 (Python 3.11), 0.11.2 (3.12) and 0.12.0.1
        # (3.12, 3.13), flax 0.12.12 with the newer two; jax >= 0.11 needs Python >= 3.12.
        # README, "Versions".
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "tensorflow-datasets>=4.9.10,<5",
        "grain>=0.2.18,<0.3",
        "absl-py>=2.1",
        "ml_collections>=1.1",
        "numpy>=1.26",
        "scipy>=1.13",
        "matplotlib>=3.8",
        # The CPU allocator lmjax's command lines re-execute onto (lmjax/allocator.py): no
        # per-step page faults for XLA:CPU's temp block. Wheels exist for Linux x86_64.
        "cmeel-mimalloc>=3.4.3; platform_system == 'Linux' and platform_machine == 'x86_64'",
        "sentencepiece>=0.2",
        "tensorboardX>=2.6",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5"],
        # The PyTorch reference model of benchmarks/train_throughput.py (CPU build).
        "bench": ["torch==2.13.0"],
        # tfds.load / tf.data paths; lmjax itself never needs TensorFlow.
        "tf": ["tensorflow"],
    },
)
