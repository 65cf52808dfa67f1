"""Post-training methods on tiny models: the sequence layout, SFT / RFT, the DPO family, RLMEC and
online GRPO through the trainer, and the task-accuracy evaluator."""

import dataclasses
import functools
import math

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kuaijax import sampling
from kuaijax.data import arith, sequences, tasks
from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.evals import task_accuracy
from kuaijax.methods import MethodContext, get_method
from kuaijax.methods import dpo as dpo_lib
from kuaijax.methods import grpo as grpo_lib
from kuaijax.methods import rlmec as rlmec_lib
from kuaijax.sampling import score_completions
from kuaijax.stages import rlmec as rlmec_stages
from kuaijax.train import lm_task
from kuaijax.train.trainer import param_layout, train
from tests.conftest import tiny_lm_config

TOK = ByteTokenizer()
CTX = MethodContext(TOK, tasks.get_task('kj_arith'), seq_len=256, prompt_len=192, max_new_tokens=64)


def problems(n, levels=(1, 2)):
  return [arith.generate_problem(7, i, levels[i % len(levels)]) for i in range(n)]


def records(n, levels=(1, 2)):
  return [arith.problem_record(p) for p in problems(n, levels)]


def method(name, *, loss=None, **options):
  return get_method(name)(CTX, loss=loss, **options)


def config(**train):
  cfg = tiny_lm_config(**{'checkpoint_every': 100, 'log_every': 1, **train})
  cfg.optimizer.update(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)
  return cfg


def dataset(examples, batch):
  return sequences.in_memory_dataset(examples, batch_size=batch, seed=0)


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


# ----------------------------------------------------------------------------- layout / SFT / RFT


def test_encode_sequence_masks_exactly_the_completion_targets():
  prompt, completion = np.array([1, 10, 11], np.int32), np.array([20, 21, 2], np.int32)
  tokens, mask = sequences.encode_sequence(prompt, completion, 8, 0)
  np.testing.assert_array_equal(tokens, [1, 10, 11, 20, 21, 2, 0, 0])
  np.testing.assert_array_equal(mask, [0, 0, 1, 1, 1, 0, 0, 0])  # predicts 20, 21, eos
  assert sequences.encode_sequence(prompt, completion, 5, 0) is None
  assert sequences.encode_sequence(prompt, completion[:0], 8, 0)[1].sum() == 0


def segments(rows):
  """(targets under the loss mask) of every packed segment, checking the segment layout."""
  out = []
  for row in rows:
    for seg in range(1, row['segment_ids'].max() + 1):
      sel = row['segment_ids'] == seg
      np.testing.assert_array_equal(row['positions'][sel], np.arange(sel.sum()))
      inputs, targets, mask = row['inputs'][sel], row['targets'][sel], row['loss_mask'][sel] > 0
      np.testing.assert_array_equal(targets[:-1], inputs[1:])
      assert not mask[-1]
      out.append(targets[mask])
  return out


def test_packed_sft_rows_train_on_solutions_only():
  rs = records(6)
  rows, stats = get_method('sft')(dataclasses.replace(CTX, seq_len=512)).examples(rs)
  assert stats['dropped_too_long'] == 0 and len(rows) < len(rs)  # several examples share a row
  targets = segments(rows)
  assert all(t[-1] == TOK.eos_id for t in targets)
  assert sorted(TOK.decode(t) for t in targets) == sorted(r['solution'] for r in rs)
  short = get_method('sft')(dataclasses.replace(CTX, seq_len=60))
  assert short.examples(rs)[1]['dropped_too_long'] == len(rs)  # nothing fits


def sample_record(index, record, text, correct, tokens=None):
  tokens = sequences.completion_ids(TOK, text) if tokens is None else tokens
  return {
    **record,
    'index': index,
    'gold': record['completion'],
    'completion': text,
    'completion_tokens': tokens.tolist(),
    'logprobs': [0.0] * len(tokens),
    'correct': correct,
  }


