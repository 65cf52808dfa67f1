"""Batched generation with a KV cache, and log-prob scoring of given sequences.

`generate` samples completions of padded prompts (greedy, temperature, top-k, top-p, stop tokens,
several samples per prompt) with one prefill call and a jitted decode loop; `sample_completions`
decodes prompt texts with it (n samples per prompt in one call per batch, fixed shapes so one
program serves every call) for the sample stage, task accuracy and Self-Agreement. `score` and
`score_completions` give per-token and summed log-probs of given tokens under a model (through
`pallas_kernels.token_logprobs`), differentiable, for the preference and RL losses;
`score_completion_lists` is `score_completions` of ragged token lists on the host (e.g. a reward
model's keep-probabilities).

Any module following the `Transformer` API works: `model(tokens, positions=, segment_ids=,
caches=, return_hidden=True) -> (hidden, extras)`, `model.output_head() -> [d, V]`,
`model.init_caches(batch, max_len)`, `model.config.vocab_size`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax import parallel
from kuaijax.data import sequences
from kuaijax.models.layers import dense
from kuaijax.parallel import constrain
from pallas_kernels.token_logprobs import token_logprobs


class Generation(NamedTuple):
  """Completions of `generate`; row r = i * num_samples + j is sample j of prompt i.

  tokens: [B*n, max_new_tokens] int32, completion tokens only; `pad_id` after a row stops.
  logprobs: [B*n, max_new_tokens] float32, log p(token) under the raw model distribution
    (temperature 1, no filtering), the quantity RL losses need as "old" log-probs; 0 after a stop.
  lengths: [B*n] int32, generated tokens per row, the stop token included.
  prompt_index: [B*n] int32, the prompt each row continues (i).
  sample_logprobs: [B*n, max_new_tokens] float32, log-prob of the token under the distribution it
    was actually drawn from (tempered, top-k / top-p filtered; 0 = log 1 for greedy); 0 after a stop.
  stopped: [B*n] bool, True where the row ended with a stop token (False: cut at max_new_tokens).
  """

  tokens: jax.Array
  logprobs: jax.Array
  lengths: jax.Array
  prompt_index: jax.Array
  sample_logprobs: jax.Array
  stopped: jax.Array

  def to_lists(self) -> list[list[int]]:
    """The completions as Python lists of token ids, each cut at its length."""
    tokens, lengths = parallel.host_value((self.tokens, self.lengths))
    return [row[:n].tolist() for row, n in zip(tokens, lengths, strict=True)]


@dataclasses.dataclass(frozen=True)
class _Settings:
  """The static (shape- or branch-deciding) settings of one compiled decode program."""

  max_new_tokens: int
  greedy: bool
  top_k: int | None
  use_top_p: bool
  num_samples: int
  prompt_width: int  # the last columns of the left-aligned prompts that are prefilled and cached
  axis_rules: Any  # (mesh, rules items) of the enclosing `parallel.axis_rules`, or None


def _current_axis_rules():
  """A hashable key of the active `kuaijax.parallel.axis_rules` context (None outside one).

  `constrain` reads that context while tracing, so it must be part of the jit cache key.
  """
  current = parallel.current_axis_rules()
  if current is None:
    return None
  mesh, rules = current
  return mesh, tuple(sorted(rules.items()))


def _as_key(rng):
  if rng is None:
    return jax.random.key(0)
  if isinstance(rng, int | np.integer):
    return jax.random.key(int(rng))
  return rng


def _concrete(x) -> np.ndarray | None:
  """x as a host array, or None when it is traced (validation then happens at run time only).

  Of an array that spans processes, this process's part (each process validates its own rows).
  """
  if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and not x.is_fully_addressable:
    return np.concatenate([np.asarray(s.data).reshape(-1) for s in x.addressable_shards])
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


def _check_lengths(name: str, lengths, batch: int, low: int, high: int):
  if tuple(np.shape(lengths)) != (batch,):
    raise ValueError(f'{name} must have shape [{batch}], got {tuple(np.shape(lengths))}')
  values = _concrete(lengths)
  if values is not None and values.size and (values.min() < low or values.max() > high):
    raise ValueError(
      f'{name} must lie in [{low}, {high}], got min {values.min()} and max {values.max()}'
    )


def _stop_array(stop_tokens: tuple[int, ...]) -> jax.Array:
  """Stop ids padded with -1 (never sampled) to a multiple of 8, to share compiled programs."""
  size = 8 * max(1, -(-len(stop_tokens) // 8))
  return jnp.asarray(stop_tokens + (-1,) * (size - len(stop_tokens)), jnp.int32)


def _prompt_width(prompt_lengths, width: int) -> int:
  """The prompt columns worth prefilling and caching: the longest prompt rounded up to a power of
  two (>= 16, few distinct compiled programs), at most `width`. Decoding attends over the whole
  cache, so a cache sized for the padded width costs time in proportion to the padding. Lengths
  spread over processes keep the full width (every process must compile the same program)."""
  if isinstance(prompt_lengths, jax.Array) and not prompt_lengths.is_fully_addressable:
    return width
  longest = int(np.max(_concrete(prompt_lengths)))
  return min(width, max(16, 1 << (longest - 1).bit_length()))


def _left_align(prompts, lengths, left, pad_id):
  """Left-padded tokens, positions and segment ids (0 = padding) of [B, P] prompts.

  `left` (a traced bool) says the prompts are already left-padded; otherwise rows are shifted.
  """
  width = prompts.shape[1]
  slots = jnp.arange(width, dtype=jnp.int32)[None, :]
  offset = (width - lengths)[:, None]  # first real slot of each left-aligned row
  source = jnp.where(left, slots, jnp.clip(slots - offset, 0, width - 1))
  prompts = jnp.take_along_axis(prompts, source, axis=1)
  real = slots >= offset
  tokens = jnp.where(real, prompts, pad_id).astype(jnp.int32)
  positions = jnp.where(real, slots - offset, 0).astype(jnp.int32)
  return tokens, positions, real.astype(jnp.int32)


def generate(
  model: nnx.Module,
  prompts,
  prompt_lengths,
  *,
  rng=None,
  max_new_tokens: int,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  greedy: bool = False,
  stop_tokens: Sequence[int] = (),
  num_samples: int = 1,
  pad_id: int = 0,
  padding: str = 'right',
  max_length: int | None = None,
) -> Generation:
  """Samples `num_samples` completions of each prompt with the model's KV cache.

  Args:
    model: an NNX LM following the Transformer API (split internally with `nnx.split`, so calls
      with the same model structure and static settings reuse one compiled program).
    prompts: [B, P] int token ids, padded with anything (padding is never attended to).
    prompt_lengths: [B] int, real tokens per prompt, 1 <= length <= P.
    rng: a jax PRNG key or an int seed; required unless sampling is greedy. Row r at step t draws
      with `jax.random.fold_in(jax.random.fold_in(rng, t), r)`, so results do not depend on the
      device layout.
    max_new_tokens: completion width T >= 1.
    temperature: >= 0; 0 means greedy.
    top_k: keep the k most likely tokens (>= 1; ties broken towards the lower token id).
    top_p: nucleus sampling, in (0, 1]: keep the smallest set of most likely tokens whose
      probability reaches p (always at least one), after temperature and top-k.
    greedy: argmax decoding (same as temperature=0); filters are then irrelevant.
    stop_tokens: ids that end a row; the stop token is part of the completion and its length.
    num_samples: completions per prompt (n >= 1); rows i*n .. i*n+n-1 belong to prompt i.
    pad_id: id written after a row stops.
    padding: 'right' (tokens in prompts[b, :len]) or 'left' (tokens in prompts[b, P-len:]).
    max_length: optional cap on the cache length P + max_new_tokens (e.g. the model's trained
      context); exceeding it is an error.

  Returns:
    A `Generation`. Inside `kuaijax.parallel.axis_rules(mesh, rules)` the batch is sharded over the
    batch mesh axes like the model's activations. Prompts may be global arrays spanning processes
    (`parallel.on_process_rows` builds them); the outputs are then global arrays too.

  Raises:
    ValueError: on shapes or settings out of range (named in the message).
  """
  prompts = jnp.asarray(prompts)
  if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
    raise ValueError(f'prompts must be a [B, P] int array, got {prompts.shape} {prompts.dtype}')
  batch, width = prompts.shape
  if batch == 0 or width == 0:
    raise ValueError(f'prompts must be non-empty, got shape {prompts.shape}')
  _check_lengths('prompt_lengths', prompt_lengths, batch, 1, width)
  if _concrete(prompt_lengths) is None:
    raise ValueError('prompt_lengths must be concrete (generate is called outside jit)')
  if not isinstance(max_new_tokens, int | np.integer) or max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be a positive int, got {max_new_tokens!r}')
  if max_length is not None and width + max_new_tokens > max_length:
    raise ValueError(
      f'prompt width {width} + max_new_tokens {max_new_tokens} exceeds max_length {max_length}'
    )
  if not np.isfinite(temperature) or temperature < 0:
    raise ValueError(f'temperature must be finite and >= 0, got {temperature!r}')
  if top_k is not None and (not isinstance(top_k, int | np.integer) or top_k < 1):
    raise ValueError(f'top_k must be None or an int >= 1, got {top_k!r}')
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f'top_p must be None or in (0, 1], got {top_p!r}')
  if not isinstance(num_samples, int | np.integer) or num_samples < 1:
    raise ValueError(f'num_samples must be a positive int, got {num_samples!r}')
  if padding not in ('right', 'left'):
    raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
  vocab = model.config.vocab_size
  stop_tokens = tuple(int(t) for t in stop_tokens)
  bad = [t for t in (*stop_tokens, pad_id) if not 0 <= t < vocab]
  if bad:
    raise ValueError(f'stop_tokens / pad_id must be token ids in [0, {vocab}), got {bad}')
  greedy = bool(greedy or temperature == 0)
  if rng is None and not greedy:
    raise ValueError('rng (a PRNG key or int seed) is required unless greedy')
  settings = _Settings(
    max_new_tokens=int(max_new_tokens),
    greedy=greedy,
    top_k=None if greedy or top_k is None or top_k >= vocab else int(top_k),
    use_top_p=not greedy and top_p is not None and top_p < 1,
    num_samples=int(num_samples),
    prompt_width=_prompt_width(prompt_lengths, width),
    axis_rules=_current_axis_rules(),
  )
  graphdef, state = nnx.split(model)
  return _generate_jit(
    graphdef,
    state,
    prompts.astype(jnp.int32),
    jnp.asarray(prompt_lengths, jnp.int32),
    _as_key(rng),
    jnp.float32(temperature if temperature > 0 else 1.0),
    jnp.float32(1.0 if top_p is None else top_p),
    _stop_array(stop_tokens),
    jnp.int32(pad_id),
    jnp.bool_(padding == 'left'),
    settings=settings,
  )


def _generate_impl(
  graphdef, state, prompts, prompt_lengths, rng, temperature, top_p, stop, pad_id, left, settings
):
  """The jitted body of `generate`: prefill, then a while-loop that stops when every row has."""
  s = settings
  model = nnx.merge(graphdef, state)
  batch, width = prompts.shape
  rows_n = batch * s.num_samples
  steps = s.max_new_tokens
  prompts = constrain(prompts, ('batch', 'length'))
  tokens, positions, segments = _left_align(prompts, prompt_lengths, left, pad_id)
  keep = slice(width - s.prompt_width, width)  # left-aligned: the real tokens are the last columns
  tokens, positions, segments = tokens[:, keep], positions[:, keep], segments[:, keep]
  width = s.prompt_width
  head = model.output_head()

  def logits_of(hidden):  # [N, 1, d] -> [N, V] float32, as the model's own head computes them
    logits = dense(hidden[:, -1], head.astype(hidden.dtype)).astype(jnp.float32)
    return constrain(logits, ('batch', 'vocab'))

  hidden, extras = model(
    tokens,
    positions=positions,
    segment_ids=segments,
    caches=model.init_caches(batch, width + steps - 1),
    return_hidden=True,
  )
  logits = logits_of(hidden)
  caches, lengths = extras['caches'], prompt_lengths
  if s.num_samples > 1:  # prefill once per prompt, then copy its cache for each sample
    repeat = lambda x: jnp.repeat(x, s.num_samples, axis=0) if x.ndim else x
    caches, logits, lengths = jax.tree.map(repeat, (caches, logits, lengths))
  # Only the batch dimension (leading, per the KVCache API) is named: the cache layout may change.
  caches = jax.tree.map(
    lambda x: constrain(x, ('batch',) + (None,) * (x.ndim - 1)) if x.ndim else x, caches
  )
  rows = jnp.arange(rows_n, dtype=jnp.int32)

  def take(t, logits, out, done):
    """Samples step t from logits and writes column t of the outputs."""
    step_rng = jax.random.fold_in(rng, t)
    keys = None if s.greedy else jax.vmap(functools.partial(jax.random.fold_in, step_rng))(rows)
    token, logp, sample_logp = sample_logits(
      logits,
      keys,
      greedy=s.greedy,
      temperature=temperature,
      top_k=s.top_k,
      top_p=top_p if s.use_top_p else None,
    )
    token = jnp.where(done, pad_id, token)
    tokens_out, logps_out, sample_out, gen_lengths = out
    out = (
      tokens_out.at[:, t].set(token),
      logps_out.at[:, t].set(jnp.where(done, 0.0, logp)),
      sample_out.at[:, t].set(jnp.where(done, 0.0, sample_logp)),
      gen_lengths + (~done).astype(jnp.int32),
    )
    done = done | jnp.isin(token, stop)
    return token, out, done

  zeros = jnp.zeros((rows_n, steps), jnp.float32)
  out = (jnp.full((rows_n, steps), pad_id, jnp.int32), zeros, zeros, jnp.zeros_like(rows))
  out = jax.tree.map(lambda x: constrain(x, ('batch', 'length')[: x.ndim]), out)
  token, out, done = take(0, logits, out, jnp.zeros((rows_n,), bool))

  def cond(carry):
    t, _, _, _, done = carry
    return (t < steps) & ~jnp.all(done)

  def body(carry):
    t, caches, token, out, done = carry
    hidden, extras = model(
      token[:, None],
      positions=(lengths + t - 1)[:, None],
      segment_ids=jnp.ones((rows_n, 1), jnp.int32),
      caches=caches,
      return_hidden=True,
    )
    token, out, done = take(t, logits_of(hidden), out, done)
    return t + 1, extras['caches'], token, out, done

  _, _, _, out, done = jax.lax.while_loop(cond, body, (jnp.int32(1), caches, token, out, done))
  tokens_out, logps_out, sample_out, gen_lengths = out
  return Generation(
    tokens=tokens_out,
    logprobs=logps_out,
    lengths=gen_lengths,
    prompt_index=rows // s.num_samples,
    sample_logprobs=sample_out,
    stopped=done,
  )


_generate_jit = jax.jit(_generate_impl, static_argnames=('graphdef', 'settings'))


class TokenSample(NamedTuple):
  """One sampled completion of token prompt `index`: tokens (the stop token included when it
  stopped), raw per-token log-probs under the sampling model (temperature 1), and whether it ended
  with a stop token (False: cut at max_new_tokens)."""

  index: int
  tokens: np.ndarray
  logprobs: np.ndarray
  stopped: bool


def sample_token_prompts(
  model,
  prompts: Sequence[np.ndarray],
  *,
  rng,
  stop_tokens: Sequence[int],
  pad_id: int,
  prompt_len: int,
  num_samples: int = 1,
  greedy: bool = False,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  max_new_tokens: int = 128,
  batch_size: int = 64,
) -> list[TokenSample]:
  """`num_samples` completions of each ragged token prompt (bos included), rows of prompt i
  consecutive; each prompt is prefilled once and its cache copied for its samples (`generate`).

  Batches of `batch_size` prompts have a fixed shape [batch_size, prompt_len] (the last is padded
  with copies of its first prompt) so one compiled program serves every call; batch b samples with
  `fold_in(rng, b)`.
  """
  if num_samples < 1:
    raise ValueError(f'num_samples must be >= 1, got {num_samples}')
  too_long = [len(p) for p in prompts if not 1 <= len(p) <= prompt_len]
  if too_long:
    raise ValueError(f'prompts must hold 1..prompt_len={prompt_len} tokens, got {too_long[:5]}')
  rng = _as_key(rng)
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start : start + batch_size])
    chunk += [chunk[0]] * (batch_size - len(chunk))
    rows, prompt_lengths = sequences.pad_token_prompts(chunk, prompt_len, pad_id)
    gen = generate(
      model,
      rows,
      prompt_lengths,
      rng=jax.random.fold_in(rng, start // batch_size),
      max_new_tokens=max_new_tokens,
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      greedy=greedy,
      stop_tokens=stop_tokens,
      num_samples=num_samples,
      pad_id=pad_id,
    )
    tokens, logprobs, lengths, stopped = parallel.host_value(
      (gen.tokens, gen.logprobs, gen.lengths, gen.stopped)
    )
    for row in range(min(batch_size, len(prompts) - start) * num_samples):
      n = int(lengths[row])
      out.append(
        TokenSample(
          start + row // num_samples,
          np.asarray(tokens[row, :n], np.int32),
          np.asarray(logprobs[row, :n], np.float32),
          bool(stopped[row]),
        )
      )
  return out


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled completion of prompt `index`: tokens (stop token included when it stopped), raw
  per-token log-probs under the sampling model (temperature 1) and the decoded text."""

  index: int
  tokens: np.ndarray
  logprobs: np.ndarray
  text: str


