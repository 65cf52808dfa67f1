"""A LoRA training stage end to end on the stage pipeline: full SFT -> LoRA SFT (role
`policy_lora`: adapters on the SFT policy) -> samples of the merged LoRA policy -> pairs -> LoRA
DPO whose reference is the base (the adapters switched off), and a full fine-tuning stage started
from the merged LoRA policy. Checks: the LoRA stages' checkpoints hold only the adapters, their
recorded parameters are `<stage>/merged` = base + scale A B (`builtin.record_params`), later stages
read that plain model, the LoRA DPO starts at log 2 against its base, a reference other than the
base is refused (`builtin.check_lora_reference`), and a re-run redoes nothing."""

import math
import os

import jax
import ml_collections
import numpy as np
import pytest

from kuaijax.config_lib import load_config
from kuaijax.models.lora import LoRAConfig
from kuaijax.stages import builtin, roles, runner
from kuaijax.stages.base import params_of
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train.metrics import read_metrics
from tests import sigkill
from tests.conftest import REPO_ROOT

CD = ml_collections.ConfigDict
LORA = dict(rank=4, alpha=8.0, targets=('wq', 'wv', 'w2'))
STAGES = ('sft', 'lsft', 'samples', 'pairs', 'ldpo', 'ft')


def lora_pipeline_config(stages: str = 'ldpo,ft'):
  config = load_config(os.path.join(REPO_ROOT, 'configs/arith/posttrain.py') + ':runlocal')
  config.unlock()
  config.stages = stages
  config.parallel.num_devices = 1
  config.train.update(progress=False, async_checkpoint=False)
  config.models.policy.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  config.models.policy_lora = CD({**config.models.policy.to_dict(), 'lora': LORA})
  config.data.update(limit=16, seq_len=256, max_new_tokens=16)
  config.evals = CD()
  s = config.stage
  s.sft.train.update(steps=4, batch_size=2, log_every=1, checkpoint_every=2, eval_every=4)
  s.lsft = CD(s.sft.to_dict())
  s.lsft.update(label='SFT (LoRA)', model='policy_lora', init_from='sft')
  s.lsft.optimizer.update(lr=3e-2, warmup_steps=1)
  s.samples.update(policy='lsft', limit=2, num_samples=2, batch_size=2)
  s.pairs.gold_fallback = True
  s.ldpo = CD(s.dpo.to_dict())
  s.ldpo.update(model='policy_lora', init_from='sft', reference='sft')
  s.ldpo.options.reference = 'model'  # the frozen reference: the base without the adapters
  s.ldpo.train.update(steps=2, batch_size=2, log_every=1, checkpoint_every=2, eval_every=2)
  s.ft = CD(s.sft.to_dict())
  s.ft.update(label='SFT from LoRA', init_from='lsft')
  s.ft.train.update(steps=2, checkpoint_every=2, eval_every=2)
  config.lock()
  return config


def flat(tree) -> dict:
  """{path of string keys: array} (restored checkpoints give integer keys back as strings)."""
  key = lambda k: str(getattr(k, 'key', getattr(k, 'idx', k)))
  return {tuple(map(key, p)): np.asarray(v) for p, v in jax.tree.leaves_with_path(tree)}


def load(config, path, role='policy'):
  lay = roles.layout(config, role)
  return flat(ckpt_lib.load_params(str(path), lay.abstract_params, lay.shardings)[0])


def saved_params(stage_dir) -> dict:
  ckpt = ckpt_lib.Checkpointer(str(stage_dir / 'checkpoints'), keep=9, save_every=1)
  params = ckpt.restore(ckpt.latest_step())['params']
  ckpt.close()
  return flat(params)


def expected_merge(base: dict, adapters: dict, scale: float) -> dict:
  """base with W + scale A B for every adapter (path ..., 'wq_lora', 'a' / 'b') of a dense weight."""
  out = dict(base)
  for path in adapters:
    if path[-1] != 'a':
      continue
    weight = (*path[:-2], path[-2].removesuffix('_lora'))
    a, b = adapters[path].astype(np.float64), adapters[(*path[:-1], 'b')].astype(np.float64)
    delta = np.tensordot(a, b, axes=1).reshape(base[weight].shape)
    out[weight] = base[weight] + scale * delta
  return out