def test_rft_keeps_distinct_correct_samples_and_optionally_gold():
  rs = records(2)
  samples = [
    sample_record(0, rs[0], rs[0]['solution'], True),
    sample_record(0, rs[0], rs[0]['solution'], True),  # duplicate
    sample_record(0, rs[0], wrong(rs[0]['solution']), False),
    sample_record(1, rs[1], wrong(rs[1]['solution']), False),
  ]
  rows, stats = method('rft').examples(samples)
  assert (stats['correct_samples'], stats['duplicates'], stats['gold']) == (1, 1, 0)
  assert [TOK.decode(t) for t in segments(rows)] == [rs[0]['solution']]
  rows, stats = method('rft', with_gold=True).examples(samples)
  # Gold of both prompts; the correct sample of prompt 0 equals its gold: counted once.
  assert (stats['gold'], stats['correct_samples'], stats['duplicates']) == (2, 0, 2)
  assert sorted(TOK.decode(t) for t in segments(rows)) == sorted(r['solution'] for r in rs)
  with pytest.raises(ValueError, match='no correct sample'):
    method('rft').examples(samples[2:])


def test_chat_layout_masks_the_chosen_roles():
  messages = [
    {'role': 'user', 'content': 'hi'},
    {'role': 'assistant', 'content': 'a1'},
    {'role': 'user', 'content': 'more'},
    {'role': 'assistant', 'content': 'a2'},
  ]
  render = sequences.plain_chat_template
  text = ''.join(render(m['role'], m['content']) for m in messages)

  def scored(loss_on):
    tokens, mask = sequences.chat_sequence(messages, TOK, loss_on=loss_on)
    assert tokens[0] == TOK.bos_id and TOK.decode(tokens) == text
    return TOK.decode(tokens[1:][mask[:-1] > 0])

  assert scored('assistant') == 'Assistant: a1\nAssistant: a2\n'
  assert scored('last_assistant') == 'Assistant: a2\n'
  assert scored('user') == 'User: hi\nUser: more\n'
  tokens, mask = sequences.chat_sequence(messages, TOK, loss_on='last_assistant')
  assert tokens[-1] == TOK.eos_id and mask[-2] == 1  # the final eos is a target
  with pytest.raises(ValueError, match='role'):
    sequences.chat_sequence([{'role': 'bot', 'content': 'x'}], TOK)


# ----------------------------------------------------------------------------- preference


def pair_records(n):
  return [
    {'prompt': r['prompt'], 'chosen': r['solution'], 'rejected': wrong(r['solution'])}
    for r in records(n)
  ]


def test_reference_logps_precomputed_equal_frozen_model(tmp_path):
  cfg = config(steps=6, batch_size=4)
  ref_model, ref_params = init_params(cfg)
  graphdef = nnx.graphdef(ref_model)

  def run(name, reference):
    m = method('dpo', loss=dict(beta=0.5), reference=reference)
    pairs, _ = m.examples(pair_records(4))
    pairs = m.prepare(pairs, graphdef, ref_params)
    frozen = ref_params if m.frozen_reference else None
    return train(
      cfg,
      str(tmp_path / name),
      model_factory=lm_task.model_factory(cfg.model),
      loss_fn=m.loss_fn,
      train_dataset=dataset(pairs, 4),
      frozen=frozen,
      count_tokens=m.count_tokens,
    )

  pre, frozen = run('pre', 'precomputed'), run('frozen', 'model')
  assert losses(pre)[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
  np.testing.assert_allclose(losses(pre), losses(frozen), rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), pre.params, frozen.params)
  assert losses(pre)[-1] < 0.5 * math.log(2)
  assert pre.history[-1]['rewards/accuracies'] == 1.0
  assert pre.history[-1]['tokens_per_s'] > 0  # counted from the pair tokens