def sample_completions(
  model,
  tokenizer,
  prompts: Sequence[str],
  *,
  num_samples: int = 1,
  seed: int = 0,
  greedy: bool = False,
  temperature: float = 1.0,
  top_k: int | None = None,
  top_p: float | None = None,
  max_new_tokens: int = 128,
  prompt_len: int = 320,
  batch_size: int = 64,
) -> list[Sample]:
  """`num_samples` completions per prompt text (rows of prompt i are consecutive), stopping at eos:
  `sample_token_prompts` of `[bos] + tokens(prompt)` with rng `key(seed)`, decoded."""
  samples = sample_token_prompts(
    model,
    [sequences.prompt_ids(tokenizer, text) for text in prompts],
    rng=jax.random.key(seed),
    stop_tokens=(tokenizer.eos_id,),
    pad_id=tokenizer.pad_id,
    prompt_len=prompt_len,
    num_samples=num_samples,
    greedy=greedy,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    max_new_tokens=max_new_tokens,
    batch_size=batch_size,
  )
  return [Sample(s.index, s.tokens, s.logprobs, tokenizer.decode(s.tokens)) for s in samples]


def best_of_n(samples: Sequence, scores: Sequence[float]) -> list:
  """The highest-scoring of each prompt's samples (anything with an `index`, e.g. `Sample`), in
  prompt order; ties go to the earlier sample. A reranker: the scores may come from a reward model
  (e.g. `kuaijax.methods.prm.solution_scores`)."""
  if len(samples) != len(scores):
    raise ValueError(f'best_of_n: {len(samples)} samples but {len(scores)} scores')
  best: dict[int, int] = {}
  for k, s in enumerate(samples):
    if s.index not in best or scores[k] > scores[best[s.index]]:
      best[s.index] = k
  return [samples[best[i]] for i in sorted(best)]


