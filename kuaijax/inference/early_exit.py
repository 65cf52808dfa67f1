"""Early exit without extra output layers: intermediate layers read out by the final norm and the
shared LM head (arXiv 2412.01455).

The residual stream after layer i goes through the model's own final RMSNorm and output head, so
every layer gives next-token logits with no new parameters.
- `layer_logits` / `layer_analysis`: per layer, the fraction of tokens whose argmax equals the last
  layer's, the top-1 accuracy and the loss on given text.
- `exit_layers`: the per-token exit rule applied to precomputed per-layer logits (teacher forcing).
- `early_exit_generate`: greedy decoding that runs the layers one at a time and stops a token at
  the first layer the rule accepts (the last layer always does). Rules: 'confidence' (max softmax
  probability >= threshold; the confidence gate of the paper is not public, this is the standard
  baseline), 'agreement' (the argmax of this layer equals the previous layer's) and 'gate' (a small
  logistic gate on frozen features, `fit_gate`, probability >= threshold). threshold 1.0 never exits
  early, so it decodes exactly like `sampling.generate(greedy=True)`.
- Skipped layers' KV cache: the exit state is propagated, i.e. every later layer caches the keys and
  values of the frozen exit residual state (its own norm and K/V projections of it), so later tokens
  attend to a filled, consistent cache. In a batch, rows that exited keep their state while others
  continue; once all rows have exited, the remaining layers only compute these K/V projections.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from kuaijax import sampling
from kuaijax.models.attention import KVCache
from kuaijax.models.layers import dense

EXIT_RULES = ('confidence', 'agreement', 'gate')
NUM_FEATURES = 4


def check_shared_head(model) -> None:
  """Raises unless the model has one final norm and one output head shared by all layers."""
  needed = ('final_norm', 'output_head', 'layers', 'layer_step', 'layer_kv')
  missing = [a for a in needed if not hasattr(model, a)]
  if missing:
    raise ValueError(
      f'early exit reads intermediate layers through the shared final norm and LM head; '
      f'{type(model).__name__} lacks {missing}'
    )


def check_rule(rule: str, threshold: float) -> None:
  """Raises on an unknown rule or a threshold outside (0, 1]."""
  if rule not in EXIT_RULES:
    raise ValueError(f'exit rule {rule!r} is not one of {list(EXIT_RULES)}')
  if not (isinstance(threshold, int | float | np.floating) and 0 < threshold <= 1):
    raise ValueError(
      f'exit threshold must be in (0, 1] (1.0 = never exit early), got {threshold!r}'
    )


def _check_gate(rule: str, gate) -> None:
  if rule == 'gate' and gate is None:
    raise ValueError("exit rule 'gate' needs a fitted gate (fit_gate)")


def readout(model, x) -> jax.Array:
  """Logits [..., V] float32 of residual states x [..., d]: final norm, then the shared head."""
  h = model.final_norm(x)
  return dense(h, model.output_head().astype(h.dtype)).astype(jnp.float32)


@functools.partial(jax.jit, static_argnames='graphdef')
def _layer_logits(graphdef, state, tokens, positions, segment_ids):
  model = nnx.merge(graphdef, state)
  _, extras = model(
    tokens, positions=positions, segment_ids=segment_ids, return_hidden=True, return_layers=True
  )
  return jnp.stack([readout(model, x) for x in extras['layers']])


def layer_logits(model, tokens, positions=None, segment_ids=None) -> jax.Array:
  """[L, b, l, V] float32 logits of every layer (the last equals the model's own logits)."""
  check_shared_head(model)
  tokens = jnp.asarray(tokens, jnp.int32)
  b, length = tokens.shape
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
  if segment_ids is None:
    segment_ids = jnp.ones((b, length), jnp.int32)
  graphdef, state = nnx.split(model)
  return _layer_logits(graphdef, state, tokens, positions, segment_ids)


def layer_analysis(model, batches) -> dict:
  """Per-layer agreement with the last layer's argmax, top-1 accuracy and mean loss (lists over L).

  `batches` yields dicts with `inputs`, `targets`, `loss_mask` (and optionally `positions`,
  `segment_ids`), the LM batch layout; only masked tokens count.
  """
  sums, count = None, 0.0
  for batch in batches:
    logits = layer_logits(model, batch['inputs'], batch.get('positions'), batch.get('segment_ids'))
    mask = jnp.asarray(batch['loss_mask'], jnp.float32)
    targets = jnp.asarray(batch['targets'], jnp.int32)
    arg = jnp.argmax(logits, axis=-1)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[None, ..., None], axis=-1)[..., 0]
    per_layer = {
      'agreement': arg == arg[-1],
      'accuracy': arg == targets[None],
      'loss': nll,
      'confidence': jnp.exp(logp.max(axis=-1)),
    }
    values = {k: np.asarray((v * mask).sum(axis=(1, 2)), np.float64) for k, v in per_layer.items()}
    sums = values if sums is None else {k: sums[k] + values[k] for k in sums}
    count += float(mask.sum())
  if not count:
    raise ValueError('layer_analysis: no masked tokens')
  return {k: (v / count).tolist() for k, v in sums.items()} | {'tokens': int(count)}


