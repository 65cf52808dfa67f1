"""The stage pipeline: ordering from declared refs, model roles, seeds, stage data sets, custom
stage types, kill-and-resume.

`python -m tests.stages_test WORKDIR` runs `kill_config()`'s pipeline into WORKDIR: the process
the kill test SIGKILLs.
"""

import os
import shutil
import sys
import zlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kuaijax.config_lib import lm_model, load_config
from kuaijax.data import records as records_lib
from kuaijax.evals.registry import register_evaluator
from kuaijax.methods import register_method
from kuaijax.methods.sft import SFT
from kuaijax.stages import report, roles, runner
from kuaijax.stages.base import register_stage_type, stage_seed
from kuaijax.train import checkpoint as ckpt_lib
from tests import sigkill
from tests.conftest import REPO_ROOT

CD = ml_collections.ConfigDict
CALLS = {'take': 0, 'rollouts': 0}


@register_stage_type('test_take', refs=('data',))
def _take(stage):
  """A custom non-training stage: the first `count` task records with the answer in the prompt."""
  CALLS['take'] += 1
  records = stage.records(stage.block.data)[: stage.block.count]
  stage.write_data([{**r, 'prompt': r['prompt'] + '#'} for r in records])
  return {'records': len(records)}


@register_method('test_counting_sft')
class CountingSFT(SFT):
  """SFT that counts the batches it trains on in this process (`CALLS['rollouts']`)."""

  def rollout(self, model, batch, rng):
    CALLS['rollouts'] += 1
    return batch


def tiny_config(stages: str):
  config = load_config(os.path.join(REPO_ROOT, 'configs/arith/posttrain.py') + ':runlocal')
  config.unlock()
  config.stages = stages
  config.parallel.num_devices = 1
  config.train.update(progress=False, async_checkpoint=False)
  config.models.policy.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  config.data.update(limit=16, seq_len=256, max_new_tokens=16)
  config.evals = CD()
  train = dict(steps=4, batch_size=2, log_every=1, checkpoint_every=2, eval_every=4)
  config.stage.sft.train.update(train)
  config.stage.samples.update(limit=2, num_samples=2, batch_size=2)
  config.stage.take = CD(dict(type='test_take', data='task:train', count=3))
  config.stage.ft = CD(config.stage.sft.to_dict())
  config.stage.ft.update(method='test_counting_sft', data='samples', init_from='sft')
  config.lock()
  return config


def test_stage_order_adds_dependencies_and_refuses_cycles():
  config = tiny_config('dpo+grpo')
  assert runner.stage_order(config) == ['sft', 'samples', 'pairs', 'dpo', 'grpo']
  config = tiny_config('rlmec,sft')
  assert runner.stage_order(config) == ['sft', 'rlmec_samples', 'rlmec_rewrites', 'rlmec']
  with config.unlocked():
    config.stage.sft.init_from = 'rlmec'
  with pytest.raises(ValueError, match='cycle: rlmec -> sft -> rlmec'):
    runner.stage_order(config)
  with pytest.raises(ValueError, match="stage 'nope'"):
    runner.stage_order(tiny_config('sft+nope'))


def test_seeds_come_from_stage_names():
  assert stage_seed(0, 'sft') == zlib.crc32(b'sft') % 2**31
  assert stage_seed(5, 'sft/data') == (5 + zlib.crc32(b'sft/data')) % 2**31
  assert len({stage_seed(0, n) for n in ('sft', 'dpo', 'grpo', 'sft/data')}) == 4


def test_custom_stage_writes_a_data_set_and_is_not_redone(tmp_path):
  CALLS['take'] = 0
  done = runner.run_pipeline(tiny_config('take'), str(tmp_path))[0]
  assert list(done) == ['take'] and done['take']['summary'] == {'records': 3}
  written = records_lib.read_records(str(tmp_path / 'seed_0' / 'take' / done['take']['data']))
  assert [r['prompt'][-1] for r in written] == ['#'] * 3 and 'answer' in written[0]
  again = runner.run_pipeline(tiny_config('take'), str(tmp_path))[0]
  assert CALLS['take'] == 1 and again['take'] == done['take']
  with pytest.raises(ValueError, match='stage type'):
    bad = tiny_config('take')
    with bad.unlocked():
      bad.stage.take.type = 'nope'
    runner.run_pipeline(bad, str(tmp_path / 'bad'))


FT_STEPS = 16