def filter_logits(logits, *, temperature: float = 1.0, top_k=None, top_p=None) -> jax.Array:
  """Tempered logits with the tokens outside top-k / top-p set to -inf (last axis = vocab).

  Order: divide by temperature (> 0), keep the top_k largest (stable: lower id wins ties), then
  keep the smallest prefix of the remaining tokens, by descending probability renormalised over
  them, whose probability reaches top_p (a token is kept iff the mass strictly before it < top_p).
  """
  logits = jnp.asarray(logits, jnp.float32) / temperature
  vocab = logits.shape[-1]
  if top_k is None and top_p is None:
    return logits
  k = vocab if top_k is None else min(int(top_k), vocab)
  values, index = jax.lax.top_k(logits, k)  # descending; equal values keep the lower id first
  keep = jnp.ones(values.shape, bool)
  if top_p is not None:
    probs = jax.nn.softmax(values, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p) | (top_p >= 1)
    keep = keep.at[..., 0].set(True)
  mask = jnp.put_along_axis(jnp.zeros(logits.shape, bool), index, keep, axis=-1, inplace=False)
  return jnp.where(mask, logits, -jnp.inf)


def sample_logits(logits, keys, *, greedy=False, temperature=1.0, top_k=None, top_p=None):
  """One decoding step over logits [N, V] with per-row keys [N] (unused, may be None, if greedy).

  Returns (tokens [N] int32, raw log-probs [N] under log_softmax(logits), log-probs [N] under the
  filtered, tempered distribution that was sampled (0 when greedy)).
  """
  logits = jnp.asarray(logits, jnp.float32)
  pick = lambda logp, token: jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
  if greedy:
    token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sample_logp = jnp.zeros(token.shape, jnp.float32)
  else:
    filtered = filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    token = jax.vmap(jax.random.categorical)(keys, filtered).astype(jnp.int32)
    sample_logp = pick(jax.nn.log_softmax(filtered, axis=-1), token)
  return token, pick(jax.nn.log_softmax(logits, axis=-1), token), sample_logp


