"""Generic sequence layout shared by every post-training method: prompt/completion rows, masks,
packing, prompt batches for generation, multi-turn chat layout, and in-memory grain datasets.

One row of `seq_len` tokens is `[bos] + prompt + completion (+ eos) + pad...` with a target-aligned
completion mask: `mask[t] = 1` iff `tokens[t + 1]` is a completion token (the convention of
`kuaijax.sampling.score` and of the LM pipeline's `loss_mask`). `pack_sequences` turns unpadded
(tokens, mask) pairs into LM rows (`inputs`, `targets`, `loss_mask`, `positions`, `segment_ids`),
several per row when packing. Nothing here knows a task: task featurisation (which text is the
prompt, which the target) lives with the task's data (`kuaijax.data.tasks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grain
import numpy as np

from kuaijax.registry import Registry

_SERIAL_READ = grain.ReadOptions(num_threads=0)


def prompt_ids(tokenizer, text: str) -> np.ndarray:
  """`[bos] + tokens(text)` as int32 (a prompt row's start)."""
  return np.concatenate([[tokenizer.bos_id], tokenizer.encode_array(text)]).astype(np.int32)


def completion_ids(tokenizer, text: str) -> np.ndarray:
  """Tokens of a completion text followed by eos (how the policy is taught to stop)."""
  return np.concatenate([tokenizer.encode_array(text), [tokenizer.eos_id]]).astype(np.int32)


def encode_sequence(
  prompt: np.ndarray, completion: np.ndarray, seq_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray] | None:
  """(tokens [seq_len] int32, mask [seq_len] float32) for prompt ++ completion, or None if too long.

  `prompt` already holds bos; `completion` holds eos when the sample stopped. mask[t] = 1 exactly
  for the positions t whose next token tokens[t + 1] belongs to the completion. An empty
  completion gives an all-zero mask.
  """
  p, c = len(prompt), len(completion)
  if p < 1:
    raise ValueError('a prompt needs at least one token (bos)')
  if p + c > seq_len:
    return None
  tokens = np.full(seq_len, pad_id, np.int32)
  tokens[:p], tokens[p : p + c] = prompt, completion
  mask = np.zeros(seq_len, np.float32)
  mask[p - 1 : p - 1 + c] = 1.0
  return tokens, mask


def lm_fields(tokens: np.ndarray, mask: np.ndarray, pad_id: int, length: int) -> dict:
  """The LM batch fields of one encoded sequence (`length` real tokens, the rest padding)."""
  seq_len = tokens.shape[-1]
  targets = np.full(seq_len, pad_id, np.int32)
  targets[:-1] = tokens[1:]
  segment_ids = (np.arange(seq_len) < length).astype(np.int32)
  return {
    'inputs': tokens,
    'targets': targets,
    'loss_mask': mask,
    'positions': np.arange(seq_len, dtype=np.int32),
    'segment_ids': segment_ids,
  }


def pack_sequences(sequences, seq_len: int, pad_id: int, *, pack: bool = True) -> list[dict]:
  """Rows of LM fields from unpadded (tokens, mask) sequences of length <= seq_len.

  Each sequence keeps its own targets (the next token of the same sequence; pad at its end),
  loss mask, positions from 0 and a segment id (1, 2, ... within the row; 0 = padding).
  pack=True places several sequences per row (first fit, in order); pack=False one per row.
  """
  rows, fill = [], []
  for tokens, mask in sequences:
    n = len(tokens)
    if n > seq_len:
      raise ValueError(f'sequence of {n} tokens does not fit seq_len={seq_len}')
    free = np.flatnonzero(np.asarray(fill) + n <= seq_len) if pack and fill else []
    if len(free):
      index = int(free[0])
    else:
      index = len(rows)
      rows.append(
        lm_fields(np.full(seq_len, pad_id, np.int32), np.zeros(seq_len, np.float32), pad_id, 0)
      )
      fill.append(0)
    row, start = rows[index], fill[index]
    end = start + n
    row['inputs'][start:end] = tokens
    row['targets'][start : end - 1] = tokens[1:]
    row['loss_mask'][start:end] = mask
    row['positions'][start:end] = np.arange(n, dtype=np.int32)
    row['segment_ids'][start:end] = row['segment_ids'].max() + 1
    fill[index] = end if pack else seq_len
  return rows


def supervised_rows(
  pairs: Sequence[tuple[str, str]], tokenizer, seq_len: int, *, pack: bool = True
) -> tuple[list[dict], int]:
  """LM rows training on the completions of (prompt text, completion text) pairs.

  Returns (rows, number of pairs dropped as longer than seq_len).
  """
  sequences, dropped = [], 0
  for prompt, completion in pairs:
    p, c = prompt_ids(tokenizer, prompt), completion_ids(tokenizer, completion)
    if len(p) + len(c) > seq_len:
      dropped += 1
      continue
    sequences.append(encode_sequence(p, c, len(p) + len(c), tokenizer.pad_id))
  return pack_sequences(sequences, seq_len, tokenizer.pad_id, pack=pack), dropped


def pad_token_prompts(
  prompts: Sequence[np.ndarray], prompt_len: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Token prompts (each at most prompt_len long) as right-padded rows [B, prompt_len] and their
  lengths (for generation)."""
  rows = np.full((len(prompts), prompt_len), pad_id, np.int32)
  for i, ids in enumerate(prompts):
    rows[i, : len(ids)] = ids
  return rows, np.array([len(ids) for ids in prompts], np.int32)


def prompt_batch(
  tokenizer, prompts: Sequence[str], prompt_len: int
) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded `[bos] + tokens(prompt)` rows [B, prompt_len] and their lengths (for generation)."""
  encoded = [prompt_ids(tokenizer, text) for text in prompts]
  for ids, text in zip(encoded, prompts):
    if len(ids) > prompt_len:
      raise ValueError(
        f'prompt of {len(ids)} tokens exceeds prompt_len={prompt_len}: {text[:60]!r}...'
      )
  return pad_token_prompts(encoded, prompt_len, tokenizer.pad_id)


def decode_completions(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """Texts of generated rows, each cut at its length (the stop token is dropped by decode)."""
  return [
    tokenizer.decode(row[: int(n)]) for row, n in zip(np.asarray(tokens), np.asarray(lengths))
  ]


# ----------------------------------------------------------------------------- multi-turn chat

CHAT_ROLES = ('system', 'user', 'assistant')
CHAT_LOSS_ON = ('assistant', 'last_assistant', 'user')


def plain_chat_template(role: str, content: str) -> str:
  """'User: ...\\n' / 'Assistant: ...\\n' / 'System: ...\\n' (no special tokens)."""
  return f'{role.capitalize()}: {content}\n'


# name -> render(role, content) -> text of one turn (role markers included). Register more with
# `register_chat_template`, e.g. a model's own template with its special tokens.
# `@register_chat_template('mine') def render(role, content) -> str`.
CHAT_TEMPLATES = Registry('chat template', {'plain': plain_chat_template})
register_chat_template = CHAT_TEMPLATES.register


def chat_sequence(
  messages: Sequence[dict], tokenizer, *, template: str = 'plain', loss_on: str = 'assistant'
) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, mask) of a conversation `[{'role', 'content'}, ...]`, unpadded, starting with bos.

  Each turn is rendered by the template and tokenized on its own (so turn boundaries are exact);
  assistant turns end with eos. `loss_on`: 'assistant' (every assistant turn), 'last_assistant'
  (only the final one) or 'user' (user turns: a query model). The mask is target-aligned as in
  `encode_sequence`; `pack_sequences` turns the pairs into rows.
  """
  render = CHAT_TEMPLATES.lookup(template)
  if loss_on not in CHAT_LOSS_ON:
    raise ValueError(f'loss_on={loss_on!r} is not one of {list(CHAT_LOSS_ON)}')
  last = max((i for i, m in enumerate(messages) if m['role'] == 'assistant'), default=-1)
  tokens, scored = [np.array([tokenizer.bos_id], np.int32)], [np.zeros(1, bool)]
  for i, message in enumerate(messages):
    role = message['role']
    if role not in CHAT_ROLES:
      raise ValueError(f'message {i}: role {role!r} is not one of {list(CHAT_ROLES)}')
    ids = tokenizer.encode_array(render(role, message['content'])).astype(np.int32)
    if role == 'assistant':
      ids = np.concatenate([ids, [tokenizer.eos_id]]).astype(np.int32)
    on = (loss_on == role) or (loss_on == 'last_assistant' and i == last)
    tokens.append(ids)
    scored.append(np.full(len(ids), on))
  tokens, scored = np.concatenate(tokens), np.concatenate(scored)
  mask = np.zeros(len(tokens), np.float32)
  mask[:-1] = scored[1:]
  return tokens, mask


# ----------------------------------------------------------------------------- datasets


def in_memory_dataset(
  examples: Sequence,
  *,
  batch_size: int,
  seed: int,
  transform: Callable | None = None,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.IterDataset:
  """Infinite shuffled (reshuffled every epoch) batches of in-memory examples; exact resume.

  `batch_size` is per process. The shuffled stream is cut into batches and process p takes
  batches p, p + P, ... (P = process_count), so step k's global batch is the stream's rows
  [k * P * batch_size, (k + 1) * P * batch_size) whatever P is: 2 processes of 4 rows train on
  exactly the batches of 1 process of 8. Every process is then at the same position, which is
  why the iterator's checkpoint state (`checkpoint_states`) is one file, restorable by any
  process count. `transform` maps an element to a dict of arrays lazily.
  """
  if not len(examples):
    raise ValueError('the training set is empty (no example fits the sequence length?)')
  if batch_size <= 0:
    raise ValueError(f'batch_size must be > 0, got {batch_size}')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} not in [0, process_count={process_count})')
  ds = grain.MapDataset.source(list(examples)).shuffle(seed=seed).repeat()
  if transform is not None:
    ds = ds.map(transform)
  ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
  return _LockstepDataset(ds.to_iter_dataset(_SERIAL_READ), writer=process_index == 0)


class _LockstepIterator(grain.DatasetIterator):
  """Its parent's batches; its state is the same on every process, so one process saves it."""

  def __init__(self, parent: grain.DatasetIterator, writer: bool):
    super().__init__(parent)
    self._writer = writer

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)

  def checkpoint_states(self) -> dict:
    return {'position': self.get_state()} if self._writer else {}

  def restore_states(self, read: Callable[[str], dict]) -> None:
    self.set_state(read('position'))


class _LockstepDataset(grain.IterDataset):
  def __init__(self, parent: grain.IterDataset, *, writer: bool):
    super().__init__(parent)
    self._writer = writer

  def __iter__(self) -> _LockstepIterator:
    return _LockstepIterator(self._parent.__iter__(), self._writer)


def stack(examples: Sequence[dict]) -> dict:
  """One batch dict of equally-shaped examples."""
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


# The layout of a preference pair (DPO family, CaPO): both sides as full rows with their loss masks.
PAIR_FIELDS = ('chosen_tokens', 'chosen_mask', 'rejected_tokens', 'rejected_mask')


def pair_example(prompt, chosen, rejected, seq_len: int, pad_id: int) -> dict | None:
  """One pair in the shared layout, or None when either side does not fit in seq_len."""
  c = encode_sequence(prompt, chosen, seq_len, pad_id)
  r = encode_sequence(prompt, rejected, seq_len, pad_id)
  if c is None or r is None:
    return None
  return {
    'chosen_tokens': c[0],
    'chosen_mask': c[1],
    'rejected_tokens': r[0],
    'rejected_mask': r[1],
  }