def test_every_preference_objective_by_name_at_the_reference():
  model, params = tiny_policy()
  graphdef = nnx.graphdef(model)
  recs = [{**r, 'chosen_value': 0.8, 'rejected_value': 0.2} for r in pair_records(2)]
  beta = 0.5
  cases = {  # (method, loss options) -> loss at policy == reference (zero margins)
    ('dpo', 'sigmoid'): math.log(2),
    ('dpo', 'robust'): math.log(2),
    ('dpo', 'sigmoid_norm'): math.log(2),
    ('dpo', 'hinge'): 1.0,
    ('dpo', 'ipo'): (1 / (2 * beta)) ** 2,
    ('capo', None): math.log(2),
    ('d2po', None): math.log(2),
    ('sppd', None): math.log(1 + math.exp(0.6)),  # gamma 1: -log s(-gamma dV)
  }
  assert {t for m, t in cases if m == 'dpo'} | {'simpo'} == set(dpo_lib.pref.DPO_LOSS_TYPES)
  for (name, loss_type), expected in cases.items():
    loss = {'beta': beta, **({'loss_type': loss_type} if loss_type else {})}
    if name == 'sppd':
      loss['gamma'] = 1.0
    m = method(name, loss=loss)
    examples = m.prepare(m.examples(recs)[0], graphdef, params)
    value, _ = m.loss_fn(model, sequences.stack(examples), None)
    assert float(value) == pytest.approx(expected, rel=1e-5), (name, loss_type)
  simpo = method('dpo', loss={'loss_type': 'simpo', 'beta': beta})
  assert not simpo.needs_reference
  value, _ = simpo.loss_fn(model, sequences.stack(simpo.examples(recs)[0]), None)
  assert np.isfinite(float(value)) and float(value) > math.log(2)
  with pytest.raises(ValueError, match='reference'):
    method('dpo', reference='nope')
  with pytest.raises(ValueError, match='not one of'):
    get_method('ppo')


def test_pair_records_from_samples():
  rs = records(3)
  samples = [
    sample_record(0, rs[0], rs[0]['solution'], True),
    sample_record(0, rs[0], wrong(rs[0]['solution']), False),
    sample_record(1, rs[1], wrong(rs[1]['solution']), False),  # no correct sample
    sample_record(2, rs[2], rs[2]['solution'], True),  # no wrong sample
  ]
  pairs, stats = dpo_lib.pair_records(samples)
  chosen, rejected = (len(pairs[0][f'{side}_tokens']) for side in ('chosen', 'rejected'))
  assert stats == {
    'prompts': 3,
    'mixed_prompts': 1,
    'gold_chosen_prompts': 0,
    'pairs': 1,
    'chosen_length': chosen,
    'rejected_length': rejected,
    'chosen_longer': float(chosen > rejected),
  }
  example = method('dpo').examples(pairs)[0][0]
  mask = example['chosen_mask'] > 0
  assert TOK.decode(np.roll(example['chosen_tokens'], -1)[mask]) == rs[0]['solution']
  pairs, stats = dpo_lib.pair_records(samples, gold_fallback=True)
  assert stats['pairs'] == 2 and stats['gold_chosen_prompts'] == 1
  assert pairs[1]['chosen'] == rs[1]['solution']


# ----------------------------------------------------------------------------- RLMEC


def test_minimal_edit_records_use_the_program_teacher():
  """Wrong samples are rewritten by `ProgramTeacher` (the GRM stages' teacher): the right prefix
  is copied verbatim, an equal reordered step is right, the rest is the gold solution."""
  gold = '[1] 4*10=40\n[2] 40*4=160\nThe answer is 160'
  problem = dict(question='q', solution=gold, answer=160, level=1, steps=2, gold=gold, prompt='q')
  cases = {
    '[1] 4*10=40\n[2] 40*4=150\nThe answer is 150': gold,
    'garbage': gold,
    '[1] 4*10=40\n[2] 40*4=160\nThe answer is 16': gold,  # steps kept, answer fixed
    '[1] 4*10 = 40\n[2] 1+1=2': '[1] 4*10 = 40\n[2] 40*4=160\nThe answer is 160',
    '[1] 10*4=40\n[2] 4*4=16': '[1] 10*4=40\n[2] 40*4=160\nThe answer is 160',
  }
  samples = [
    dict(
      problem,
      index=i,
      completion=text,
      completion_tokens=sequences.completion_ids(TOK, text),
      logprobs=np.zeros(0),
      correct=False,
    )
    for i, text in enumerate(cases)
  ]
  records, stats = rlmec_stages.minimal_edit_records(samples, TOK)
  assert stats['wrong'] == len(cases)
  for record, rewrite in zip(records, cases.values()):
    np.testing.assert_array_equal(record['rewrite_tokens'], sequences.completion_ids(TOK, rewrite))


