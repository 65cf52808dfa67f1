"""Post-training trainers on tiny models: SFT, preference (DPO family), RLMEC, online GRPO, and the
kj_arith accuracy evaluator."""

import functools
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kuaijax.data import arith
from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.evals import arith_accuracy
from kuaijax.sampling import score_completions
from kuaijax.train import grpo_task, lm_task, preference_task, rl_task, sft_task
from kuaijax.train.trainer import param_layout, train
from tests.conftest import tiny_lm_config

TOK = ByteTokenizer()


def problems(n, levels=(1, 2)):
  return [arith.generate_problem(7, i, levels[i % len(levels)]) for i in range(n)]


def config(**train):
  cfg = tiny_lm_config(**{'checkpoint_every': 100, 'log_every': 1, **train})
  cfg.optimizer.update(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)
  return cfg


def dataset(examples, batch):
  return sft_task.in_memory_dataset(examples, batch_size=batch, seed=0)


def losses(result):
  return [h['loss'] for h in result.history]


def init_params(cfg):
  """The trainer's initial params for cfg (same seed, same shardings)."""
  factory = lm_task.model_factory(cfg.model)
  layout = param_layout(cfg, factory)
  make = lambda: nnx.to_pure_dict(nnx.split(factory(nnx.Rngs(cfg.train.seed)), nnx.Param)[1])
  params = jax.jit(make, out_shardings=layout.shardings)()
  return nnx.merge(layout.graphdef, params), params


@functools.cache
def tiny_policy():
  """(model, params) of the tiny config's initial policy, shared by the tests (compiled once)."""
  return init_params(config())


@functools.cache
def scorer():
  """Jitted `score_completions` of the tiny policy's graph (params passed in)."""
  graphdef = nnx.graphdef(tiny_policy()[0])
  return jax.jit(lambda p, *a: score_completions(nnx.merge(graphdef, p), *a)[0])


def wrong(solution):
  """The solution with its last result and answer changed (a wrong sample)."""
  answer = arith.extract_answer(solution)
  return solution.replace(str(answer), str(answer + 1))


# ----------------------------------------------------------------------------- layout / SFT


def test_encode_sequence_masks_exactly_the_completion_targets():
  prompt, completion = np.array([1, 10, 11], np.int32), np.array([20, 21, 2], np.int32)
  tokens, mask = sft_task.encode_sequence(prompt, completion, 8, 0)
  np.testing.assert_array_equal(tokens, [1, 10, 11, 20, 21, 2, 0, 0])
  np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 0, 0, 0])  # predicts 20, 21, eos
  assert sft_task.encode_sequence(prompt, completion, 5, 0) is None
  assert sft_task.encode_sequence(prompt, completion[:0], 8, 0)[1].sum() == 0


def test_packed_sft_rows_train_on_solutions_only():
  ps = problems(6)
  rows, dropped = sft_task.sft_examples(ps, TOK, 512)
  assert dropped == 0 and len(rows) < len(ps)  # several examples share a row
  texts, total = [], 0
  for row in rows:
    for seg in range(1, row['segment_ids'].max() + 1):
      sel = row['segment_ids'] == seg
      np.testing.assert_array_equal(row['positions'][sel], np.arange(sel.sum()))
      inputs, targets, mask = row['inputs'][sel], row['targets'][sel], row['loss_mask'][sel] > 0
      np.testing.assert_array_equal(targets[:-1], inputs[1:])
      assert not mask[-1]
      texts.append(TOK.decode(targets[mask]))
      assert targets[mask][-1] == TOK.eos_id
      total += 1
  assert total == len(ps)
  assert sorted(texts) == sorted(p.solution for p in ps)
  assert sft_task.sft_examples(ps, TOK, 60)[1] == len(ps)  # nothing fits


# ----------------------------------------------------------------------------- preference


