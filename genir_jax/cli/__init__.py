"""The `genir-jax` command: argument parsing over library calls."""