def exit_features(logits, layer_index, num_layers) -> jax.Array:
  """[..., NUM_FEATURES]: max probability, top-1 minus top-2 probability, normalised entropy and
  the depth (i + 1) / L; frozen read-outs the gate scores."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  top2 = jax.lax.top_k(p, 2)[0]
  entropy = -(p * logp).sum(axis=-1) / np.log(logits.shape[-1])
  depth = jnp.broadcast_to(jnp.float32((layer_index + 1) / num_layers), entropy.shape)
  return jnp.stack([top2[..., 0], top2[..., 0] - top2[..., 1], entropy, depth], axis=-1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ExitGate:
  """Logistic gate p(exit) = sigmoid(features . w + b) over `exit_features`."""

  w: jax.Array
  b: jax.Array

  def __call__(self, features):
    return jax.nn.sigmoid(features @ self.w + self.b)


def _exit_now(logits, prev_arg, layer_index, num_layers, rule, threshold, gate):
  """[N] bool: the rule accepts layer `layer_index`'s logits [N, V] (the argmax of the layer
  before is `prev_arg`). threshold >= 1 never accepts (full depth)."""
  arg = jnp.argmax(logits, axis=-1)
  if rule == 'confidence':
    ok = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1) >= threshold
  elif rule == 'gate':
    ok = gate(exit_features(logits, layer_index, num_layers)) >= threshold
  else:
    ok = (arg == prev_arg) & (layer_index > 0)
  return ok & (threshold < 1) if rule != 'agreement' else ok


def exit_layers(
  logits, *, rule='confidence', threshold=0.9, min_layer: int = 1, gate=None
) -> jax.Array:
  """Per-token exit layer (1-based layers used) from per-layer logits [L, ..., V] (teacher-forced:
  every layer saw the full-depth context, not the propagated exit states of decoding)."""
  check_rule(rule, threshold)
  _check_gate(rule, gate)
  num_layers = logits.shape[0]
  _check_min_layer(min_layer, num_layers)
  used = jnp.full(logits.shape[1:-1], num_layers, jnp.int32)
  exited = jnp.zeros(logits.shape[1:-1], bool)
  prev = jnp.full(logits.shape[1:-1], -1, jnp.int32)
  for i in range(num_layers - 1):
    flat = logits[i].reshape(-1, logits.shape[-1])
    ok = _exit_now(flat, prev.reshape(-1), i, num_layers, rule, threshold, gate)
    ok = ok.reshape(used.shape) & ~exited & (i + 1 >= min_layer)
    used, exited = jnp.where(ok, i + 1, used), exited | ok
    prev = jnp.argmax(logits[i], axis=-1)
  return used


def fit_gate(logits, mask=None, *, steps: int = 300, learning_rate: float = 0.05) -> ExitGate:
  """Fits the gate on frozen per-layer logits [L, ..., V]: label = layer argmax equals the last's.

  Only the gate's NUM_FEATURES + 1 parameters train (logistic loss, Adam, full batch); the model
  stays frozen, as the paper suggests for locating the exit layer.
  """
  num_layers = logits.shape[0]
  final = jnp.argmax(logits[-1], axis=-1)
  feats = jnp.stack([exit_features(logits[i], i, num_layers) for i in range(num_layers)])
  labels = (jnp.argmax(logits, axis=-1) == final[None]).astype(jnp.float32)
  weights = jnp.ones(labels.shape) if mask is None else jnp.broadcast_to(mask, labels.shape)
  feats, labels = feats.reshape(-1, NUM_FEATURES), labels.reshape(-1)
  weights = weights.reshape(-1).astype(jnp.float32)
  gate = ExitGate(jnp.zeros((NUM_FEATURES,)), jnp.zeros(()))
  opt = optax.adam(learning_rate)

  def loss(g):
    z = feats @ g.w + g.b
    return (optax.sigmoid_binary_cross_entropy(z, labels) * weights).sum() / weights.sum()

  @jax.jit
  def step(g, s):
    grads = jax.grad(loss)(g)
    updates, s = opt.update(grads, s)
    return optax.apply_updates(g, updates), s

  state = opt.init(gate)
  for _ in range(steps):
    gate, state = step(gate, state)
  return gate


def _check_min_layer(min_layer, num_layers):
  if not isinstance(min_layer, int | np.integer) or not 1 <= min_layer <= num_layers:
    raise ValueError(f'min_layer must be an int in [1, {num_layers}], got {min_layer!r}')


class ExitGeneration(NamedTuple):
  """Greedy completions with early exit.

  tokens: [B, T] int32 (pad after a stop); lengths: [B] generated tokens, the stop included;
  layers_used: [B, T] int32, layers run for each generated token (1..L; 0 after a stop; the first
  token comes from the full-depth prefill); stopped: [B] bool.
  """

  tokens: jax.Array
  lengths: jax.Array
  layers_used: jax.Array
  stopped: jax.Array


@dataclasses.dataclass(frozen=True)
class _Settings:
  max_new_tokens: int
  rule: str
  min_layer: int


def early_exit_generate(
  model,
  prompts,
  prompt_lengths,
  *,
  max_new_tokens: int,
  rule: str = 'confidence',
  threshold: float = 0.9,
  min_layer: int = 1,
  gate: ExitGate | None = None,
  stop_tokens=(),
  pad_id: int = 0,
  padding: str = 'right',
) -> ExitGeneration:
  """Greedy decoding where each new token exits at the first layer the rule accepts.

  Prompts are prefilled at full depth (as `sampling.generate` does); every later token runs layer
  after layer, reading the shared head after each, and skipped layers get the propagated K/V of
  the exit state (module docstring). `min_layer` is the fewest layers a token may use.
  """
  check_shared_head(model)
  if model.config.stack_spec.kind != 'vanilla':
    raise ValueError(f'early exit needs model.stack=vanilla, got {model.config.stack!r}')
  check_rule(rule, threshold)
  _check_gate(rule, gate)
  num_layers = model.config.num_layers
  _check_min_layer(min_layer, num_layers)
  prompts = jnp.asarray(prompts, jnp.int32)
  if prompts.ndim != 2 or not prompts.size:
    raise ValueError(f'prompts must be a non-empty [B, P] int array, got {prompts.shape}')
  batch, width = prompts.shape
  sampling._check_lengths('prompt_lengths', prompt_lengths, batch, 1, width)
  if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be a positive int, got {max_new_tokens!r}')
  if padding not in ('right', 'left'):
    raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
  gate = gate if gate is not None else ExitGate(jnp.zeros((NUM_FEATURES,)), jnp.zeros(()))
  graphdef, state = nnx.split(model)
  return _generate_jit(
    graphdef,
    state,
    prompts,
    jnp.asarray(prompt_lengths, jnp.int32),
    jnp.float32(threshold),
    gate,
    sampling._stop_array(tuple(int(t) for t in stop_tokens)),
    jnp.int32(pad_id),
    jnp.bool_(padding == 'left'),
    settings=_Settings(int(max_new_tokens), rule, int(min_layer)),
  )


def _generate_impl(
  graphdef, state, prompts, prompt_lengths, threshold, gate, stop, pad_id, left, settings
):
  s = settings
  model = nnx.merge(graphdef, state)
  num_layers = model.config.num_layers
  batch, width = prompts.shape
  steps = s.max_new_tokens
  tokens, positions, segments = sampling._left_align(prompts, prompt_lengths, left, pad_id)
  hidden, extras = model(
    tokens,
    positions=positions,
    segment_ids=segments,
    caches=model.init_caches(batch, width + steps - 1),
    return_hidden=True,
  )
  first = jnp.argmax(dense(hidden[:, -1], model.output_head().astype(hidden.dtype)), axis=-1)
  caches = extras['caches']
  keys = jnp.stack([c.k for c in caches])  # [L, B, S, kv_heads, head_dim]
  values = jnp.stack([c.v for c in caches])
  seg, end = caches[0].segment_ids, caches[0].end
  ones = jnp.ones((batch, 1), jnp.int32)

  def run_layer(i):
    def branch(x, pos, keys, values, seg, end):
      x, cache = model.layer_step(i, x, pos, ones, KVCache(keys[i], values[i], seg, end))
      return x, cache.k, cache.v

    return branch

  def fill_layer(i):
    def branch(x, pos):
      return model.layer_kv(i, x, pos)

    return branch

  layer_branches = [run_layer(i) for i in range(num_layers)]
  fill_branches = [fill_layer(i) for i in range(num_layers)]

  def decode(token, pos, keys, values, seg, end):
    """One token through the layers until every row exits -> (next token, layers used, cache)."""
    x0 = model.embed(token[:, None])

    def cond(c):
      return (c[0] < num_layers) & ~jnp.all(c[4])

    def body(c):
      i, x, keys, values, exited, out, used, prev = c
      y, k, v = jax.lax.switch(i, layer_branches, x, pos, keys, values, seg, end)
      keys = jax.lax.dynamic_update_index_in_dim(keys, k, i, 0)
      values = jax.lax.dynamic_update_index_in_dim(values, v, i, 0)
      x = jnp.where(exited[:, None, None], x, y)  # exited rows keep (and propagate) their state
      logits = readout(model, x[:, 0])
      arg = jnp.argmax(logits, axis=-1).astype(jnp.int32)
      ok = _exit_now(logits, prev, i, num_layers, s.rule, threshold, gate)
      ok = (ok & (i + 1 >= s.min_layer)) | (i == num_layers - 1)
      ok &= ~exited
      out, used = jnp.where(ok, arg, out), jnp.where(ok, i + 1, used)
      return i + 1, x, keys, values, exited | ok, out, used, arg

    zeros = jnp.zeros((batch,), jnp.int32)
    carry = (jnp.int32(0), x0, keys, values, jnp.zeros((batch,), bool), zeros, zeros, zeros - 1)
    i, x, keys, values, _, out, used, _ = jax.lax.while_loop(cond, body, carry)

    def fill(c):  # the layers nobody ran: cache the K/V of the exit states
      j, keys, values = c
      k, v = jax.lax.switch(j, fill_branches, x, pos)
      start = (j, 0, end, 0, 0)
      keys = jax.lax.dynamic_update_slice(keys, k[None].astype(keys.dtype), start)
      values = jax.lax.dynamic_update_slice(values, v[None].astype(values.dtype), start)
      return j + 1, keys, values

    _, keys, values = jax.lax.while_loop(lambda c: c[0] < num_layers, fill, (i, keys, values))
    seg = jax.lax.dynamic_update_slice(seg, ones, (0, end))
    return out, used, keys, values, seg, end + 1

  out_tokens = jnp.full((batch, steps), pad_id, jnp.int32)
  out_used = jnp.zeros((batch, steps), jnp.int32)
  token = first.astype(jnp.int32)
  out_tokens = out_tokens.at[:, 0].set(token)
  out_used = out_used.at[:, 0].set(num_layers)
  done = jnp.isin(token, stop)
  lengths = jnp.ones((batch,), jnp.int32)

  def cond(c):
    return (c[0] < steps) & ~jnp.all(c[-1])

  def body(c):
    t, token, keys, values, seg, end, out_tokens, out_used, lengths, done = c
    pos = (prompt_lengths + t - 1)[:, None]
    token, used, keys, values, seg, end = decode(token, pos, keys, values, seg, end)
    token = jnp.where(done, pad_id, token)
    out_tokens = out_tokens.at[:, t].set(token)
    out_used = out_used.at[:, t].set(jnp.where(done, 0, used))
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(token, stop)
    return t + 1, token, keys, values, seg, end, out_tokens, out_used, lengths, done

  carry = (jnp.int32(1), token, keys, values, seg, end, out_tokens, out_used, lengths, done)
  carry = jax.lax.while_loop(cond, body, carry)
  _, _, _, _, _, _, out_tokens, out_used, lengths, done = carry
  return ExitGeneration(out_tokens, lengths, out_used, done)


_generate_jit = jax.jit(_generate_impl, static_argnames=('graphdef', 'settings'))