def gold_pairs(n, seq_len=256):
  out = []
  for p in problems(n):
    prompt = sft_task.prompt_ids(TOK, p.question)
    chosen = sft_task.completion_ids(TOK, p.solution)
    rejected = sft_task.completion_ids(TOK, wrong(p.solution))
    out.append(preference_task.pair_example(prompt, chosen, rejected, seq_len, TOK.pad_id))
  return out


def test_reference_logps_precomputed_equal_frozen_model(tmp_path):
  cfg = config(steps=6, batch_size=4)
  ref_model, ref_params = init_params(cfg)
  pairs = gold_pairs(4)
  run = lambda name, reference, data, frozen=None: train(
    cfg,
    str(tmp_path / name),
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=preference_task.preference_loss_fn('sigmoid', beta=0.5, reference=reference),
    train_dataset=dataset(data, 4),
    frozen=frozen,
  )
  pre = run(
    'pre', 'precomputed', preference_task.precompute_reference_logps(ref_model, pairs, batch_size=3)
  )
  frozen = run('frozen', 'model', pairs, ref_params)
  assert losses(pre)[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
  np.testing.assert_allclose(losses(pre), losses(frozen), rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), pre.params, frozen.params)
  assert losses(pre)[-1] < 0.5 * math.log(2)
  assert pre.history[-1]['rewards/accuracies'] == 1.0


def test_every_preference_loss_by_name_at_the_reference():
  model, _ = tiny_policy()
  pairs = preference_task.precompute_reference_logps(model, gold_pairs(2), batch_size=2)
  batch = {k: np.stack([e[k] for e in pairs]) for k in pairs[0]}
  beta = 0.5
  names = preference_task.PREFERENCE_LOSSES
  all_losses = jax.jit(
    lambda b: {
      n: preference_task.preference_loss_fn(n, beta=beta)(model, b, None)[0] for n in names
    }
  )(batch)
  log2 = math.log(2)
  expected = {  # policy == reference: zero margins
    'sigmoid': log2,
    'capo': log2,
    'd2po': log2,
    'robust': log2,
    'sigmoid_norm': log2,
    'hinge': 1.0,
    'ipo': (1 / (2 * beta)) ** 2,
  }
  assert set(names) == {*expected, 'simpo'}
  for name, value in expected.items():
    assert float(all_losses[name]) == pytest.approx(value, rel=1e-5), name
  assert np.isfinite(float(all_losses['simpo'])) and float(all_losses['simpo']) > log2
  with pytest.raises(ValueError, match='preference.loss_type'):
    preference_task.preference_loss_fn('nope')


def test_pairs_from_rollouts():
  ps = problems(3)
  toks = lambda text: sft_task.completion_ids(TOK, text)
  R = arith_accuracy.Rollout
  rollouts = [
    R(0, toks(ps[0].solution), np.zeros(1), ps[0].solution, True),
    R(0, toks(wrong(ps[0].solution)), np.zeros(1), '', False),
    R(1, toks(wrong(ps[1].solution)), np.zeros(1), '', False),  # no correct sample
    R(2, toks(ps[2].solution), np.zeros(1), ps[2].solution, True),  # no wrong sample
  ]
  pairs, stats = preference_task.pairs_from_rollouts(ps, rollouts, TOK, seq_len=256)
  assert stats == {
    'problems': 3,
    'mixed_problems': 1,
    'gold_chosen_problems': 0,
    'pairs': 1,
    'too_long': 0,
  }
  mask = pairs[0]['chosen_mask'] > 0
  assert TOK.decode(np.roll(pairs[0]['chosen_tokens'], -1)[mask]) == ps[0].solution
  pairs, stats = preference_task.pairs_from_rollouts(
    ps, rollouts, TOK, seq_len=256, gold_fallback=True
  )
  assert stats['pairs'] == 2 and stats['gold_chosen_problems'] == 1


# ----------------------------------------------------------------------------- RLMEC


