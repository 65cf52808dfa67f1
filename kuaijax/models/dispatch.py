"""Moving routed (token, expert) pairs to expert rows and back: what the MoE layer and expert
parallelism share.

A selection is `weights[T, K]` (float32) and `ids[T, K]` (int32, sentinel id E for an empty slot;
a token never selects an expert twice). The pieces:

- `group_positions`: a counting sort of the selected pairs by expert (linear in T * (K + E), no
  comparison sort): expert sizes and each pair's row in the expert-major order (sentinel pairs get
  a row past every buffer, so scatters drop them).
- `capacity_slots`: the fixed-capacity variant: within each group the highest-weight pairs take
  the C slots, the rest are dropped and counted (the 'capacity' strategy and the capacity
  all-to-all of expert parallelism).
- `bucketed`: runs `fn(rows, ...)` with `rows` the smallest of a few static buffer sizes that holds
  the traced number of selected pairs (`lax.switch`; sizes grow by `BUCKET_GROWTH`), so compute and
  the memory touched follow the selection, and a count that moves to another bucket never
  recompiles. Each branch is rematerialised (`jax.checkpoint`): under `jax.grad` a switch would
  otherwise keep the residuals of every branch, zero-filled, i.e. more than the largest buffer.
  The backward pass therefore recomputes the branch's forward (one extra forward of the experts).
- `rows_of` / `gather_rows` / `combine_rows`: the row tables of a buffer, the gather of token rows
  into it and the weighted scatter-add of expert outputs back to tokens.
- `expert_ffn` / `ffn_rows`: the SwiGLU experts over rows sorted by expert, through grouped
  matmuls (`grouped_matmul`: `pallas_kernels.gmm` unless a benchmark passes its own).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.gmm import gmm
from pallas_kernels.gmm import xla as gmm_xla

# Buffer sizes of `bucket_sizes` grow by this factor (at most ~41% padding; two buckets per
# doubling of the selected pairs). Rows are rounded up to ROW_ALIGN.
BUCKET_GROWTH = 2**0.5
ROW_ALIGN = 8


def group_positions(ids: jax.Array, num_groups: int) -> tuple[jax.Array, jax.Array]:
  """(sizes[G] int32, rows[T, K] int32): the expert-major row of every selected pair.

  Pairs of one group keep token order. A sentinel id (>= G) gets row T * K, past every buffer.
  Needs distinct ids per token (true of any Top-K / Top-P selection).
  """
  tokens, slots = ids.shape
  valid = ids < num_groups
  safe = jnp.where(valid, ids, num_groups)
  hit = jnp.zeros((tokens, num_groups + 1), jnp.int32)
  hit = hit.at[jnp.arange(tokens)[:, None], safe].set(1)[:, :num_groups]
  before = jnp.cumsum(hit, axis=0) - hit  # earlier tokens of the same group
  sizes = before[-1] + hit[-1]
  starts = jnp.cumsum(sizes) - sizes
  clipped = jnp.minimum(safe, num_groups - 1)
  rank = jnp.take_along_axis(before, clipped, axis=1)
  rows = jnp.where(valid, starts[clipped] + rank, tokens * slots)
  return sizes.astype(jnp.int32), rows.astype(jnp.int32)


def capacity_slots(groups, weights, num_groups: int, capacity: int):
  """Fixed capacity per group, highest weight first: (slot[T*K], kept[T*K], dropped int32).

  groups / weights are flat [M] (group >= num_groups: not selected); slot g * capacity + rank for
  a kept pair, num_groups * capacity (past the buffer) otherwise. Ties keep token order.
  """
  order = jnp.lexsort((-lax.stop_gradient(weights), groups)).astype(jnp.int32)
  sizes = jnp.zeros((num_groups,), jnp.int32).at[groups].add(1, mode='drop')
  starts = jnp.cumsum(sizes) - sizes
  sorted_groups = jnp.minimum(groups[order], num_groups - 1)
  rank_sorted = jnp.arange(order.shape[0], dtype=jnp.int32) - starts[sorted_groups]
  rank = jnp.zeros_like(order).at[order].set(rank_sorted)
  valid = groups < num_groups
  kept = valid & (rank < capacity)
  slot = jnp.where(kept, groups * capacity + rank, num_groups * capacity)
  return slot.astype(jnp.int32), kept, jnp.sum(valid & ~kept).astype(jnp.int32)


def bucket_sizes(low: int, high: int) -> tuple[int, ...]:
  """Static buffer sizes from >= low up to exactly high, growing by BUCKET_GROWTH."""
  sizes, size = [], max(1, low)
  while size < high:
    sizes.append(min(high, -(-size // ROW_ALIGN) * ROW_ALIGN))
    size = math.ceil(size * BUCKET_GROWTH)
  sizes.append(high)
  return tuple(sorted(set(sizes)))


def bucketed(count: jax.Array, sizes: tuple[int, ...], fn, *operands):
  """`fn(rows, *operands)` with rows = the smallest of `sizes` >= count (the largest otherwise)."""
  if len(sizes) == 1:
    return fn(sizes[0], *operands)
  index = jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), count), len(sizes) - 1)
  branches = [jax.checkpoint(functools.partial(fn, size)) for size in sizes]
  return lax.switch(index, branches, *operands)


def rows_of(size: int, rows: jax.Array, weights: jax.Array):
  """Row tables of a `size`-row buffer: (token[size] (T for empty rows), weight[size] f32)."""
  tokens, slots = rows.shape
  flat = rows.reshape(-1)
  token = jnp.full((size,), tokens, jnp.int32)
  token = token.at[flat].set(jnp.arange(flat.shape[0], dtype=jnp.int32) // slots, mode='drop')
  weight = jnp.zeros((size,), jnp.float32).at[flat].set(weights.reshape(-1), mode='drop')
  return token, weight


def gather_rows(x: jax.Array, token: jax.Array) -> jax.Array:
  """x[token] with zero rows for token ids past x (the gradient is a scatter-add)."""
  return jnp.take(x, token, axis=0, mode='fill', fill_value=0)


def combine_rows(out: jax.Array, token: jax.Array, weight: jax.Array, tokens: int, dtype):
  """y[t] = sum of weight[r] * out[r] over the rows r of token t, accumulated in float32."""
  y = jnp.zeros((tokens, out.shape[1]), jnp.float32)
  y = y.at[token].add(weight[:, None] * out.astype(jnp.float32), mode='drop')
  return y.astype(dtype)


def expert_ffn(xs, w1, w3, w2, sizes, matmul):
  """SwiGLU experts over rows sorted by expert: `matmul(lhs, rhs[G, k, n], sizes)` is grouped."""
  f = w1.shape[2]
  h = matmul(xs, jnp.concatenate([w1, w3], axis=2), sizes)
  return matmul(jax.nn.silu(h[:, :f]) * h[:, f:], w2, sizes)


def grouped_matmul(dtype, implementation: str = 'auto', override=None):
  """`fn(lhs[m,k], rhs[G,k,n], group_sizes[G]) -> [m,n]`: gmm in `dtype` (implementation
  'ragged_dot': `jax.lax.ragged_dot`, XLA's own grouped matmul), or `override`."""
  if override is not None:
    return override
  if implementation == 'ragged_dot':
    return functools.partial(jax.lax.ragged_dot, preferred_element_type=dtype)
  return functools.partial(gmm, preferred_element_type=dtype, implementation=implementation)


def ffn_rows(rows: int, x, weights, positions, sizes, w1, w3, w2, matmul):
  """y[T, d]: the experts over a `rows`-row buffer holding the pairs at `positions` [T, K]."""
  token, weight = rows_of(rows, positions, weights)
  out = expert_ffn(gather_rows(x, token), w1, w3, w2, sizes, matmul)
  return combine_rows(out, token, weight, x.shape[0], x.dtype)


# ----------------------------------------------------------------------------- fused row tiles


def _f32(*arrays):
  return tuple(a.astype(jnp.float32) for a in arrays)


def _expert_loops(sizes, m: int, enter, tile_body, leave, carry):
  """Runs every expert's selected rows in row tiles, the expert's weights sliced once.

  For expert g (rows [start, end) of the expert-major order): `local = enter(g)`, then
  `(carry, local) = tile_body(tile, row0, end, local, carry)` over full tiles of the largest size,
  one tile of each smaller size that still fits and a last partial tile of the smallest size (rows
  past `end` masked by the body), then `carry = leave(g, local, carry)`. Trip counts are traced:
  one program for every selection, and the loops run only the tiles the selection needs.
  """
  tiles = gmm_xla.tile_sizes(m, min(gmm_xla.DEFAULT_TILE_M, m), min(gmm_xla.MIN_TILE_M, m))
  starts = jnp.cumsum(sizes) - sizes

  def expert(g, carry):
    start, end = starts[g], starts[g] + sizes[g]
    state = (enter(g), carry)

    def run(count, row, tile, state):
      def step(i, state):
        return tile_body(tile, row + i * tile, end, *state)

      return lax.fori_loop(0, count, step, state), row + count * tile

    full = (end - start) // tiles[0]
    state, row = run(full, start, tiles[0], state)
    for tile in tiles[1:]:
      state, row = run((end - row >= tile).astype(jnp.int32), row, tile, state)
    (local, carry), _ = run((end > row).astype(jnp.int32), row, tiles[-1], state)
    return leave(g, local, carry)

  return lax.fori_loop(0, sizes.shape[0], expert, carry)


def _tile_rows(tile, row, end, m, token, weight):
  """The tile's rows [row, row + tile) clipped into the buffer: (keep, token, weight, first row)."""
  row0 = jnp.minimum(row, m - tile)
  rows = row0 + jnp.arange(tile, dtype=jnp.int32)
  keep = (rows >= row) & (rows < end)
  tok = lax.dynamic_slice_in_dim(token, row0, tile)
  wt = jnp.where(keep, lax.dynamic_slice_in_dim(weight, row0, tile), 0.0)
  return keep, tok, wt, row0


def _expert_weights(w1, w3, w2, g):
  """Expert g's fused input projection [d, 2f] (W1 | W3) and its output projection [f, d]."""
  return jnp.concatenate([w1[g], w3[g]], axis=1), w2[g]


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def tiled_ffn(x, weights, positions, sizes, w1, w3, w2, saved_rows: int = 0):
  """y[T, d] = sum over selected pairs of weight * SwiGLU_e(x_t), one row tile at a time.

  Experts run one after the other, each with its weights sliced once; each tile of its rows
  (selected pairs only) is gathered from x, run through the SwiGLU (W1 and W3 as one matmul) and
  scatter-added into y, so no [pairs, d] buffer exists and the loops run as many tiles as the
  selection needs. The forward keeps the input projections [x W1 | x W3] of the first
  `saved_rows` rows of the expert-major order (a static budget: memory does not follow the traced
  selection); the backward pass reads them there and recomputes them for the rows past the budget.
  The output projection is never recomputed: the routing weight's gradient <W2 a, dy> is taken as
  <a, W2^T dy>, which the backward needs anyway. Products in float32 (the fast path of XLA:CPU).
  """
  return _tiled_fwd(x, weights, positions, sizes, w1, w3, w2, saved_rows)[0]


def _saved_budget(saved_rows: int, m: int) -> int:
  return max(0, min(int(saved_rows), m))


def _tiled_fwd(x, weights, positions, sizes, w1, w3, w2, saved_rows):
  m, f = positions.size, w1.shape[2]
  budget = _saved_budget(saved_rows, m)
  token, weight = rows_of(m, positions, weights)
  xf, w1f, w3f, w2f = _f32(x, w1, w3, w2)

  def body(tile, row, end, local, carry):
    w13, w2g = local
    y, saved = carry
    _, tok, wt, row0 = _tile_rows(tile, row, end, m, token, weight)
    h = gather_rows(xf, tok) @ w13
    out = (jax.nn.silu(h[:, :f]) * h[:, f:]) @ w2g
    if budget >= tile:  # a tile inside the budget is never clipped (row0 == row)
      saved = lax.cond(
        row + tile <= budget,
        lambda: lax.dynamic_update_slice_in_dim(saved, h, row0, 0),
        lambda: saved,
      )
    return local, (y.at[tok].add(wt[:, None] * out, mode='drop'), saved)

  y, saved = _expert_loops(
    sizes,
    m,
    lambda g: _expert_weights(w1f, w3f, w2f, g),
    body,
    lambda g, local, carry: carry,
    (jnp.zeros(x.shape, jnp.float32), jnp.zeros((budget, 2 * f), jnp.float32)),
  )
  return y.astype(x.dtype), (x, weights, positions, sizes, w1, w3, w2, saved)


def _tiled_bwd(saved_rows, res, dy):
  x, weights, positions, sizes, w1, w3, w2, saved = res
  m, (_, d, f) = positions.size, w1.shape
  budget = saved.shape[0]
  token, weight = rows_of(m, positions, weights)
  xf, w1f, w3f, w2f, dyf = _f32(x, w1, w3, w2, dy)

  def enter(g):
    w13, w2g = _expert_weights(w1f, w3f, w2f, g)
    return w13, w2g, jnp.zeros((d, 2 * f), jnp.float32), jnp.zeros((f, d), jnp.float32)

  def body(tile, row, end, local, carry):
    w13, w2g, dw13, dw2 = local
    dx, dweight, *dws = carry
    keep, tok, wt, row0 = _tile_rows(tile, row, end, m, token, weight)
    xs = jnp.where(keep[:, None], gather_rows(xf, tok), 0.0)
    dys = gather_rows(dyf, tok)
    if budget >= tile:
      # Rows masked out (past the expert's end) may hold another expert's values here: they
      # only meet zero routing weights and zeroed inputs below.
      h = lax.cond(
        row + tile <= budget,
        lambda: lax.dynamic_slice_in_dim(saved, row0, tile),
        lambda: xs @ w13,
      )
    else:
      h = xs @ w13
    h1, h3 = h[:, :f], h[:, f:]
    sig = jax.nn.sigmoid(h1)
    s = h1 * sig
    act = s * h3
    grad_act = dys @ w2g.T  # d<y, dy>/d act for a unit routing weight
    old = lax.dynamic_slice_in_dim(dweight, row0, tile)
    dwt = jnp.where(keep, jnp.sum(act * grad_act, axis=1), old)
    dact = wt[:, None] * grad_act
    dh = jnp.concatenate([dact * h3 * sig * (1.0 + h1 * (1.0 - sig)), dact * s], axis=1)
    local = (w13, w2g, dw13 + xs.T @ dh, dw2 + act.T @ (wt[:, None] * dys))
    carry = (
      dx.at[tok].add(dh @ w13.T, mode='drop'),
      lax.dynamic_update_slice_in_dim(dweight, dwt, row0, 0),
      *dws,
    )
    return local, carry

  def leave(g, local, carry):
    dx, dweight, dw1, dw3, dw2 = carry
    _, _, dw13, dw2g = local
    return (
      dx,
      dweight,
      dw1.at[g].set(dw13[:, :f]),
      dw3.at[g].set(dw13[:, f:]),
      dw2.at[g].set(dw2g),
    )

  zeros = lambda a: jnp.zeros(a.shape, jnp.float32)
  carry = (zeros(x), jnp.zeros((m,), jnp.float32), zeros(w1), zeros(w3), zeros(w2))
  dx, dweight, dw1, dw3, dw2 = _expert_loops(sizes, m, enter, body, leave, carry)
  dweights = jnp.take(dweight, positions, mode='fill', fill_value=0.0)
  return (
    dx.astype(x.dtype),
    dweights.astype(weights.dtype),
    None,
    None,
    dw1.astype(w1.dtype),
    dw3.astype(w3.dtype),
    dw2.astype(w2.dtype),
  )


tiled_ffn.defvjp(_tiled_fwd, _tiled_bwd)