def kill_config():
  """sft -> samples -> ft; ft trains 16 steps, each logged, a checkpoint every 2 written in the
  background (as real runs do)."""
  config = tiny_config('ft')
  with config.unlocked():
    config.stage.ft.train.update(steps=FT_STEPS, eval_every=FT_STEPS, async_checkpoint=True)
  return config


def test_pipeline_sigkilled_in_stage_3_resumes_there(tmp_path):
  """sft -> samples -> ft as its own process (sft and samples finished already), SIGKILLed at a
  random point of ft (mid-step, or while a checkpoint is being written), then re-run with the same
  config: sft and samples are not redone (their files untouched), ft continues from its last
  finished checkpoint, and the pipeline ends with the metrics, evaluation and parameters of an
  uninterrupted run, bit for bit."""
  CALLS.update(rollouts=0)
  straight = runner.run_pipeline(kill_config(), str(tmp_path / 'a'))[0]
  assert list(straight) == ['sft', 'samples', 'ft']
  samples = records_lib.read_records(str(tmp_path / 'a' / 'seed_0' / 'samples' / 'data.jsonl'))
  assert len(samples) == straight['samples']['summary']['samples'] == 4
  assert {'completion_tokens', 'logprobs', 'correct', 'index', 'gold'} <= set(samples[0])
  # The same finished first two stages, then a run killed in ft.
  work = tmp_path / 'b'
  for name in ('sft', 'samples'):
    shutil.copytree(tmp_path / 'a' / 'seed_0' / name, work / 'seed_0' / name)
  stamps = {name: sigkill.file_stamps(work / 'seed_0' / name) for name in ('sft', 'samples')}
  ft = work / 'seed_0' / 'ft'
  point = sigkill.draw_kill_point(
    logged=list(range(1, 9)), checkpointing=[2, 4, 6, 8], max_delay=0.05
  )
  kill = sigkill.kill_at(point, sigkill.python('tests.stages_test', work), ft, env=dict(os.environ))
  assert kill.killed and not (ft / 'stage.json').exists(), kill
  latest = max(sigkill.checkpoint_folders(ft)[0], default=0)  # the last finished checkpoint
  CALLS.update(rollouts=0)
  resumed = runner.run_pipeline(kill_config(), str(work))[0]
  assert CALLS['rollouts'] == FT_STEPS - latest  # ft's steps after its last checkpoint only
  assert {n: sigkill.file_stamps(work / 'seed_0' / n) for n in stamps} == stamps
  summaries = [dict(info['ft']['summary']) for info in (straight, resumed)]
  for summary in summaries:  # wall-clock speed aside
    summary['last_train_metrics'].pop('tokens_per_s')
  assert summaries[0] == summaries[1]
  outcome = sigkill.stage_outcome(ft)
  assert [r['step'] for r in outcome[0] if 'loss' in r] == list(range(1, FT_STEPS + 1))
  assert outcome == sigkill.stage_outcome(tmp_path / 'a' / 'seed_0' / 'ft')
  (step_a, params_a), (step_b, params_b) = latest_params(tmp_path / 'a'), latest_params(work)
  assert step_a == step_b == FT_STEPS
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def latest_params(workdir):
  """(latest step, params) of the ft stage's checkpoints, as saved."""
  ckpt = ckpt_lib.Checkpointer(str(workdir / 'seed_0' / 'ft' / 'checkpoints'), keep=9, save_every=1)
  step = ckpt.latest_step()
  params = ckpt.restore(step)['params']
  ckpt.close()
  return step, params


# ----------------------------------------------------------------------------- refs and roles


@register_stage_type('test_score', refs=('data', 'scorer'))
def _score(stage):
  """A stage type with a ref field the pipeline has never seen (`scorer`): the mean next-token
  log-prob of each sample's completion under the scorer model."""
  graphdef, params = stage.load_model(stage.block.scorer)
  model = nnx.merge(graphdef, params)
  out = []
  for r in stage.records(stage.block.data):
    tokens = np.asarray(r['completion_tokens'], np.int32)[None]
    logits, _ = model(jnp.asarray(tokens))
    logps = jax.nn.log_softmax(logits[0, :-1].astype(jnp.float32))
    out.append({**r, 'score': float(jnp.take_along_axis(logps, tokens[0, 1:, None], 1).mean())})
  stage.write_data(out)
  return {'scored': len(out), 'layers': len(model.layers)}