def test_minimal_rewrite_copies_the_right_prefix():
  p = arith.ArithProblem('q', '[1] 4*10=40\n[2] 40*4=160\nThe answer is 160', 160, 1, 2)
  assert rl_task.minimal_rewrite('[1] 4*10=40\n[2] 40*4=150\nThe answer is 150', p) == p.solution
  assert rl_task.minimal_rewrite('[1] 4*11=44\nThe answer is 44', p) == p.solution
  assert rl_task.minimal_rewrite('garbage', p) == p.solution
  # All steps right but a wrong answer line: the steps are kept, the answer fixed.
  assert rl_task.minimal_rewrite('[1] 4*10=40\n[2] 40*4=160\nThe answer is 16', p) == p.solution


def test_rlmec_features_of_wrong_and_correct_samples():
  prompt = np.array([1, 50, 51], np.int32)
  sample = np.array([10, 11, 12, 13, 2], np.int32)
  rewrite = np.array([10, 11, 14, 13, 2], np.int32)  # one substituted token
  logps = -np.arange(1, 6, dtype=np.float32)
  ex = rl_task.rlmec_example(prompt, sample, logps, rewrite, False, seq_len=12, pad_id=0)
  m = ex['mask'] > 0
  np.testing.assert_array_equal(np.flatnonzero(m), np.arange(2, 7))
  np.testing.assert_allclose(ex['old_logps'][m], logps)
  np.testing.assert_allclose(ex['rewards'][m], [0, 0, -0.1, 0, 0])  # only the edited token
  np.testing.assert_allclose(
    ex['imitation_weights'][ex['rewrite_mask'] > 0], [0.5, 0.5, 1, 0.5, 0.5]
  )
  assert (
    ex['rewards'][~m].sum() == 0 and ex['imitation_weights'][ex['rewrite_mask'] == 0].sum() == 0
  )
  ex = rl_task.rlmec_example(prompt, sample, logps, sample, True, seq_len=12, pad_id=0)
  np.testing.assert_allclose(ex['rewards'][m], 0.5)
  np.testing.assert_allclose(ex['imitation_weights'][ex['rewrite_mask'] > 0], 0.5)
  assert rl_task.rlmec_example(prompt, sample, logps, sample, True, seq_len=7, pad_id=0) is None
  sample, rewrite = np.array([10, 99, 11, 12, 13, 2]), np.array([10, 11, 13, 2])  # two deletions
  ex = rl_task.rlmec_example(prompt, sample, -np.ones(6), rewrite, False, seq_len=14, pad_id=0)
  m = ex['mask'] > 0
  np.testing.assert_allclose(ex['rewards'][m], [0, -0.1, 0, -0.1, 0, 0])


def test_rlmec_trainer_loss_decreases(tmp_path):
  cfg = config(steps=8, batch_size=4)  # the trainer starts from tiny_policy()'s params
  ps = problems(4)
  R = arith_accuracy.Rollout
  rollouts = []
  params = tiny_policy()[1]
  for i, p in enumerate(ps):
    text = wrong(p.solution) if i % 2 else p.solution
    tokens = sft_task.completion_ids(TOK, text)
    prompt = sft_task.prompt_ids(TOK, p.question)
    width = np.zeros((1, 64), np.int32)
    width[0, : len(tokens)] = tokens
    logps = scorer()(
      params,
      np.pad(prompt, (0, 192 - len(prompt)))[None],
      np.array([len(prompt)]),
      width,
      np.array([len(tokens)]),
    )
    rollouts.append(R(i, tokens, np.asarray(logps[0, : len(tokens)]), text, not i % 2))
  examples, stats = rl_task.rlmec_examples(ps, rollouts, TOK, seq_len=256)
  assert stats['correct'] == 2 and stats['wrong'] == 2
  result = train(
    cfg,
    str(tmp_path),
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=rl_task.rlmec_loss_fn(),
    train_dataset=dataset(examples, 4),
  )
  first, last = result.history[0], result.history[-1]
  assert first['ratio_mean'] == pytest.approx(1.0, abs=1e-4)  # old log-probs = the initial policy
  assert last['imitation_loss'] < 0.95 * first['imitation_loss']
  assert last['loss'] < first['loss']


# ----------------------------------------------------------------------------- GRPO


