"""Post-training methods, one module each, registered by name (see README.md in this folder).

Importing this package registers every built-in method.
"""

from kuaijax.methods import dpo, grpo, parrot, prm, rft, rlmec, sft  # noqa: F401  (registration)
from kuaijax.methods.base import METHODS, Method, MethodContext, get_method, register_method

__all__ = ['METHODS', 'Method', 'MethodContext', 'get_method', 'register_method']