def score(
  model: nnx.Module,
  tokens,
  *,
  loss_mask,
  positions=None,
  segment_ids=None,
  temperature: float = 1.0,
  implementation: str = 'auto',
) -> tuple[jax.Array, jax.Array]:
  """Per-token and summed log-probs of the next tokens of `tokens` under the model.

  Convention (the same as the data pipeline's targets / loss_mask): entry t is the prediction made
  at position t, `token_logps[b, t] = log p(tokens[b, t+1] | tokens[b, :t+1])`, and `loss_mask[b, t]`
  selects it. The last column has no target and is always 0; masked entries are 0.

  Args:
    model: LM following the Transformer API; traced, so `score` works inside jit and grad.
    tokens: [B, L] int.
    loss_mask: [B, L] (bool or float) target-aligned mask as above.
    positions, segment_ids: optional [B, L], as for the model (packing / padding, 0 = padding).
    temperature: a Python number > 0; the log-probs are of softmax(logits / temperature).
    implementation: forwarded to `token_logprobs` ('auto' | 'xla' | 'pallas' | 'interpret').

  Returns:
    (token_logps [B, L] float32, seq_logps [B] float32 = sum over the mask).
  """
  tokens = jnp.asarray(tokens)
  if tokens.ndim != 2:
    raise ValueError(f'tokens must be [B, L], got shape {tokens.shape}')
  if np.shape(loss_mask) != tokens.shape:
    raise ValueError(f'loss_mask shape {np.shape(loss_mask)} != tokens shape {tokens.shape}')
  if isinstance(temperature, int | float) and not temperature > 0:
    raise ValueError(f'temperature must be > 0, got {temperature!r}')
  hidden, _ = model(tokens, positions=positions, segment_ids=segment_ids, return_hidden=True)
  targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
  mask = (jnp.asarray(loss_mask) != 0).at[:, -1].set(False)
  head = model.output_head().astype(hidden.dtype)  # the model's own logits dtype
  logps, _ = token_logprobs(
    hidden, head, targets, temperature=temperature, implementation=implementation
  )
  token_logps = jnp.where(mask, logps, 0.0)
  return token_logps, token_logps.sum(axis=-1)


