"""Grouped matmul (MoE expert FFNs over rows sorted by expert); see api.py."""

from pallas_kernels.gmm.api import gmm, tgmm

__all__ = ['gmm', 'tgmm']
