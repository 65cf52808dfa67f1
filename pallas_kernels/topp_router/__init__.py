"""Fused MoE router: logits -> float32 softmax -> Top-P selection -> weights, ids, counts; see api.py."""

from pallas_kernels.topp_router.api import topp_router

__all__ = ['topp_router']
