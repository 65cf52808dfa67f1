"""Fused token log-probs and entropies over a chunked vocabulary (see api.py)."""

from pallas_kernels.token_logprobs.api import token_logprobs

__all__ = ['token_logprobs']
