"""Flax NNX model components.

Importing the package registers every feed-forward kind with `layers.register_mlp`
('swiglu' in layers.py, 'moe' in moe.py), so `model.mlp` names resolve wherever a model is built.
"""

from kuaijax.models import moe  # noqa: F401  (registers model.mlp='moe')
