"""Supervised fine-tuning on prompt/completion pairs (kj_arith: question -> numbered-step solution).

Every post-training task (SFT, preference, RLMEC, GRPO) shares one sequence layout, built by
`encode_sequence`: a row of `seq_len` tokens `[bos] + prompt + completion (+ eos) + pad...` and a
target-aligned completion mask, `mask[t] = 1` iff `tokens[t + 1]` is a completion token (the
convention of `kuaijax.sampling.score` and of the LM pipeline's `loss_mask`). SFT batches add the
LM fields (`inputs`, `targets`, `loss_mask`, `positions`, `segment_ids`) so the generic trainer's
`lm_task.lm_loss_fn` trains on the completion tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grain
import numpy as np

from kuaijax.data import arith, sources, tokenizers

_SERIAL_READ = grain.ReadOptions(num_threads=0)


def get_tokenizer(data_config):
  """The tokenizer of a post-training `data` section ('byte', or 'sentencepiece' with a path)."""
  return tokenizers.get_tokenizer(
    data_config.tokenizer, spm_model_path=data_config.spm_model_path or None
  )


def load_problems(
  split: str,
  *,
  levels: Sequence[int] = arith.LEVELS,
  limit: int | None = None,
  data_dir: str | None = None,
  name: str = 'kj_arith',
) -> list[arith.ArithProblem]:
  """kj_arith problems of one split (in split order) whose level is in `levels`, at most `limit`."""
  bad = sorted(set(levels) - set(arith.LEVELS))
  if bad or not levels:
    raise ValueError(f'data.levels={tuple(levels)} must be a non-empty subset of {arith.LEVELS}')
  source = sources.get_data_source(name, split=split, data_dir=data_dir or None)
  decode = lambda v: v.decode('utf-8') if isinstance(v, bytes) else str(v)
  problems = []
  for i in range(len(source)):
    ex = source[i]
    if int(ex['level']) not in levels:
      continue
    problems.append(
      arith.ArithProblem(
        decode(ex['question']),
        decode(ex['solution']),
        int(ex['answer']),
        int(ex['level']),
        int(ex['steps']),
      )
    )
    if limit is not None and len(problems) >= limit:
      break
  return problems


def prompt_ids(tokenizer, question: str) -> np.ndarray:
  """`[bos] + tokens(arith.format_prompt(question))` as int32."""
  body = tokenizer.encode_array(arith.format_prompt(question))
  return np.concatenate([[tokenizer.bos_id], body]).astype(np.int32)


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


def sft_examples(
  problems: Sequence[arith.ArithProblem], tokenizer, seq_len: int, *, pack: bool = True
) -> tuple[list[dict], int]:
  """LM rows of gold-solution examples; returns (rows, number of problems longer than seq_len).

  pack=True places several examples per row (first fit, in order; each its own segment with
  positions restarting at 0, so attention never crosses examples); pack=False one per row.
  """
  sequences, dropped = [], 0
  for problem in problems:
    prompt = prompt_ids(tokenizer, problem.question)
    completion = completion_ids(tokenizer, problem.solution)
    length = len(prompt) + len(completion)
    if length > seq_len:
      dropped += 1
      continue
    sequences.append(encode_sequence(prompt, completion, length, tokenizer.pad_id))
  return pack_sequences(sequences, seq_len, tokenizer.pad_id, pack=pack), dropped


def pack_sequences(sequences, seq_len: int, pad_id: int, *, pack: bool = True) -> list[dict]:
  """Rows of LM fields from unpadded (tokens, mask) sequences of length <= seq_len.

  Each sequence keeps its own targets (the next token of the same sequence; pad at its end),
  loss mask, positions from 0 and a segment id (1, 2, ... within the row; 0 = padding).
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


def in_memory_dataset(
  examples: Sequence, *, batch_size: int, seed: int, transform: Callable | None = None
) -> grain.IterDataset:
  """Infinite shuffled (reshuffled every epoch) batches of in-memory examples; exact resume.

  `transform` maps an element to a dict of arrays lazily. The iterator's state is grain's, so the
  trainer checkpoints it with the train state.
  """
  if not len(examples):
    raise ValueError('the training set is empty (no example fits data.seq_len?)')
  if batch_size <= 0:
    raise ValueError(f'batch_size must be > 0, got {batch_size}')
  ds = grain.MapDataset.source(list(examples)).shuffle(seed=seed).repeat()
  if transform is not None:
    ds = ds.map(transform)
  return ds.batch(batch_size, drop_remainder=True).to_iter_dataset(_SERIAL_READ)


def sft_dataset(
  problems, tokenizer, *, seq_len: int, batch_size: int, seed: int, pack: bool = True
):
  """(grain dataset of SFT batches, number of problems dropped as longer than seq_len)."""
  examples, dropped = sft_examples(problems, tokenizer, seq_len, pack=pack)
  return in_memory_dataset(examples, batch_size=batch_size, seed=seed), dropped
