"""Pallas kernels with pure-jnp references; one sub-package per op (see each op's api.py)."""