def score_completions(
  model: nnx.Module,
  prompts,
  prompt_lengths,
  completions,
  completion_lengths,
  *,
  padding: str = 'right',
  pad_id: int = 0,
  temperature: float = 1.0,
  implementation: str = 'auto',
) -> tuple[jax.Array, jax.Array]:
  """Log-probs of completion tokens given their prompts (e.g. a `Generation` and its prompts).

  Builds the sequence prompt[:len] ++ completion[:len] per row (right-padded, padding in segment 0)
  and scores the completion tokens only. Traceable and differentiable (lengths may be traced; they
  are validated when concrete).

  Args:
    prompts: [B, P] int; padded as `padding` says ('right' or 'left').
    prompt_lengths: [B] int in [1, P].
    completions: [B, C] int, right-padded (as `Generation.tokens`).
    completion_lengths: [B] int in [0, C]; a zero-length completion scores 0.

  Returns:
    (token_logps [B, C] float32, log p(completions[b, c] | prompt, completions[b, :c]), 0 past the
    length; seq_logps [B] float32, their sum).
  """
  prompts, completions = jnp.asarray(prompts), jnp.asarray(completions)
  if prompts.ndim != 2 or completions.ndim != 2 or prompts.shape[0] != completions.shape[0]:
    raise ValueError(
      f'prompts [B, P] and completions [B, C] must share B, got {prompts.shape} and '
      f'{completions.shape}'
    )
  if padding not in ('right', 'left'):
    raise ValueError(f"padding must be 'right' or 'left', got {padding!r}")
  (batch, width), span = prompts.shape, completions.shape[1]
  _check_lengths('prompt_lengths', prompt_lengths, batch, 1, width)
  _check_lengths('completion_lengths', completion_lengths, batch, 0, span)
  p_len = jnp.asarray(prompt_lengths, jnp.int32)[:, None]
  c_len = jnp.asarray(completion_lengths, jnp.int32)[:, None]
  slots = jnp.arange(width + span, dtype=jnp.int32)[None, :]
  start = 0 if padding == 'right' else width - p_len
  prompt_part = jnp.take_along_axis(prompts, jnp.clip(start + slots, 0, width - 1), axis=1)
  completion_part = jnp.take_along_axis(completions, jnp.clip(slots - p_len, 0, span - 1), axis=1)
  real = slots < p_len + c_len
  sequence = jnp.where(slots < p_len, prompt_part, jnp.where(real, completion_part, pad_id))
  token_logps, _ = score(
    model,
    sequence,
    loss_mask=(slots >= p_len - 1) & (slots < p_len + c_len - 1),
    segment_ids=real.astype(jnp.int32),
    temperature=temperature,
    implementation=implementation,
  )
  columns = jnp.arange(span, dtype=jnp.int32)[None, :]
  per_token = jnp.take_along_axis(token_logps, p_len - 1 + columns, axis=1)
  per_token = jnp.where(columns < c_len, per_token, 0.0)
  return per_token, per_token.sum(axis=-1)