def roles_config():
  """A 4-layer policy and a 2-layer, narrower scorer trained as its own role."""
  config = tiny_config('score')
  with config.unlocked():
    config.models.policy.update(num_layers=4)
    config.models.scorer = lm_model(
      vocab_size=384,
      d_model=16,
      num_layers=2,
      num_heads=2,
      num_kv_heads=1,
      d_ff=32,
      dtype='float32',
    )
    config.stage.scorer_sft = CD(config.stage.sft.to_dict())
    config.stage.scorer_sft.update(model='scorer')
    config.stage.score = CD(dict(type='test_score', data='samples', scorer='scorer_sft'))
  return config


def test_new_stage_type_with_new_ref_and_a_smaller_model_role(tmp_path):
  config = roles_config()
  assert runner.stage_order(config) == ['sft', 'samples', 'scorer_sft', 'score']
  done = runner.run_pipeline(config, str(tmp_path))[0]
  assert done['sft']['model'] == 'policy' and done['scorer_sft']['model'] == 'scorer'
  assert done['score']['summary'] == {'scored': 4, 'layers': 2}
  # The scorer's checkpoint holds the 2-layer, width-16 model; the policy's the 4-layer one.
  scorer = ckpt_lib.load_params(
    str(tmp_path / 'seed_0' / 'scorer_sft'),
    *_abstract(config, 'scorer'),
  )[0]
  assert len(scorer['layers']) == 2 and scorer['embed']['embedding'].shape == (384, 16)
  policy_ckpt = tmp_path / 'seed_0' / 'sft'
  assert len(ckpt_lib.load_params(str(policy_ckpt), *_abstract(config, 'policy'))[0]['layers']) == 4
  # Scores recomputed here from the scorer's checkpoint.
  graphdef = roles.layout(config, 'scorer').graphdef
  model = nnx.merge(graphdef, scorer)
  scored = records_lib.read_records(str(tmp_path / 'seed_0' / 'score' / 'data.jsonl'))
  for r in scored:
    tokens = np.asarray(r['completion_tokens'], np.int32)
    logits = np.asarray(model(jnp.asarray(tokens[None]))[0][0], np.float64)
    logps = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))[:, None]
    logps -= logits.max(-1)[:, None]
    expected = np.mean([logps[t, tokens[t + 1]] for t in range(len(tokens) - 1)])
    np.testing.assert_allclose(r['score'], expected, rtol=1e-5, atol=1e-5)


def _abstract(config, role):
  lay = roles.layout(config, role)
  return lay.abstract_params, lay.shardings


def test_unknown_role_and_ref_cycles_are_named(tmp_path):
  config = roles_config()
  with config.unlocked():
    config.stage.scorer_sft.model = 'critic'
  with pytest.raises(ValueError, match="model role 'critic' is not in config.models"):
    runner.run_pipeline(config, str(tmp_path))
  config = roles_config()
  with config.unlocked():
    config.stage.sft.init_from = 'score'
  with pytest.raises(ValueError, match='cycle: score -> samples -> sft -> score'):
    runner.stage_order(config)


# ----------------------------------------------------------------------------- seeds

SEED_CALLS = {'const': 0}


@register_stage_type('test_const', seeded=False)
def _const(stage):
  """A seed-free data stage: the same records whatever the seed."""
  SEED_CALLS['const'] += 1
  stage.write_data([{'prompt': str(i), 'completion': str(i)} for i in range(3)])
  return {'seed_free': stage.pipeline_seed is None}


@register_stage_type('test_seed_echo', refs=('data',))
def _seed_echo(stage):
  stage.write_data([{'seed': stage.seed(), 'n': len(stage.records(stage.block.data))}])
  return {'pipeline_seed': stage.pipeline_seed}


def test_seed_free_stages_run_once_and_seeded_stages_per_seed(tmp_path):
  config = tiny_config('echo')
  with config.unlocked():
    config.seeds = (3, 7)
    config.stage.const = CD(dict(type='test_const'))
    config.stage.echo = CD(dict(type='test_seed_echo', data='const'))
  SEED_CALLS['const'] = 0
  runs = runner.run_pipeline(config, str(tmp_path))
  assert list(runs) == [3, 7] and SEED_CALLS['const'] == 1
  assert runs[3]['const']['dir'] == runs[7]['const']['dir'] == str(tmp_path / 'shared' / 'const')
  assert runs[3]['const']['summary'] == {'seed_free': True}
  echoes = {
    s: records_lib.read_records(str(tmp_path / f'seed_{s}' / 'echo' / 'data.jsonl'))[0]
    for s in (3, 7)
  }
  assert echoes[3] == {'seed': stage_seed(3, 'echo'), 'n': 3}
  assert echoes[7] == {'seed': stage_seed(7, 'echo'), 'n': 3}
  assert [runs[s]['echo']['summary']['pipeline_seed'] for s in (3, 7)] == [3, 7]
  assert report.seeds_record(config) == {'training': [3, 7], 'sampling': []}
  again = runner.run_pipeline(config, str(tmp_path))
  assert SEED_CALLS['const'] == 1 and again[7]['echo']['summary'] == runs[7]['echo']['summary']
  with config.unlocked():
    config.seeds = (1, 1)
  with pytest.raises(ValueError, match='distinct ints'):
    runner.run_pipeline(config, str(tmp_path / 'bad'))


