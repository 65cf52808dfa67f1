"""Tokenizers with one small interface: encode/decode plus pad/bos/eos ids and vocab_size.

`ByteTokenizer` needs no files (the default for runlocal configs); `SentencePieceTokenizer` loads a
local .model file, which `train_sentencepiece` can make from in-memory text without network; 'hf'
loads a Hugging Face model folder's tokenizer.json (`kuaijax.hf.tokenizer.HFTokenizer`).
"""

import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Protocol

import numpy as np
import sentencepiece as spm

TOKENIZER_KINDS = ('byte', 'sentencepiece', 'hf')


class Tokenizer(Protocol):
  pad_id: int
  bos_id: int
  eos_id: int
  vocab_size: int

  def encode(self, text: str) -> list[int]: ...

  def encode_array(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes shifted by 3: 0=pad, 1=bos, 2=eos, byte b -> b + 3 (vocab_size 259)."""

  pad_id = 0
  bos_id = 1
  eos_id = 2
  offset = 3
  vocab_size = 259

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    """Same as `encode` as an int32 array (no Python per-byte loop; used by the pipelines)."""
    return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + self.offset

  def decode(self, ids: Sequence[int]) -> str:
    """Drops specials and ids outside the vocabulary; invalid UTF-8 becomes U+FFFD."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    ids = ids[(ids >= self.offset) & (ids < self.vocab_size)]
    return (ids - self.offset).astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model; pad/bos/eos come from the model (pad falls back to 0 if undefined)."""

  def __init__(self, model_path: str | os.PathLike):
    path = pathlib.Path(model_path)
    if not path.is_file():
      raise FileNotFoundError(f'SentencePiece model file not found: {path}')
    self.model_path = str(path)
    self._sp = spm.SentencePieceProcessor(model_file=self.model_path)
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id = self._sp.bos_id()
    self.eos_id = self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f'{path} defines no bos or eos piece; both are needed for LM data.')
    # Padding is always masked out, so any id works when the model has no pad piece.
    self.pad_id = max(self._sp.pad_id(), 0)
    self._specials = {self.pad_id, self.bos_id, self.eos_id}

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    """Drops specials and ids outside the vocabulary (e.g. from a padded model vocab)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._sp.decode([i for i in ids if 0 <= i < self.vocab_size and i not in self._specials])


def train_sentencepiece(
  texts: Iterable[str], *, vocab_size: int, model_prefix: str | os.PathLike
) -> str:
  """Trains a BPE model from in-memory texts and returns the .model path.

  Deterministic (single thread, no sentence sampling or shuffling), identity normalisation and
  byte fallback, so every string round-trips through encode/decode. Ids: 0=pad, 1=bos, 2=eos,
  3=unk. Texts are split into lines, the unit SentencePiece trains on; newlines themselves are
  encoded through byte fallback.
  """
  prefix = pathlib.Path(model_prefix)
  prefix.parent.mkdir(parents=True, exist_ok=True)
  lines = (line for text in texts for line in text.split('\n') if line.strip())
  spm.SentencePieceTrainer.train(
    sentence_iterator=lines,
    model_prefix=str(prefix),
    vocab_size=vocab_size,
    model_type='bpe',
    byte_fallback=True,
    character_coverage=1.0,
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    pad_id=0,
    bos_id=1,
    eos_id=2,
    unk_id=3,
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    hard_vocab_limit=False,
    minloglevel=2,
  )
  return f'{prefix}.model'


def get_tokenizer(
  kind: str,
  *,
  spm_model_path: str | os.PathLike | None = None,
  hf_path: str | os.PathLike | None = None,
) -> Tokenizer:
  """A tokenizer by name: 'byte' (no files), 'sentencepiece' (needs spm_model_path) or 'hf' (needs
  hf_path, a folder with tokenizer.json)."""
  if kind == 'byte':
    return ByteTokenizer()
  if kind == 'sentencepiece':
    if spm_model_path is None:
      raise ValueError("tokenizer 'sentencepiece' needs spm_model_path")
    return SentencePieceTokenizer(spm_model_path)
  if kind == 'hf':
    if not hf_path:
      raise ValueError("tokenizer 'hf' needs hf_path (a folder with tokenizer.json)")
    from kuaijax.hf.tokenizer import HFTokenizer

    return HFTokenizer(str(hf_path))
  raise ValueError(f'Unknown tokenizer {kind!r}; allowed: {", ".join(TOKENIZER_KINDS)}')