def completion_batches(
  prompts: Sequence[np.ndarray],
  completions: Sequence[np.ndarray],
  batch_size: int,
  pad_id: int = 0,
  width_multiple: int = 64,
):
  """Ragged (prompt, completion) token pairs as the padded batches `score_completions` takes.

  Pairs are sorted by total length (stable) and cut into batches of `batch_size` rows; yields
  (indices [n], prompts [batch_size, P], prompt_lengths [batch_size], completions
  [batch_size, C], completion_lengths [batch_size]), right-padded with `pad_id`, P and C the
  batch's longest prompt / completion rounded up to `width_multiple` (few shapes, few
  compilations). The rows after the n real ones are a lone pad token with an empty completion.
  """
  round_up = lambda x: max(width_multiple, -(-int(x) // width_multiple) * width_multiple)
  lengths = np.array([len(p) + len(c) for p, c in zip(prompts, completions, strict=True)])
  order = np.argsort(lengths, kind='stable')
  for lo in range(0, len(order), batch_size):
    idx = order[lo : lo + batch_size]
    p_len = np.ones(batch_size, np.int32)
    c_len = np.zeros(batch_size, np.int32)
    p_len[: len(idx)] = [len(prompts[k]) for k in idx]
    c_len[: len(idx)] = [len(completions[k]) for k in idx]
    p_rows = np.full((batch_size, round_up(p_len.max())), pad_id, np.int32)
    c_rows = np.full((batch_size, round_up(c_len.max())), pad_id, np.int32)
    for r, k in enumerate(idx):
      p_rows[r, : p_len[r]], c_rows[r, : c_len[r]] = prompts[k], completions[k]
    yield idx, p_rows, p_len, c_rows, c_len


@functools.partial(jax.jit, static_argnames=('graphdef', 'pad_id', 'axis_rules'))
def _score_completions_jit(graphdef, state, *batch, pad_id, axis_rules):
  del axis_rules  # a cache key only: `constrain` reads the active rules while tracing
  return score_completions(nnx.merge(graphdef, state), *batch, pad_id=pad_id)[0]


def score_completion_lists(
  model: nnx.Module,
  prompts: Sequence[np.ndarray],
  completions: Sequence[np.ndarray],
  *,
  batch_size: int,
  pad_id: int = 0,
) -> list[np.ndarray]:
  """`score_completions` of ragged token lists: per pair, float32 [len(completion)] log-probs
  log p(completion_t | prompt, completion_<t) (on the host).

  Prompts hold bos and are non-empty. The pairs are scored in `completion_batches` (sorted by
  length, padded to multiples of 64) by one compiled program per batch shape.
  """
  if len(prompts) != len(completions):
    raise ValueError(f'{len(prompts)} prompts but {len(completions)} completions')
  if any(len(p) < 1 for p in prompts):
    raise ValueError('every prompt needs at least one token (bos)')
  graphdef, state = nnx.split(model)
  out: list[np.ndarray | None] = [None] * len(prompts)
  for idx, *batch in completion_batches(prompts, completions, batch_size, pad_id):
    logps = _score_completions_jit(
      graphdef, state, *batch, pad_id=pad_id, axis_rules=_current_axis_rules()
    )
    logps = parallel.host_value(logps)
    for r, k in enumerate(idx):
      out[k] = logps[r, : len(completions[k])].astype(np.float32)
  return out


def pair_token_logps(model, batch):
  """Per-token log-probs of both sides in one forward: (chosen [B, L], rejected [B, L])."""
  tokens = jnp.concatenate([batch['chosen_tokens'], batch['rejected_tokens']])
  mask = jnp.concatenate([batch['chosen_mask'], batch['rejected_mask']])
  token_logps, _ = score(model, tokens, loss_mask=mask)
  return jnp.split(token_logps, 2)
