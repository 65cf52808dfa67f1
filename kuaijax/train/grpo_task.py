"""Online GRPO: sample a group of completions per prompt from the current policy, reward, update.

The trainer's data iterator yields prompt batches (`prompt_dataset`); `GRPORollouts` is its
`prepare_batch` hook: with the CURRENT params it samples `group_size` completions per prompt
(`kuaijax.sampling.generate`, temperature 1 by default), scores them with a reward function chosen
by name from `REWARDS`, optionally injects stored correct solutions into hard groups, and turns the
rewards into group-normalised advantages and a sample filter (`kuaijax.losses.rl.grpo_process_rewards`).
The old log-probs are the sampling pass's raw log-probs (`Generation.logprobs`). `grpo_loss_fn`
re-scores the completions and applies `kuaijax.losses.rl.grpo_loss` (PPO-clip, optional k3 KL to a
frozen reference passed as the trainer's `frozen` params).

Config: `train.batch_size` counts PROMPTS per step; each step trains on batch_size x group_size
sequences. The hook's rng comes from the trainer (fixed per step), so a resumed run re-samples the
same rollouts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kuaijax.config_lib import check_choice
from kuaijax.data import arith
from kuaijax.evals.arith_accuracy import decode_completions, prompt_batch
from kuaijax.losses import rl
from kuaijax.sampling import generate, score_completions
from kuaijax.train import sft_task


def exact_answer_reward(texts, answers, lengths, group_size) -> tuple[np.ndarray, np.ndarray]:
  """1 if the text's final 'The answer is N' equals the gold answer, else 0; (rewards, correct)."""
  del lengths, group_size
  correct = np.array([arith.check_answer(t, int(a)) for t, a in zip(texts, answers)], bool)
  return correct.astype(np.float32), correct


def relative_length_reward(
  texts, answers, lengths, group_size, *, tau=0.5, l_base=1000.0, low=-0.5, high=0.5
) -> tuple[np.ndarray, np.ndarray]:
  """Exact-answer reward plus the relative length bonus of arXiv 2506.04913 (`rl.relative_length_reward`).

  Correct samples of groups with accuracy >= tau get clip((mean correct length - len) / l_base,
  low, high): shorter-than-average correct answers are preferred.
  """
  base, correct = exact_answer_reward(texts, answers, lengths, group_size)
  config = rl.LengthReward(tau=tau, l_base=l_base, low=low, high=high)
  rewards = rl.relative_length_reward(base, correct, np.asarray(lengths), group_size, config)
  return np.asarray(rewards, np.float32), correct


# name -> reward(texts, answers, lengths, group_size, **options) -> (rewards [N], correct [N])
REWARDS: dict[str, Callable] = {
  'exact_answer': exact_answer_reward,
  'relative_length': relative_length_reward,
}


def get_reward(name: str) -> Callable:
  check_choice('grpo.reward', name, REWARDS)
  return REWARDS[name]


def prompt_examples(
  problems: Sequence[arith.ArithProblem], tokenizer, *, prompt_len: int, max_new_tokens: int
) -> list[dict]:
  """Per-problem prompt rows, gold answer and gold solution tokens (for offline injection).

  A gold solution longer than max_new_tokens is marked invalid (`gold_valid` 0), never cut.
  """
  prompts, lengths = prompt_batch(tokenizer, [p.question for p in problems], prompt_len)
  out = []
  for i, problem in enumerate(problems):
    gold = sft_task.completion_ids(tokenizer, problem.solution)
    valid = len(gold) <= max_new_tokens
    gold = gold[:max_new_tokens] if valid else gold[:0]
    gold_tokens = np.full(max_new_tokens, tokenizer.pad_id, np.int32)
    gold_tokens[: len(gold)] = gold
    out.append(
      {
        'prompts': prompts[i],
        'prompt_lengths': lengths[i],
        'answer': np.int64(problem.answer),
        'gold_tokens': gold_tokens,
        'gold_length': np.int32(len(gold)),
        'gold_valid': np.bool_(valid),
      }
    )
  return out


def prompt_dataset(problems, tokenizer, *, prompt_len, max_new_tokens, batch_size, seed):
  """Infinite shuffled prompt batches for the GRPO trainer (checkpointable grain iterator)."""
  examples = prompt_examples(
    problems, tokenizer, prompt_len=prompt_len, max_new_tokens=max_new_tokens
  )
  return sft_task.in_memory_dataset(examples, batch_size=batch_size, seed=seed)