def test_rlmec_features_of_wrong_and_correct_samples():
  prompt = np.array([1, 50, 51], np.int32)
  sample = np.array([10, 11, 12, 13, 2], np.int32)
  rewrite = np.array([10, 11, 14, 13, 2], np.int32)  # one substituted token
  logps = -np.arange(1, 6, dtype=np.float32)
  keep = rlmec_stages.keep_probs_from_alignment(sample, rewrite)
  np.testing.assert_array_equal(keep, [1, 1, 0, 1, 1])
  ex = rlmec_lib.rlmec_example(prompt, sample, logps, rewrite, keep, False, seq_len=12, pad_id=0)
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
  ones = np.ones(5)
  ex = rlmec_lib.rlmec_example(prompt, sample, logps, sample, ones, True, seq_len=12, pad_id=0)
  np.testing.assert_allclose(ex['rewards'][m], 0.5)
  np.testing.assert_allclose(ex['imitation_weights'][ex['rewrite_mask'] > 0], 0.5)
  assert (
    rlmec_lib.rlmec_example(prompt, sample, logps, sample, ones, True, seq_len=7, pad_id=0) is None
  )
  # Graded keep-probabilities (a reward model's): r = clip(p - 0.5, -0.1, 0) on a wrong sample.
  ex = rlmec_lib.rlmec_example(
    prompt, sample, logps, rewrite, [0.9, 0.45, 0.1, 0.5, 1.0], False, seq_len=12, pad_id=0
  )
  np.testing.assert_allclose(ex['rewards'][m], [0, -0.05, -0.1, 0, 0], atol=1e-6)
  sample, rewrite = np.array([10, 99, 11, 12, 13, 2]), np.array([10, 11, 13, 2])  # two deletions
  keep = rlmec_stages.keep_probs_from_alignment(sample, rewrite)
  ex = rlmec_lib.rlmec_example(
    prompt, sample, -ones[:1].repeat(6), rewrite, keep, False, seq_len=14, pad_id=0
  )
  np.testing.assert_allclose(ex['rewards'][ex['mask'] > 0], [0, -0.1, 0, -0.1, 0, 0])


def test_rlmec_trainer_loss_decreases(tmp_path):
  cfg = config(steps=8, batch_size=4)  # the trainer starts from tiny_policy()'s params
  rs = records(4)
  params = tiny_policy()[1]
  samples = []
  for i, r in enumerate(rs):
    text = wrong(r['solution']) if i % 2 else r['solution']
    tokens = sequences.completion_ids(TOK, text)
    prompt = sequences.prompt_ids(TOK, r['prompt'])
    width = np.zeros((1, 64), np.int32)
    width[0, : len(tokens)] = tokens
    logps = scorer()(
      params,
      np.pad(prompt, (0, 192 - len(prompt)))[None],
      np.array([len(prompt)]),
      width,
      np.array([len(tokens)]),
    )
    sample = sample_record(i, r, text, not i % 2, tokens)
    sample['logprobs'] = np.asarray(logps[0, : len(tokens)]).tolist()
    samples.append(sample)
  recs, stats = rlmec_stages.minimal_edit_records(samples, TOK)
  assert stats == {'samples': 4, 'correct': 2, 'wrong': 2, 'duplicates': 0}
  assert TOK.decode(recs[1]['rewrite_tokens']) == rs[1]['solution']  # the wrong one, corrected
  m = method('rlmec', loss=dict(eps=0.3, lam=1.0))
  examples, _ = m.examples(recs)
  result = train(
    cfg,
    str(tmp_path),
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=m.loss_fn,
    train_dataset=dataset(examples, 4),
  )
  first, last = result.history[0], result.history[-1]
  assert first['ratio_mean'] == pytest.approx(1.0, abs=1e-4)  # old log-probs = the initial policy
  assert last['imitation_loss'] < 0.95 * first['imitation_loss']
  assert last['loss'] < first['loss']


# ----------------------------------------------------------------------------- GRPO


def test_reward_functions_on_hand_made_groups():
  correct = np.array([True, False, False, False])
  np.testing.assert_array_equal(
    grpo_lib.REWARDS['exact_answer'](correct, [10] * 4, 4), [1, 0, 0, 0]
  )
  correct, lengths = np.array([True, True, True, False]), np.array([10, 20, 30, 40])
  rewards = grpo_lib.REWARDS['relative_length'](correct, lengths, 4, l_base=100.0)
  np.testing.assert_allclose(rewards, [1.1, 1.0, 0.9, 0.0], atol=1e-6)  # mean correct length 20
  rewards = grpo_lib.REWARDS['relative_length'](~correct, lengths, 4, l_base=100.0)
  np.testing.assert_allclose(rewards, [0, 0, 0, 1])  # accuracy 1/4 < tau: no length bonus
  with pytest.raises(ValueError, match='grpo reward'):
    method('grpo', reward='bleu')