def test_reward_functions_on_hand_made_completions():
  texts = [
    '[1] 2+3=5\nThe answer is 5',
    'The answer is 6',
    'no answer',
    'The answer is 5\nThe answer is 7',
  ]
  rewards, correct = grpo_task.get_reward('exact_answer')(texts, [5] * 4, [10] * 4, 4)
  np.testing.assert_array_equal(rewards, [1, 0, 0, 0])
  np.testing.assert_array_equal(correct, [True, False, False, False])
  texts = ['The answer is 5'] * 3 + ['The answer is 1']
  lengths = np.array([10, 20, 30, 40])
  rewards, _ = grpo_task.get_reward('relative_length')(texts, [5] * 4, lengths, 4, l_base=100.0)
  np.testing.assert_allclose(rewards, [1.1, 1.0, 0.9, 0.0], atol=1e-6)  # mean correct length 20
  rewards, _ = grpo_task.get_reward('relative_length')(texts, [1] * 4, lengths, 4, l_base=100.0)
  np.testing.assert_allclose(rewards, [0, 0, 0, 1])  # accuracy 1/4 < tau: no length bonus
  with pytest.raises(ValueError, match='grpo.reward'):
    grpo_task.get_reward('bleu')


def rollout_hook(**kw):
  return grpo_task.GRPORollouts(TOK, group_size=4, max_new_tokens=64, **kw)


def prompt_batch(n=2):
  examples = grpo_task.prompt_examples(problems(n), TOK, prompt_len=192, max_new_tokens=64)
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def test_grpo_rollouts_old_logps_and_offline_injection():
  model, params = tiny_policy()
  batch = rollout_hook(offline_injection=True)(model, prompt_batch(), jax.random.key(3))
  assert batch['completions'].shape == (8, 64) and batch['prompts'].shape == (8, 192)
  # The random policy never answers right: every group gets its gold solution injected once.
  np.testing.assert_array_equal(batch['injected'], [1, 0, 0, 0] * 2)
  np.testing.assert_array_equal(batch['correct'], batch['injected'])
  np.testing.assert_allclose(batch['advantages'], [1.5, -0.5, -0.5, -0.5] * 2, atol=1e-5)
  # Old log-probs (sampling pass, or re-scored for injected rows) = the policy's scores.
  logps = scorer()(
    params,
    batch['prompts'],
    batch['prompt_lengths'],
    batch['completions'],
    batch['completion_lengths'],
  )
  np.testing.assert_allclose(batch['old_logps'], logps, atol=2e-4)
  long = grpo_task.prompt_examples(problems(1), TOK, prompt_len=192, max_new_tokens=8)[0]
  assert not long['gold_valid'] and long['gold_length'] == 0  # never a cut gold solution
  plain = rollout_hook()(model, prompt_batch(), jax.random.key(3))
  np.testing.assert_array_equal(plain['advantages'], 0)  # all wrong: zero-advantage groups
  np.testing.assert_array_equal(plain['zero_advantage_fraction'], 1)


def test_grpo_loss_decreases_on_a_fixed_rollout_batch():
  model, reference = tiny_policy()
  batch = rollout_hook(offline_injection=True)(model, prompt_batch(), jax.random.key(0))
  graphdef = nnx.graphdef(model)
  loss_fn = grpo_task.grpo_loss_fn(pad_id=TOK.pad_id, kl_coef=0.01)
  value = jax.jit(lambda p: loss_fn(nnx.merge(graphdef, p), batch, None, reference)[0])
  params = reference
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  first = value(params)
  grad = jax.jit(jax.grad(lambda p: value(p)))
  for _ in range(5):
    updates, opt = tx.update(grad(params), opt, params)
    params = optax.apply_updates(params, updates)
  assert float(value(params)) < float(first) - 0.1


class CrashAt:
  """A prepare_batch hook that fails on its `at`-th call (a crash mid-run)."""

  def __init__(self, hook, at):
    self.hook, self.at, self.calls = hook, at, 0

  def __call__(self, *args):
    self.calls += 1
    if self.calls == self.at:
      raise RuntimeError('simulated crash')
    return self.hook(*args)


