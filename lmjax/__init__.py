"""lmjax: a JAX/Flax codebase for studying how language models scale."""
__version__ = "0.1.0"