def grpo(n=2, **kw):
  m = method('grpo', group_size=4, **kw)
  examples, _ = m.examples(records(n))
  return m, examples


def test_grpo_rollouts_old_logps_and_offline_injection():
  model, params = tiny_policy()
  m, examples = grpo(offline_injection=True)
  batch = m.rollout(model, sequences.stack(examples), jax.random.key(3))
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
  assert m.count_tokens(batch) == 8 * (192 + 64)
  short = get_method('grpo')(dataclasses.replace(CTX, max_new_tokens=8), group_size=2)
  long = short.examples(records(1))[0][0]
  assert not long['gold_valid'] and long['gold_length'] == 0  # never a cut gold solution
  m, examples = grpo()
  plain = m.rollout(model, sequences.stack(examples), jax.random.key(3))
  np.testing.assert_array_equal(plain['advantages'], 0)  # all wrong: zero-advantage groups
  np.testing.assert_array_equal(plain['zero_advantage_fraction'], 1)


def test_grpo_loss_options_are_forwarded_and_decrease():
  model, reference = tiny_policy()
  m, examples = grpo(offline_injection=True, loss=dict(kl_coef=0.01, clip_eps=0.2))
  assert m.needs_reference and m.frozen_reference
  batch = m.rollout(model, sequences.stack(examples), jax.random.key(0))
  graphdef = nnx.graphdef(model)
  value = jax.jit(lambda p: m.loss_fn(nnx.merge(graphdef, p), batch, None, reference)[0])
  params = reference
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  first = value(params)
  grad = jax.jit(jax.grad(lambda p: value(p)))
  for _ in range(5):
    updates, opt = tx.update(grad(params), opt, params)
    params = optax.apply_updates(params, updates)
  assert float(value(params)) < float(first) - 0.1
  bad, _ = grpo(loss=dict(no_such_option=1.0))
  with pytest.raises(TypeError, match='no_such_option'):
    bad.loss_fn(model, batch, None)


class CrashAt:
  """A rollout hook that fails on its `at`-th call (a crash mid-run)."""

  def __init__(self, hook, at):
    self.hook, self.at, self.calls = hook, at, 0

  def __call__(self, *args):
    self.calls += 1
    if self.calls == self.at:
      raise RuntimeError('simulated crash')
    return self.hook(*args)


def test_grpo_trainer_resume_replays_the_same_rollouts(tmp_path):
  cfg = config(steps=4, batch_size=2, checkpoint_every=2)

  def run(workdir, crash_at=0):
    m, examples = grpo(4, offline_injection=True)
    return train(
      cfg,
      str(workdir),
      model_factory=lm_task.model_factory(cfg.model),
      loss_fn=m.loss_fn,
      train_dataset=dataset(examples, 2),
      prepare_batch=CrashAt(m.rollout, crash_at) if crash_at else m.rollout,
      count_tokens=m.count_tokens,
    )

  straight = run(tmp_path / 'a')
  with pytest.raises(RuntimeError, match='simulated crash'):
    run(tmp_path / 'b', crash_at=3)
  resumed = run(tmp_path / 'b')
  assert resumed.step == straight.step == 4
  assert resumed.history[-1]['injected'] > 0 and straight.history[-1]['grad_norm'] > 0
  assert straight.history[-1]['tokens_per_s'] > 0  # counted from prompts and completions
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), straight.params, resumed.params)
  assert straight.history[-1]['loss'] == resumed.history[-1]['loss']


# ----------------------------------------------------------------------------- evaluation


