"""Plain texts from a JSONL file (one {"text": ...} object per line) and their scoring batches.

`read_texts` returns the texts in file order (a malformed line is an error naming the file and
line); `encode_texts` tokenizes them (BOS as the tokenizer adds it) and cuts each to `max_len`
tokens; `text_batches` puts one text per row (no packing) with loss on every next-token prediction,
padding (rows and positions) in segment 0 with no loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from kuaijax.data import records


def read_texts(path: str, max_texts: int = 0) -> list[str]:
  """The "text" fields of a JSONL file, in order; the first `max_texts` (0: all)."""
  if not path:
    raise ValueError('eval_file is required (a JSONL file with a "text" field per line)')
  texts = []
  for where, record in records.iter_jsonl(path, 'eval_file'):
    if not isinstance(record, dict) or not isinstance(record.get('text'), str):
      raise ValueError(f'{where}: needs a JSON object with a string "text" field')
    texts.append(record['text'])
    if max_texts and len(texts) >= max_texts:
      break
  if not texts:
    raise ValueError(f'{path}: no texts')
  return texts


def encode_texts(tokenizer, texts: Sequence[str], max_len: int) -> tuple[list[np.ndarray], int]:
  """(token arrays cut to their first `max_len` tokens, number of texts that were cut)."""
  encoded = [tokenizer.encode_array(t) for t in texts]
  truncated = sum(len(t) > max_len for t in encoded)
  return [t[:max_len] for t in encoded], int(truncated)


def text_batches(token_lists: Sequence[np.ndarray], batch_size: int) -> list[dict]:
  """LM batches of `batch_size` rows, one text per row, all padded to the longest text.

  Fields: inputs, targets (the next token; 0 at the end), loss_mask (every next-token prediction
  inside the text), segment_ids (1 on the text, 0 on padding), positions (0..), task_ids (0). The
  last batch is filled up with empty rows (segment 0, no loss).
  """
  width = max(2, max(len(t) for t in token_lists))
  batches = []
  for start in range(0, len(token_lists), batch_size):
    rows = token_lists[start : start + batch_size]
    tokens = np.zeros((batch_size, width), np.int32)
    segments = np.zeros((batch_size, width), np.int32)
    for i, row in enumerate(rows):
      tokens[i, : len(row)] = row
      segments[i, : len(row)] = 1
    targets = np.concatenate([tokens[:, 1:], np.zeros_like(tokens[:, :1])], axis=1)
    loss_mask = (segments * np.concatenate([segments[:, 1:], 0 * segments[:, :1]], 1)).astype(
      np.float32
    )
    batches.append(
      dict(
        inputs=tokens,
        targets=targets,
        loss_mask=loss_mask,
        segment_ids=segments,
        positions=np.broadcast_to(np.arange(width, dtype=np.int32), tokens.shape).copy(),
        task_ids=np.zeros_like(tokens),
      )
    )
  return batches
