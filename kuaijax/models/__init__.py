"""Flax NNX model components.

Importing the package registers every feed-forward kind with `layers.register_mlp`
('swiglu' in layers.py, 'moe' in moe.py,
'moe_gated_shared' in gated_shared_moe.py), so `model.mlp` names resolve wherever a model is built.
"""

# registers model.mlp='moe' and 'moe_gated_shared'
from kuaijax.models import gated_shared_moe, moe  # noqa: F401