def test_accuracy_by_group_on_hand_made_results():
  acc = task_accuracy.accuracy_by_group([True, False, True, False], [1, 1, 2, 3], 'level')
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
  with pytest.raises(ValueError, match='3 results for 4 records'):
    task_accuracy.accuracy_by_group([True] * 3, [1] * 4)
  summary = task_accuracy.summarise_seeds(
    [{'accuracy': 0.5, 'count': 4}, {'accuracy': 1.0, 'count': 4}]
  )
  assert summary['accuracy'] == 0.75 and summary['num_seeds'] == 2
  assert summary['accuracy/std'] == pytest.approx(np.std([0.5, 1.0], ddof=1))
  assert (summary['accuracy/min'], summary['accuracy/max']) == (0.5, 1.0)
  task = tasks.get_task('kj_arith')
  rs = records(2)
  texts = [f'The answer is {rs[0]["answer"]}', 'The answer is']
  samples = [sampling.Sample(i, np.zeros(0), np.zeros(0), t) for i, t in enumerate(texts)]
  evaluator = task_accuracy.TaskAccuracyEvaluator(task, rs, TOK)
  assert evaluator.score(samples)['accuracy/level_1'] == 1.0
  # 4 problems over 3 runs: always, never, 1 of 3, 2 of 3 solved.
  runs = [[1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 0, 0]]
  assert task_accuracy.multi_run(runs) == {
    'runs/solved_any': 0.75,
    'runs/solved_all': 0.25,
    'runs/uncertain': 0.5,
  }


def test_sampled_evaluation_is_reproducible_per_seed():
  model, _ = tiny_policy()
  prompts = [r['prompt'] for r in records(3)]
  opts = dict(max_new_tokens=16, prompt_len=192, batch_size=2)
  a = sampling.sample_completions(model, TOK, prompts, num_samples=2, seed=1, **opts)
  b = sampling.sample_completions(model, TOK, prompts, num_samples=2, seed=1, **opts)
  c = sampling.sample_completions(model, TOK, prompts, num_samples=2, seed=2, **opts)
  assert [s.index for s in a] == [0, 0, 1, 1, 2, 2]
  assert [s.text for s in a] == [s.text for s in b] != [s.text for s in c]
  assert all(len(s.tokens) == len(s.logprobs) <= 16 for s in a)
  evaluator = task_accuracy.TaskAccuracyEvaluator(
    tasks.get_task('kj_arith'), records(3), TOK, seeds=(0, 1), temperature=1.0, **opts
  )
  result = evaluator(model)
  assert result['num_seeds'] == 2 and result['accuracy'] == 0.0
  assert result['runs/solved_any'] == result['runs/uncertain'] == 0.0
  assert result['greedy/accuracy'] == 0.0 and 'accuracy/level_1/std' in result


def test_in_memory_dataset_checks():
  with pytest.raises(ValueError, match='empty'):
    sequences.in_memory_dataset([], batch_size=2, seed=0)
  it = iter(dataset([{'x': np.int32(i)} for i in range(5)], 2))
  assert isinstance(it, grain.DatasetIterator) and next(it)['x'].shape == (2,)
  assert jnp.asarray(next(it)['x']).dtype == jnp.int32
  with pytest.raises(ValueError, match='process_index=2 not in'):
    sequences.in_memory_dataset([{'x': 1}], batch_size=1, seed=0, process_index=2, process_count=2)


def test_in_memory_dataset_processes_split_the_single_process_batches():
  """3 processes of 2 rows see exactly the batches of 1 process of 6, at one shared position."""
  examples = [{'x': np.int32(i)} for i in range(7)]
  one = iter(sequences.in_memory_dataset(examples, batch_size=6, seed=4))
  parts = [
    iter(
      sequences.in_memory_dataset(examples, batch_size=2, seed=4, process_index=p, process_count=3)
    )
    for p in range(3)
  ]
  for _ in range(5):  # crosses epochs (7 examples, 6 rows a step)
    np.testing.assert_array_equal(next(one)['x'], np.concatenate([next(p)['x'] for p in parts]))
  saved = [p.checkpoint_states() for p in parts]
  assert saved[1] == saved[2] == {} and saved[0] == {'position': one.get_state()}
  resumed = iter(
    sequences.in_memory_dataset(examples, batch_size=3, seed=4, process_index=1, process_count=2)
  )
  resumed.restore_states(saved[0].__getitem__)  # the same run resumed on 2 processes of 3 rows
  np.testing.assert_array_equal(next(resumed)['x'], next(one)['x'][3:])