@pytest.fixture(scope='module')
def pipeline(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('lora_pipeline')
  config = lora_pipeline_config()
  assert runner.stage_order(config) == list(STAGES)
  return config, workdir, runner.run_pipeline(config, str(workdir))[0]


def test_lora_stages_record_the_merged_model(pipeline):
  config, workdir, done = pipeline
  assert list(done) == list(STAGES)
  runs = workdir / 'seed_0'
  scale = LoRAConfig(**LORA).scale
  sft = load(config, runs / 'sft')
  for name in ('lsft', 'ldpo'):
    merged_dir = runs / name / builtin.MERGED_DIR
    assert done[name]['model'] == 'policy_lora'
    source = params_of(done[name])  # (recorded relative to the stage's folder)
    assert os.path.normpath(source.path) == os.path.normpath(str(merged_dir))
    adapters = saved_params(runs / name)  # the checkpoint: the adapters alone
    assert adapters and all(any(k.endswith('_lora') for k in p) for p in adapters)
    assert {p[-2] for p in adapters} == {'wq_lora', 'wv_lora', 'w2_lora'}
    merged = load(config, merged_dir)  # a plain model of the base architecture
    assert set(merged) == set(sft)
    expected = expected_merge(sft, adapters, scale)
    for path, value in merged.items():
      np.testing.assert_allclose(value, expected[path], rtol=1e-5, atol=1e-6, err_msg=str(path))
      if path[-1] in ('wq', 'wv', 'w2') and name == 'lsft':  # trained: B moved off zero
        assert np.abs(value - sft[path]).max() > 1e-4, path
      elif path[-1] not in ('wq', 'wv', 'w2'):
        np.testing.assert_array_equal(value, sft[path])  # frozen, not adapted


def test_later_stages_read_the_merged_policy(pipeline):
  config, workdir, done = pipeline
  runs = workdir / 'seed_0'
  assert done['samples']['summary']['samples'] == 4
  assert done['ft']['model'] == 'policy' and done['ft']['summary']['steps'] == 2
  # ft started from lsft's merged model: its loss at step 1 is that model's loss, not SFT's.
  first = lambda name: next(r['loss'] for r in read_metrics(str(runs / name)) if 'loss' in r)
  lsft_last = [r['loss'] for r in read_metrics(str(runs / 'lsft')) if 'loss' in r]
  assert len(lsft_last) == 4 and lsft_last[-1] < lsft_last[0]
  assert first('ft') < first('lsft')


def test_lora_dpo_starts_at_log_2_against_its_base(pipeline):
  _, workdir, done = pipeline
  losses = [r['loss'] for r in read_metrics(str(workdir / 'seed_0' / 'ldpo')) if 'loss' in r]
  assert done['pairs']['summary']['pairs'] > 0 and len(losses) == 2
  assert losses[0] == pytest.approx(math.log(2), abs=1e-5)


def test_a_reference_other_than_the_base_is_refused(pipeline):
  _, workdir, _ = pipeline
  config = lora_pipeline_config('bad')
  with config.unlocked():
    config.stage.bad = CD(config.stage.ldpo.to_dict())
    config.stage.bad.reference = 'lsft'
  with pytest.raises(ValueError, match='trains LoRA adapters, whose reference is their base'):
    runner.run_pipeline(config, str(workdir))


def test_rerun_redoes_nothing(pipeline):
  config, workdir, done = pipeline
  stamps = {n: sigkill.file_stamps(workdir / 'seed_0' / n) for n in STAGES}
  again = runner.run_pipeline(config, str(workdir))[0]
  assert again == done
  assert {n: sigkill.file_stamps(workdir / 'seed_0' / n) for n in STAGES} == stamps
