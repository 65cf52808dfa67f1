"""Hugging Face tokenizers (`tokenizer.json` through the Rust `tokenizers` library) and chat templates.

`HFTokenizer(folder)` follows the kuaijax tokenizer interface (encode / encode_array / decode,
pad_id / bos_id / eos_id / vocab_size) and adds `apply_chat_template`. Like transformers'
`AutoTokenizer`: `encode` runs the tokenizer's post-processor (which adds BOS/EOS when the
tokenizer defines it) and prepends / appends BOS / EOS when `tokenizer_config.json` sets
`add_bos_token` / `add_eos_token` and the post-processor did not; special tokens come from
`tokenizer_config.json` (strings or AddedToken dicts) and `special_tokens_map.json`.

Chat templates (`chat_template` in tokenizer_config.json or a `chat_template.jinja` file) render
with the same Jinja environment transformers uses: a sandbox, trim_blocks and lstrip_blocks, loop
controls, a `tojson` filter that keeps non-ASCII, `raise_exception` and `strftime_now`, with the
special tokens (bos_token, eos_token, ...) as variables.
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Mapping, Sequence

import numpy as np

SPECIALS = (
  'bos_token',
  'eos_token',
  'unk_token',
  'pad_token',
  'sep_token',
  'cls_token',
  'mask_token',
)


def _read_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  try:
    with open(path, encoding='utf-8') as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}: not valid JSON ({e})') from None


def _token_text(value) -> str | None:
  if isinstance(value, Mapping):
    return value.get('content')
  return value


def compile_chat_template(template: str):
  """A Jinja template compiled like transformers compiles chat templates."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters['tojson'] = tojson
  env.globals['raise_exception'] = raise_exception
  env.globals['strftime_now'] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


class HFTokenizer:
  """A HF model folder's tokenizer (see the module docstring)."""

  def __init__(self, folder: str):
    import tokenizers

    path = os.path.join(folder, 'tokenizer.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{folder}: no tokenizer.json')
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust parser raises plain Exceptions
      raise ValueError(f'{path}: not a valid tokenizers file ({e})') from None
    config = _read_json(os.path.join(folder, 'tokenizer_config.json'))
    specials = _read_json(os.path.join(folder, 'special_tokens_map.json'))
    self.special_tokens = {}
    for name in SPECIALS:
      text = _token_text(config.get(name, specials.get(name)))
      if text is not None:
        if self._tok.token_to_id(text) is None:
          raise ValueError(f'{folder}: {name}={text!r} is not in the vocabulary')
        self.special_tokens[name] = text
    template_file = os.path.join(folder, 'chat_template.jinja')
    self.chat_template = config.get('chat_template')
    if os.path.isfile(template_file):
      with open(template_file, encoding='utf-8') as f:
        self.chat_template = f.read()
    self._add_bos = bool(config.get('add_bos_token', False))
    self._add_eos = bool(config.get('add_eos_token', False))
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = {k: self._tok.token_to_id(v) for k, v in self.special_tokens.items()}
    self.bos_id = ids.get('bos_token', -1)
    self.eos_id = ids.get('eos_token', -1)
    # Padding is always masked out, so any id works when the tokenizer has no pad token.
    self.pad_id = ids.get('pad_token', max(self.eos_id, 0))
    self._special_ids = {i for i in ids.values()} | {
      i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
    }
    self._template = None

  def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`, with BOS / EOS as the tokenizer adds them (see module docstring)."""
    ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
    if add_special_tokens:
      if self._add_bos and self.bos_id >= 0 and ids[:1] != [self.bos_id]:
        ids = [self.bos_id, *ids]
      if self._add_eos and self.eos_id >= 0 and ids[-1:] != [self.eos_id]:
        ids = [*ids, self.eos_id]
    return ids

  def encode_array(self, text: str, *, add_special_tokens: bool = True) -> np.ndarray:
    return np.asarray(self.encode(text, add_special_tokens=add_special_tokens), np.int32)

  def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
    """Text of `ids`; special tokens and ids outside the vocabulary are dropped by default."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    ids = [i for i in ids if 0 <= i < self.vocab_size]
    if skip_special_tokens:
      ids = [i for i in ids if i not in self._special_ids]
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def apply_chat_template(
    self,
    messages: Sequence[Mapping],
    *,
    add_generation_prompt: bool = False,
    tokenize: bool = False,
    **kwargs,
  ):
    """The chat rendered with the folder's template (text, or ids without added specials)."""
    if not self.chat_template:
      raise ValueError('this tokenizer has no chat_template')
    if self._template is None:
      self._template = compile_chat_template(self.chat_template)
    text = self._template.render(
      messages=[dict(m) for m in messages],
      tools=None,
      documents=None,
      add_generation_prompt=add_generation_prompt,
      **{**self.special_tokens, **kwargs},
    )
    return self.encode(text, add_special_tokens=False) if tokenize else text


# A ChatML template (the Qwen layout) for tokenizers trained here.
CHATML_TEMPLATE = (
  '{% for message in messages %}'
  "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] | trim + '<|im_end|>\\n' }}"
  '{% endfor %}'
  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_bpe(
  texts: Sequence[str], folder: str, *, vocab_size: int = 256, chat_template: str = CHATML_TEMPLATE
) -> HFTokenizer:
  """Trains a byte-level BPE on in-memory texts and saves it as a HF tokenizer folder.

  Specials: <pad>=0, <s>=1 (BOS, added by the post-processor), </s>=2 (EOS), <|im_start|>,
  <|im_end|>; tokenizer_config.json carries the specials and the chat template, so transformers'
  AutoTokenizer loads the same tokenizer. Deterministic for fixed texts.
  """
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  specials = ['<pad>', '<s>', '</s>', '<|im_start|>', '<|im_end|>']
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=specials,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(texts, trainer)
  tok.post_processor = processors.TemplateProcessing(
    single='<s> $A', pair='<s> $A <s> $B', special_tokens=[('<s>', 1)]
  )
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, 'tokenizer.json'))
  config = dict(
    tokenizer_class='PreTrainedTokenizerFast',
    bos_token='<s>',
    eos_token='</s>',
    pad_token='<pad>',
    chat_template=chat_template,
    model_max_length=4096,
  )
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w', encoding='utf-8') as f:
    json.dump(config, f, indent=2, ensure_ascii=False)
  return HFTokenizer(folder)
