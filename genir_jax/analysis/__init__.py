"""The paper's analyses, one module each, as library functions over loaded models and arrays.

Each module computes its experiment batched and jitted; the `genir-jax` subcommands and `experiments/`
wrap them with file input/output in the reference code's formats.
"""