def test_shared_seed_runs_a_seeded_stage_once_with_that_seed(tmp_path):
  """`shared_seed: 5` runs a seeded stage once (pipeline seed 5, in shared/), and every training
  seed's later stages read it; a shared stage over per-seed refs is refused by name."""
  config = tiny_config('after')
  with config.unlocked():
    config.seeds = (3, 7)
    config.stage.const = CD(dict(type='test_const'))
    config.stage.first = CD(dict(type='test_seed_echo', data='const', shared_seed=5))
    config.stage.after = CD(dict(type='test_seed_echo', data='first'))
  runs = runner.run_pipeline(config, str(tmp_path))
  first = str(tmp_path / 'shared' / 'first')
  assert runs[3]['first']['dir'] == runs[7]['first']['dir'] == first
  assert runs[3]['first']['summary'] == {'pipeline_seed': 5}
  assert records_lib.read_records(first + '/data.jsonl') == [
    {'seed': stage_seed(5, 'first'), 'n': 3}
  ]
  assert [runs[s]['after']['summary']['pipeline_seed'] for s in (3, 7)] == [3, 7]
  assert not (tmp_path / 'seed_3' / 'first').exists()
  with config.unlocked():
    config.stage.first.update(shared_seed=None)
    config.stage.after.update(shared_seed=0)
  with pytest.raises(ValueError, match=r"stage.after.shared_seed: .* per-seed stages \['first'\]"):
    runner.run_pipeline(config, str(tmp_path / 'bad'))


# ----------------------------------------------------------------------------- imported models


@pytest.fixture(scope='module')
def hf_folder(tmp_path_factory):
  from kuaijax.hf import model_io
  from kuaijax.models.transformer import TransformerConfig
  from tests.hf.model_io_errors_test import _params, random_model

  cfg = TransformerConfig(
    vocab_size=384, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, mlp='swiglu'
  )
  model = random_model(cfg, seed=3)
  folder = str(tmp_path_factory.mktemp('llama'))
  model_io.save_model(model, folder, family='llama')
  return folder, _params(model)


def test_evaluation_only_pipeline_on_an_imported_model(hf_folder, tmp_path):
  """A params stage of an imported role is evaluated as it is; a train stage starts from it."""
  folder, params = hf_folder
  config = tiny_config('ft0')
  with config.unlocked():
    config.models.policy = CD(dict(hf=folder))
    config.stage.base = CD(dict(type='params', model='policy'))
    config.stage.ft0 = CD(config.stage.sft.to_dict())
    config.stage.ft0.update(init_from='base')
    config.stage.ft0.train.update(steps=2, checkpoint_every=2, eval_every=2)
    # lr 1e-12: the params stay the import's to ~1e-12 (from scratch: init std 0.02, not 0.05)
    config.stage.ft0.optimizer.update(lr=1e-12, warmup_steps=0, weight_decay=0.0)
    config.evals = CD(dict(lm=dict(type='test_param_norm')))
  done = runner.run_pipeline(config, str(tmp_path))[0]
  assert done['base']['params_format'] == 'hf' and done['base']['params'] == folder
  expected = float(sum(np.sum(np.square(x, dtype=np.float64)) for x in jax.tree.leaves(params)))
  np.testing.assert_allclose(done['base']['eval']['param_sq'], expected, rtol=1e-5)
  np.testing.assert_allclose(done['ft0']['eval']['param_sq'], expected, rtol=1e-5)
  graphdef, loaded = roles.load(config, roles.ParamsSource(folder, 'policy', 'hf'))
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)


class _ParamNorm:
  """A test evaluator: the sum of squares of every parameter."""

  def evaluate(self, graphdef, params, step=0):
    del graphdef, step
    return {'param_sq': float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(params)))}


@register_evaluator('test_param_norm')
def _param_norm(options, ctx):
  del options, ctx
  return _ParamNorm()


if __name__ == '__main__':
  runner.run_pipeline(kill_config(), sys.argv[1])