def test_grpo_trainer_resume_replays_the_same_rollouts(tmp_path):
  cfg = config(steps=4, batch_size=2, checkpoint_every=2)
  examples = grpo_task.prompt_examples(problems(4), TOK, prompt_len=192, max_new_tokens=64)
  run = lambda workdir, hook: train(
    cfg,
    str(workdir),
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=grpo_task.grpo_loss_fn(pad_id=TOK.pad_id),
    train_dataset=dataset(examples, 2),
    prepare_batch=hook,
  )
  straight = run(tmp_path / 'a', rollout_hook(offline_injection=True))
  with pytest.raises(RuntimeError, match='simulated crash'):
    run(tmp_path / 'b', CrashAt(rollout_hook(offline_injection=True), 3))
  resumed = run(tmp_path / 'b', rollout_hook(offline_injection=True))
  assert resumed.step == straight.step == 4
  assert resumed.history[-1]['injected'] > 0 and straight.history[-1]['grad_norm'] > 0
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), straight.params, resumed.params)
  assert straight.history[-1]['loss'] == resumed.history[-1]['loss']


# ----------------------------------------------------------------------------- evaluation


def test_accuracy_by_level_on_hand_made_generations():
  ps = [arith.ArithProblem('q', 's', a, level, 1) for a, level in ((3, 1), (4, 1), (5, 2), (6, 3))]
  texts = ['The answer is 3', 'The answer is 5', '[1] 2+3=5\nThe answer is 5', 'The answer']
  acc = arith_accuracy.accuracy_by_level(texts, ps)
  assert acc == {
    'accuracy': 0.5,
    'count': 4,
    'accuracy/level_1': 0.5,
    'count/level_1': 2,
    'accuracy/level_2': 1.0,
    'count/level_2': 1,
    'accuracy/level_3': 0.0,
    'count/level_3': 1,
  }
  with pytest.raises(ValueError, match='3 texts for 4 problems'):
    arith_accuracy.accuracy_by_level(texts[:3], ps)
  summary = arith_accuracy.summarise_seeds(
    [{'accuracy': 0.5, 'count': 4}, {'accuracy': 1.0, 'count': 4}]
  )
  assert summary['accuracy'] == 0.75 and summary['num_seeds'] == 2
  assert summary['accuracy/std'] == pytest.approx(np.std([0.5, 1.0], ddof=1))
  assert (summary['accuracy/min'], summary['accuracy/max']) == (0.5, 1.0)


def test_sampled_evaluation_is_reproducible_per_seed():
  model, _ = tiny_policy()
  ps = problems(3)
  opts = dict(max_new_tokens=16, prompt_len=192, batch_size=2)
  a = arith_accuracy.sample_solutions(model, TOK, ps, num_samples=2, seed=1, **opts)
  b = arith_accuracy.sample_solutions(model, TOK, ps, num_samples=2, seed=1, **opts)
  c = arith_accuracy.sample_solutions(model, TOK, ps, num_samples=2, seed=2, **opts)
  assert [r.problem_index for r in a] == [0, 0, 1, 1, 2, 2]
  assert [r.text for r in a] == [r.text for r in b] != [r.text for r in c]
  assert all(len(r.tokens) == len(r.logprobs) <= 16 for r in a)
  result = arith_accuracy.evaluate_arith(model, TOK, ps, seeds=(0, 1), greedy=False, **opts)
  assert result['num_seeds'] == 2 and len(result['per_seed']) == 2 and result['accuracy'] == 0.0


def test_in_memory_dataset_checks():
  with pytest.raises(ValueError, match='empty'):
    sft_task.in_memory_dataset([], batch_size=2, seed=0)
  it = iter(dataset([{'x': np.int32(i)} for i in range(5)], 2))
  assert isinstance(it, grain.DatasetIterator) and next(it)['x'].shape == (2,)
  assert jnp.asarray(next(it)['x']).dtype == jnp.int32
