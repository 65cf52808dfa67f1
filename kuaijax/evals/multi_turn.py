"""Multi-turn generation helpers: the next turn of many conversations at once, through the chat layout."""

from collections.abc import Sequence

import numpy as np
from flax import nnx

from kuaijax import sampling
from kuaijax.data import chat

_BUCKET = 32  # Prompt widths are rounded up to a multiple of this, so few programs get compiled.


def generate_turns(
  model: nnx.Module,
  tokenizer,
  conversations: Sequence[Sequence[chat.Message]],
  *,
  next_role: str = 'assistant',
  max_prompt_len: int,
  max_new_tokens: int,
  template: chat.ChatTemplate = chat.DEFAULT_TEMPLATE,
) -> tuple[list[str], int]:
  """(greedy next turn of each conversation, number of prompts truncated from the oldest turns).

  Prompts that do not fit max_prompt_len even after dropping all older exchanges raise ValueError.
  A reply that hits max_new_tokens without eos is returned as far as it got.
  """
  prompts, truncated = [], 0
  for i, messages in enumerate(conversations):
    encoded = chat.encode_prompt(
      messages, tokenizer, next_role=next_role, max_len=max_prompt_len, template=template
    )
    if encoded is None:
      raise ValueError(
        f'conversation {i}: its last turn alone exceeds max_prompt_len={max_prompt_len}'
      )
    prompts.append(encoded[0])
    truncated += encoded[1] > 0
  if not prompts:
    return [], 0
  width = -(-max(len(p) for p in prompts) // _BUCKET) * _BUCKET
  batch = np.full((len(prompts), width), tokenizer.pad_id, np.int32)
  for row, ids in zip(batch, prompts, strict=True):
    row[: len(ids)] = ids
  out = sampling.generate(
    model,
    batch,
    np.asarray([len(p) for p in prompts], np.int32),
    greedy=True,
    max_new_tokens=max_new_tokens,
    stop_tokens=(tokenizer.eos_id,),
    pad_id=tokenizer.pad_id,
  )
  return [tokenizer.decode(ids).strip() for ids in out.to_lists()], truncated
