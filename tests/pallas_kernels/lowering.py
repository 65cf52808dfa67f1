"""Lowering a Pallas kernel for a GPU or a TPU on a host that has neither (CPU-only CI)."""

import jax

# The chip each platform is lowered for. jax >= 0.11 asks the Triton lowering for the target GPU's
# compute capability and, without a GPU in the process, reads it from an abstract device; the same
# abstract device works on older jax, which lowers without asking.
TARGET_DEVICE_KIND = {'cuda': 'NVIDIA H100', 'tpu': 'TPU v5 lite'}


def lowered_text(platform: str, fn, *args) -> str:
  """StableHLO text of `jax.jit(fn)` lowered for `platform` ('cuda' or 'tpu') at `args`."""
  device = jax.sharding.AbstractDevice(
    device_kind=TARGET_DEVICE_KIND[platform], num_cores=None, platform=platform
  )
  mesh = jax.sharding.AbstractMesh((1,), ('x',), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