class GRPORollouts:
  """The trainer's `prepare_batch(model, batch, rng)`: prompts -> scored, advantaged rollouts."""

  def __init__(
    self,
    tokenizer,
    *,
    group_size: int,
    max_new_tokens: int,
    reward: str = 'exact_answer',
    reward_options=None,
    temperature: float = 1.0,
    top_p: float | None = None,
    sample_filter: str = 'all',
    advantage_scale: str = 'group',
    offline_injection: bool = False,
    injection_max_accuracy: float = 0.125,
  ):
    if group_size < 2:
      raise ValueError(f'grpo.group_size must be >= 2, got {group_size}')
    check_choice('grpo.sample_filter', sample_filter, rl.SAMPLE_FILTERS)
    self.tokenizer = tokenizer
    self.group_size, self.max_new_tokens = group_size, max_new_tokens
    self.reward, self.reward_options = get_reward(reward), dict(reward_options or {})
    self.temperature, self.top_p = temperature, top_p
    self.sample_filter = sample_filter
    self.advantage_scale = advantage_scale
    self.offline_injection, self.injection_max_accuracy = offline_injection, injection_max_accuracy
    self._rescore = {}

  def _old_logps(self, model, prompts, prompt_lengths, completions, completion_lengths):
    graphdef, params = nnx.split(model)
    if graphdef not in self._rescore:
      pad = self.tokenizer.pad_id
      self._rescore[graphdef] = jax.jit(
        lambda p, *a: score_completions(nnx.merge(graphdef, p), *a, pad_id=pad)[0]
      )
    out = self._rescore[graphdef](params, prompts, prompt_lengths, completions, completion_lengths)
    return np.asarray(jax.device_get(out), np.float32)

  def __call__(self, model, batch: dict, rng) -> dict:
    g, tok = self.group_size, self.tokenizer
    gen = generate(
      model,
      batch['prompts'],
      batch['prompt_lengths'],
      rng=rng,
      max_new_tokens=self.max_new_tokens,
      temperature=self.temperature,
      top_p=self.top_p,
      stop_tokens=(tok.eos_id,),
      num_samples=g,
      pad_id=tok.pad_id,
    )
    tokens, old_logps, lengths = (
      np.asarray(x) for x in jax.device_get((gen.tokens, gen.logprobs, gen.lengths))
    )
    prompts = np.repeat(np.asarray(batch['prompts']), g, axis=0)
    prompt_lengths = np.repeat(np.asarray(batch['prompt_lengths']), g)
    answers = np.repeat(np.asarray(batch['answer']), g)
    texts = decode_completions(tok, tokens, lengths)
    _, correct = exact_answer_reward(texts, answers, lengths, g)
    injected = np.zeros(len(texts), bool)
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
      if injected.any():
        tokens, lengths = merged['tokens'], merged['lengths']
        rescored = self._old_logps(model, prompts, prompt_lengths, tokens, lengths)
        old_logps = np.where(injected[:, None], rescored, old_logps)
        texts = decode_completions(tok, tokens, lengths)
    rewards, correct = self.reward(texts, answers, lengths, g, **self.reward_options)
    advantages, keep, metrics = rl.grpo_process_rewards(
      rewards, g, correct=correct, filter=self.sample_filter, scale=self.advantage_scale
    )
    n = len(texts)
    row = lambda x: np.full(n, float(x), np.float32)
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


def grpo_loss_fn(
  *,
  pad_id: int,
  kl_coef: float = 0.0,
  clip_eps: float = 0.2,
  clip_eps_high: float | None = None,
  loss_type: str = 'grpo',
  max_length: int | None = None,
):
  """`loss_fn(model, batch, rng[, frozen])` over `GRPORollouts` batches.

  With kl_coef > 0 the reference params must come as the trainer's `frozen` argument.
  """
  check_choice('grpo.loss_type', loss_type, rl.GRPO_LOSS_TYPES)

  def logps_of(model, batch):
    logps, _ = score_completions(
      model,
      batch['prompts'],
      batch['prompt_lengths'],
      batch['completions'],
      batch['completion_lengths'],
      pad_id=pad_id,
    )
    return logps

  def compute(model, batch, ref_logps):
    logps = logps_of(model, batch)
    width = batch['completions'].shape[1]
    mask = jnp.arange(width)[None, :] < batch['completion_lengths'][:, None]
    loss, metrics = rl.grpo_loss(
      logps,
      batch['old_logps'],
      batch['advantages'],
      mask,
      ref_logps=ref_logps,
      kl_coef=kl_coef,
      clip_eps=clip_eps,
      clip_eps_high=clip_eps_high,
      loss_type=loss_type,
      max_length=max_length,
      sample_mask=batch['sample_mask'],
    )
    metrics.update(
      reward=batch['reward'].mean(),
      accuracy=batch['correct'].mean(),
      injected=batch['injected'].mean(),
      zero_advantage_fraction=batch['zero_advantage_fraction'].mean(),
      completion_length=batch['completion_lengths'].astype(jnp.float32).mean(),
    )
    return loss, metrics

  if kl_coef > 0:

    def loss_fn(model, batch, rng, frozen):
      del rng
      ref_model = nnx.merge(nnx.graphdef(model), frozen)
      return compute(model, batch, jax.lax.stop_gradient(logps_of(ref_model, batch)))

  else:

    def loss_fn(model, batch, rng):
      del rng
      return compute(model, batch, None)

  return loss_fn
