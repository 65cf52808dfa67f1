"""RLMEC end to end on a tiny model: every stage runs, and each stage's output agrees with truths."""

import json
import os

import numpy as np
import pytest

from configs.arith import posttrain
from experiments import rlmec as rlmec_exp
from kuaijax import grm
from kuaijax.config_lib import load_config
from kuaijax.data import minimum_edit, tokenizers
from kuaijax.data import records as records_lib
from kuaijax.losses import rl
from tests.conftest import REPO_ROOT

TOK = tokenizers.ByteTokenizer()


def tiny_config(seeds=(0,)):
  config = load_config(os.path.join(REPO_ROOT, 'configs/rlmec/arith.py') + ':runlocal')
  config.unlock()
  config.seeds = seeds
  config.stages = 'sft,grm_rewrite,rlmec_prog,rlmec'
  # An untrained GRM's rewrites never reach the gold answer (no RLMEC data): score the program
  # teacher's rewrites with the GRM instead; the GRM rewriting stage still runs.
  config.stage.rewards.data = 'teacher'
  config.parallel.num_devices = 1
  config.train.update(progress=False, async_checkpoint=False)
  for role in ('policy', 'grm'):
    config.models[role].update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  config.data.update(limit=16, max_new_tokens=24)
  for name in ('sft', 'grm', 'rlmec', 'rlmec_prog'):
    config.stage[name].train.update(
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, eval_every=2
    )
  config.stage.samples.update(limit=4, num_samples=2, batch_size=4)
  config.stage.grm_samples.update(limit=4, offset=4, num_samples=2, batch_size=4)
  for name in ('grm_rewrite', 'rewards', 'prog_rewards'):
    config.stage[name].batch_size = 8
  config.evals.arith.update(groups=(1, 3), per_group=2, seeds=(0,), batch_size=4)
  config.lock()
  return config


def read(workdir, stage):
  return records_lib.read_records(os.path.join(workdir, 'seed_0', stage, 'data.jsonl'))


@pytest.mark.slow
def test_pipeline_end_to_end(tmp_path):
  config = tiny_config(seeds=(0, 1))
  results = rlmec_exp.run(config, str(tmp_path))
  # every training seed trains its own SFT policy and GRM (the GRM as its own model role)
  runs = results['runs']
  assert [runs[s]['sft']['type'] for s in ('0', '1')] == ['train', 'train']
  assert runs['1']['grm']['model'] == 'grm'
  assert results['seeds'] == {'training': [0, 1], 'sampling': [0]}
  assert {n for n in results['order'] if 'eval' in runs['0'][n]} == {'sft', 'rlmec_prog', 'rlmec'}
  assert set(results['grm_quality']['1']) >= {'locate_accuracy', 'reward_auc'}
  assert os.path.exists(tmp_path / 'results.md') and os.path.exists(tmp_path / 'token_rewards.png')
  samples, teacher = read(tmp_path, 'samples'), read(tmp_path, 'teacher')
  assert len(samples) == len(teacher) == 8
  # teacher: the program teacher's verdict on every sample; correct samples kept as they are
  for s, t in zip(samples, teacher):
    case = minimum_edit.Case(s['question'], s['gold'], str(s['answer']), s['completion'])
    assert minimum_edit.ProgramTeacher().edit(case) == minimum_edit.Edit(
      t['error_step'], t['rewrite'], t['note']
    )
    assert t['reaches_gold']
  # grm_data: 2 examples per wrong sample of the GRM's own samples, plus copies
  grm_teacher, grm_data = read(tmp_path, 'grm_teacher'), read(tmp_path, 'grm_data')
  assert {s['question'] for s in grm_teacher}.isdisjoint(s['question'] for s in samples)
  tasks = [r['task'] for r in grm_data]
  assert (
    tasks.count('locate') == tasks.count('rewrite') == sum(t['error_step'] > 0 for t in grm_teacher)
  )
  wrong = sum(t['error_step'] > 0 for t in teacher)
  # programmatic rewards: keep = alignment matches; rewards by the formula
  for r in read(tmp_path, 'prog_rewards'):
    sample, rewrite = np.asarray(r['completion_tokens']), np.asarray(r['rewrite_tokens'])
    keep = 1.0 - grm.changed_tokens(sample, rewrite)
    np.testing.assert_array_equal(r['keep_probs'], keep)
    expected = np.clip(keep - 0.5, 0, 0.5) if r['correct'] else np.clip(keep - 0.5, -0.1, 0)
    np.testing.assert_allclose(r['rewards'], expected, atol=1e-6)
  # GRM rewriting: every wrong sample judged, quality against the program teacher
  grm_info = json.loads((tmp_path / 'seed_0' / 'grm_rewrite' / 'stage.json').read_text())
  assert grm_info['summary']['quality']['wrong_samples'] == wrong
  assert set(grm_info['summary']['notes']) <= set(minimum_edit.NOTES)
  # GRM rewards: p_t in (0, 1], correct samples once per prompt
  stage_info = json.loads((tmp_path / 'seed_0' / 'rewards' / 'stage.json').read_text())
  used = read(tmp_path, 'rewards')
  assert stage_info['summary']['used'] == len(used)
  keys = [(r['index'], r['completion']) for r in used if r['correct']]
  assert len(keys) == len(set(keys))
  for r in used:
    p = np.asarray(r['keep_probs'])
    assert len(p) == len(r['completion_tokens']) and np.all((p > 0) & (p <= 1))
    np.testing.assert_allclose(
      r['rewards'],
      rl.rlmec_token_rewards(p[None], np.array([r['correct']]), np.ones((1, len(p))))[0],
      atol=1e-6,
    )


def test_reproduction_settings_share_the_sft_policy_and_the_grm_and_equalise_the_rows():
  config = load_config(os.path.join(REPO_ROOT, 'configs/rlmec/arith.py') + ':repro')
  stage = config.stage
  assert config.seeds == (0, 1, 2) and config.reference_row == 'sft_more'
  for name in ('sft', 'grm_samples', 'grm_teacher', 'grm_data', 'grm'):
    assert stage[name].shared_seed == 0, name
  for name in ('samples', 'teacher', 'grm_rewrite', 'rewards', 'rlmec', 'grpo'):
    assert stage[name].get('shared_seed') is None, name
  # the GRM is trained on other problems than the ones it judges
  assert stage.grm_samples.offset >= stage.samples.offset + stage.samples.limit
  # every row: the same updates, sequences per update (GRPO: prompts x group) and learning rate
  budgets = {
    (
      stage[n].train.steps,
      stage[n].train.batch_size * (stage[n].options.group_size if n == 'grpo' else 1),
      stage[n].optimizer.lr,
    )
    for n in ('sft_more', 'rft', 'dpo', 'grpo', 'rlmec_prog', 'rlmec')
  }
  assert len(budgets) == 1
  # the GRPO row is the post-training comparison's block (its loss options are the loss's own)
  reference = posttrain.grpo_stage('exact_answer')
  assert stage.grpo.loss.to_dict() == reference.loss.to_dict()
  assert stage.grpo.options.to_dict() == reference.options.to_dict()
  gpu = load_config(os.path.join(REPO_ROOT, 'configs/rlmec/arith.py') + ':gpu')
  assert gpu.stage.sft.to_dict() == stage.sft.to_dict()
  assert gpu.stage.rlmec.train.steps > stage.rlmec.train.steps
  with pytest.raises(ValueError, match='sft_from'):
    load_config(os.path.join(REPO_ROOT, 'configs/rlmec/arith.py') + ':runlocal,sft_from=/x')
