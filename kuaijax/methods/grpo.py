"""Online GRPO (and its variants): sample a group per prompt from the current policy, reward, update.

Records: task records (`prompt`, and whatever the task's checker reads; `completion` is the gold
solution, used by offline injection). `examples` gives one prompt row per record; `rollout` is the
trainer's per-batch hook: with the CURRENT params it samples `group_size` completions per prompt
(`kuaijax.sampling.generate`), checks them with the task, computes rewards by name (`REWARDS`),
optionally injects the gold completion into groups that are almost all wrong, and turns the
rewards into group-normalised advantages and a sample filter (`rl.grpo_process_rewards`). The old
log-probs are the sampling pass's raw log-probs. `loss_fn` re-scores the completions and calls
`rl.grpo_loss(**<stage>.loss)` (loss_type: grpo | bnpo | dr_grpo | dapo | cispo, kl_coef, clip_eps,
clip_eps_high (< 0: the loss type's default), max_length, ... — any option the loss takes, so new loss
variants need no change here); kl_coef > 0 needs a `reference` stage. The option `advantage_scale`
('auto' = the loss type's own, 'group', 'batch', 'none') scales the group-relative advantages.

`train.batch_size` counts PROMPTS per step; each step trains on batch_size x group_size sequences.
The hook's rng comes from the trainer (fixed per step), so a resumed run re-samples the same groups.
Across processes each process holds its prompts' groups: sampling runs on the whole mesh
(`parallel.on_process_rows`), checking on the owning process, and rewards are gathered so that
advantages, batch scaling and filters see the global batch, as on one process.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax import parallel
from kuaijax.config_lib import check_choice
from kuaijax.data import sequences
from kuaijax.jit_cache import ParamsJit
from kuaijax.losses import rl
from kuaijax.methods.base import Method, reference_model, register_method
from kuaijax.sampling import generate, score_completions


def exact_answer_reward(correct, lengths, group_size) -> np.ndarray:
  """1 for a correct completion (the task's check), else 0."""
  del lengths, group_size
  return np.asarray(correct, np.float32)


def relative_length_reward(correct, lengths, group_size, **options) -> np.ndarray:
  """Exact-answer reward plus the relative length bonus (`rl.relative_length_reward`; options:
  tau, l_base, low, high of `rl.LengthReward`)."""
  base = exact_answer_reward(correct, lengths, group_size)
  rewards = rl.relative_length_reward(
    base, correct, np.asarray(lengths), group_size, rl.LengthReward(**options)
  )
  return np.asarray(rewards, np.float32)


# name -> reward(correct [N] bool, lengths [N], group_size, **options) -> rewards [N] float32
REWARDS: dict[str, Callable] = {
  'exact_answer': exact_answer_reward,
  'relative_length': relative_length_reward,
}


@register_method('grpo')
class GRPO(Method):
  token_fields = ('prompts', 'completions')

  def __init__(
    self,
    ctx,
    *,
    loss=None,
    group_size: int = 8,
    reward: str = 'exact_answer',
    reward_options=None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    sample_filter: str = 'all',
    advantage_scale: str = 'auto',
    offline_injection: bool = False,
    injection_max_accuracy: float = 0.125,
  ):
    super().__init__(ctx, loss=loss)
    if group_size < 2:
      raise ValueError(f'grpo group_size must be >= 2, got {group_size}')
    check_choice('grpo reward', reward, REWARDS)
    check_choice('grpo sample_filter', sample_filter, rl.SAMPLE_FILTERS)
    if self.loss.get('clip_eps_high', -1.0) < 0:  # config sentinel: the loss type's default
      self.loss.pop('clip_eps_high', None)
    loss_type = self.loss.setdefault('loss_type', 'grpo')
    check_choice('grpo loss.loss_type', loss_type, rl.GRPO_LOSS_TYPES)
    self.advantage_scale = rl.resolve_advantage_scale(advantage_scale, loss_type)
    if ctx.task is None:
      raise ValueError('grpo needs a task (config.data.task) to check its samples')
    self.group_size, self.reward = group_size, REWARDS[reward]
    self.reward_options = dict(reward_options or {}) if reward != 'exact_answer' else {}
    self.temperature, self.top_p = temperature, top_p if top_p < 1.0 else None
    self.sample_filter = sample_filter
    self.offline_injection, self.injection_max_accuracy = offline_injection, injection_max_accuracy
    pad = ctx.tokenizer.pad_id
    self._rescore = ParamsJit(lambda m, *a: score_completions(m, *a, pad_id=pad)[0])
    self.records = []

  @property
  def needs_reference(self):
    return self.loss.get('kl_coef', 0.0) > 0

  def examples(self, records):
    """Prompt rows, the record index and the gold completion (for offline injection; a gold
    completion longer than max_new_tokens is marked invalid, never cut)."""
    tok, budget = self.ctx.tokenizer, self.ctx.max_new_tokens
    self.records = list(records)
    prompts, lengths = sequences.prompt_batch(
      tok, [r['prompt'] for r in self.records], self.ctx.prompt_len
    )
    out = []
    for i, record in enumerate(self.records):
      gold = sequences.completion_ids(tok, record.get('completion', ''))
      valid = 'completion' in record and len(gold) <= budget
      gold_tokens = np.full(budget, tok.pad_id, np.int32)
      if valid:
        gold_tokens[: len(gold)] = gold
      out.append(
        {
          'prompts': prompts[i],
          'prompt_lengths': lengths[i],
          'record_index': np.int32(i),
          'gold_tokens': gold_tokens,
          'gold_length': np.int32(len(gold) if valid else 0),
          'gold_valid': np.bool_(valid),
        }
      )
    return out, {'prompts': len(out)}

  def rollout(self, model, batch: dict, rng) -> dict:
    """This process's groups: sampled on the whole mesh, checked here; advantages (and the
    batch-level scaling / filters) computed on every process's groups together."""
    g, tok = self.group_size, self.ctx.tokenizer
    sample = lambda rows: generate(
      model,
      rows['prompts'],
      rows['prompt_lengths'],
      rng=rng,
      max_new_tokens=self.ctx.max_new_tokens,
      temperature=self.temperature,
      top_p=self.top_p,
      stop_tokens=(tok.eos_id,),
      num_samples=g,
      pad_id=tok.pad_id,
    )
    prompt_rows = {k: batch[k] for k in ('prompts', 'prompt_lengths')}
    gen = parallel.on_process_rows(sample, prompt_rows)
    tokens, old_logps, lengths = gen.tokens, gen.logprobs, gen.lengths
    prompts = np.repeat(np.asarray(batch['prompts']), g, axis=0)
    prompt_lengths = np.repeat(np.asarray(batch['prompt_lengths']), g)
    records = [self.records[int(i)] for i in np.repeat(np.asarray(batch['record_index']), g)]
    check = lambda texts: np.array(
      [self.ctx.task.is_correct(t, r) for t, r in zip(texts, records)], bool
    )
    correct = check(sequences.decode_completions(tok, tokens, lengths))
    injected = np.zeros(len(correct), bool)
    if self.offline_injection:
      samples = {'tokens': tokens, 'lengths': lengths}
      offline = {
        'tokens': np.asarray(batch['gold_tokens'])[:, None],
        'lengths': np.asarray(batch['gold_length'])[:, None],
      }
      valid = np.asarray(batch['gold_valid'], bool)[:, None]
      merged, _, injected = rl.inject_offline_samples(
        samples, correct, g, offline, valid, max_accuracy=self.injection_max_accuracy
      )
      # A collective in multi-process jobs, so every process decides the same way.
      if parallel.gather_process_rows(injected).any():
        tokens, lengths = merged['tokens'], merged['lengths']
        graphdef, params = nnx.split(model)
        rows = {'p': prompts, 'pl': prompt_lengths, 't': tokens, 'l': lengths}
        rescored = parallel.on_process_rows(
          lambda r: self._rescore(graphdef, params, r['p'], r['pl'], r['t'], r['l']), rows
        )
        old_logps = np.where(injected[:, None], np.asarray(rescored, np.float32), old_logps)
        correct = check(sequences.decode_completions(tok, tokens, lengths))
    rewards = self.reward(correct, lengths, g, **self.reward_options)
    everyone = parallel.gather_process_rows({'rewards': rewards, 'correct': correct})
    advantages, keep, metrics = rl.grpo_process_rewards(
      everyone['rewards'],
      g,
      correct=everyone['correct'],
      filter=self.sample_filter,
      scale=self.advantage_scale,
    )
    mine = slice(jax.process_index() * len(rewards), (jax.process_index() + 1) * len(rewards))
    advantages, keep = np.asarray(advantages)[mine], np.asarray(keep)[mine]
    row = lambda x: np.full(len(correct), float(x), np.float32)
    return {
      'prompts': prompts,
      'prompt_lengths': prompt_lengths,
      'completions': tokens,
      'completion_lengths': lengths,
      'old_logps': old_logps,
      'advantages': np.asarray(advantages, np.float32),
      'sample_mask': np.asarray(keep, np.float32),
      'reward': np.asarray(rewards, np.float32),
      'correct': correct.astype(np.float32),
      'injected': injected.astype(np.float32),
      'zero_advantage_fraction': row(metrics['zero_advantage_fraction']),
    }

  def _logps(self, model, batch):
    logps, _ = score_completions(
      model,
      batch['prompts'],
      batch['prompt_lengths'],
      batch['completions'],
      batch['completion_lengths'],
      pad_id=self.ctx.tokenizer.pad_id,
    )
    return logps

  def loss_fn(self, model, batch, rng, frozen=None):
    del rng
    ref_logps = None
    if self.needs_reference:
      ref_model = reference_model(model, frozen)
      ref_logps = jax.lax.stop_gradient(self._logps(ref_model, batch))
    width = batch['completions'].shape[1]
    mask = jnp.arange(width)[None, :] < batch['completion_lengths'][:, None]
    loss, metrics = rl.grpo_loss(
      self._logps(model, batch),
      batch['old_logps'],
      batch['advantages'],
      mask,
      ref_logps=ref_logps,
      sample_mask=batch['sample_mask'],
      **self.loss,
    )
    metrics.update(
      reward=batch['reward'].mean(),
      accuracy=batch['correct'].mean(),
      injected=batch['injected'].mean(),
      zero_advantage_fraction=batch['zero_advantage_fraction'].mean(),
      completion_length=batch['completion_lengths'].astype(jnp.float32).mean(),
    )
    return loss, metrics
