"""Tiny random-weight transformers models of every family, the reference of the parity tests and
benchmarks (needs the `[hf]` extra: torch + transformers; nothing is downloaded).

`make_model(family, folder, **config)` builds `AutoModelForCausalLM.from_config` with small sizes,
draws every weight from N(0, std^2) (norm scales and biases from U(0.5, 1.5) so they matter), saves
it with `save_pretrained` and returns the torch model.
"""

from __future__ import annotations

TINY = dict(
  vocab_size=128,
  hidden_size=32,
  intermediate_size=64,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=16)
# Per family: what the tiny model exercises (Llama-3 and YaRN RoPE scaling, tied embeddings, biases, q/k
# norm, a sliding window shorter than the test sequences, fine-grained and shared experts).
FAMILY_CONFIGS = {
  'llama': dict(
    rope_theta=500000.0,
    rope_scaling=dict(
      rope_type='llama3',
      factor=8.0,
      low_freq_factor=1.0,
      high_freq_factor=4.0,
      original_max_position_embeddings=16,
    ),
  ),
  'mistral': dict(sliding_window=5),
  'qwen2': dict(
    tie_word_embeddings=True,
    rope_scaling=dict(rope_type='yarn', factor=4.0, original_max_position_embeddings=8),
  ),
  'qwen3': dict(head_dim=16),
  'mixtral': dict(num_local_experts=4, num_experts_per_tok=2),
  'qwen2_moe': dict(num_experts=4, shared_expert_intermediate_size=48, **MOE),
  'qwen3_moe': dict(num_experts=8, head_dim=8, norm_topk_prob=True, **MOE),
}


def make_config(family: str, **overrides):
  """A transformers config of `family` with the tiny sizes (and the family's features)."""
  import transformers

  values = {**TINY, **FAMILY_CONFIGS[family], **overrides}
  return transformers.AutoConfig.for_model(family, **values)


def randomize(model, *, seed: int = 0, std: float = 0.2):
  """Draws every parameter again: matrices N(0, std^2), vectors U(0.5, 1.5)."""
  import torch

  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.ndim > 1:
        p.copy_(torch.randn(p.shape, generator=gen) * std)
      else:
        p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
  return model


def make_model(family: str, folder: str | None = None, *, seed: int = 0, **overrides):
  """A random tiny transformers model of `family` (eval mode), saved to `folder` when given."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(make_config(family, **overrides))
  model = randomize(model.eval(), seed=seed)
  model.generation_config.eos_token_id = None  # fixed-length greedy generation
  if folder is not None:
    model.save_pretrained(folder)
  return model


def greedy(model, tokens, max_new_tokens: int):
  """transformers' greedy `generate` of [B, P] int tokens -> [B, max_new_tokens] numpy ids."""
  import torch

  x = torch.as_tensor(tokens)
  with torch.no_grad():
    out = model.generate(
      x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, do_sample=False
    )
  return out[:, x.shape[1] :].numpy()


def logits(model, tokens):
  """transformers' float32 logits [B, L, V] of [B, L] int tokens as numpy."""
  import torch

  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()
