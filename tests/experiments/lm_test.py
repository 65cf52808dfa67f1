"""The main job end to end: the lm experiment (a one-stage pipeline: stage 'lm' in
<workdir>/seed_<s>/lm/), training seeds, SIGKILL resume through main.py, config errors."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kuaijax.main import run_experiment
from kuaijax.train.metrics import read_metrics
from tests import sigkill
from tests.colab_test import PNG_MAGIC
from tests.conftest import REPO_ROOT, tiny_lm_pipeline_config

TINY_FLAGS = [
  '--config.parallel.num_devices=1',
  '--config.data.seq_len=128',
  '--config.data.eval_batch_size=16',
  '--config.data.eval_batches=4',
  '--config.models.policy.d_model=32',
  '--config.models.policy.num_layers=2',
  '--config.models.policy.num_heads=2',
  '--config.models.policy.num_kv_heads=1',
  '--config.models.policy.d_ff=64',
  '--config.train.batch_size=4',
  '--config.train.log_every=2',
  '--config.train.eval_every=10',
  '--config.train.checkpoint_every=2',
  '--config.train.progress=False',
  '--config.eval.unigram_max_examples=200',
]


def main_command(workdir, *extra):
  return [
    sys.executable,
    '-m',
    'kuaijax.main',
    '--config=configs/lm/mixture.py:runlocal',
    f'--workdir={workdir}',
    *TINY_FLAGS,
    *extra,
  ]


def test_lm_experiment_writes_table_and_results(tmp_path):
  results = run_experiment(tiny_lm_pipeline_config(), str(tmp_path))
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['step'] == 8 and results['step'] == 8
  assert saved['seeds'] == {'training': [0], 'sampling': []}
  stage = json.loads((tmp_path / 'seed_0' / 'lm' / 'stage.json').read_text())
  assert stage['type'] == 'pretrain' and stage['model'] == 'policy' and stage['params'] == '.'
  assert saved['model'] == stage['eval'] and saved['model_std'] == {}
  assert (
    saved['num_params']
    == stage['summary']['params']['total']
    == _param_count(tiny_lm_pipeline_config().models.policy)
  )
  table = (tmp_path / 'results.md').read_text()
  assert '1 training seed' in table and '±' not in table
  tasks = ('code', 'arith', 'copy', 'recall')
  for side in ('model', 'unigram'):
    # The per-task losses split the overall one: their token-weighted mean is the loss.
    tokens = [saved[side][f'tokens/{task}'] for task in tasks]
    weighted = sum(saved[side][f'loss/{task}'] * n for task, n in zip(tasks, tokens)) / sum(tokens)
    assert min(tokens) > 0 and weighted == pytest.approx(saved[side]['loss'], rel=1e-5)
  for task in tasks:
    # The model and the unigram baseline are scored on the same evaluation tokens.
    assert saved['model'][f'tokens/{task}'] == saved['unigram'][f'tokens/{task}']
    assert f'| {task} |' in table
  assert (tmp_path / 'loss_curves.png').read_bytes().startswith(PNG_MAGIC)


def test_two_training_seeds_give_mean_and_std(tmp_path):
  config = tiny_lm_pipeline_config(steps=2, eval_every=2, checkpoint_every=2)
  config.seeds = (0, 1)
  results = run_experiment(config, str(tmp_path))
  assert results['seeds'] == {'training': [0, 1], 'sampling': []}
  evals = [results['runs'][s]['lm']['eval'] for s in ('0', '1')]
  assert evals[0]['loss'] != evals[1]['loss']  # another init seed and data order
  assert results['model']['loss'] == pytest.approx((evals[0]['loss'] + evals[1]['loss']) / 2)
  assert results['model_std']['loss'] == pytest.approx(
    np.std([evals[0]['loss'], evals[1]['loss']], ddof=1)
  )
  assert results['model']['tokens/code'] == evals[0]['tokens/code']  # the same eval batches
  table = (tmp_path / 'results.md').read_text()
  assert 'mean ± std over 2 training seeds' in table and '| code |' in table and ' ± ' in table
  first = [r['loss'] for r in read_metrics(str(tmp_path / 'seed_0' / 'lm')) if 'loss' in r]
  single = tiny_lm_pipeline_config(steps=2, eval_every=2, checkpoint_every=2)
  run_experiment(single, str(tmp_path / 'single'))
  alone = [
    r['loss'] for r in read_metrics(str(tmp_path / 'single' / 'seed_0' / 'lm')) if 'loss' in r
  ]
  assert first == alone  # seed 0 trains the same whatever other seeds run


def test_sigkill_mid_stage_then_rerun_resumes_exactly(tmp_path):
  """A real SIGKILL of `python -m kuaijax.main` once the 'lm' stage has written checkpoints:
  re-running the command resumes the stage and ends with the losses and evaluation of an
  uninterrupted run, bit for bit."""
  steps = '--config.train.steps=40'
  sigkill.run(main_command(tmp_path / 'straight', steps))
  killed = tmp_path / 'killed'
  sigkill.kill_after_checkpoints(main_command(killed, steps), killed / 'seed_0' / 'lm')
  assert not (killed / 'seed_0' / 'lm' / 'stage.json').exists(), 'finished before the kill'
  assert not (killed / 'results.json').exists()
  sigkill.run(main_command(killed, steps))
  straight = sigkill.stage_outcome(tmp_path / 'straight' / 'seed_0' / 'lm')
  resumed = sigkill.stage_outcome(killed / 'seed_0' / 'lm')
  assert [r['step'] for r in resumed[0] if 'loss' in r] == list(range(2, 41, 2))
  assert straight == resumed  # bit-exact: same floats in every logged record and evaluation
  results = [json.loads((w / 'results.json').read_text()) for w in (tmp_path / 'straight', killed)]
  assert results[0]['model'] == results[1]['model']


@pytest.mark.parametrize(
  'flag, message',
  [
    ('--config.train.stepz=3', 'stepz'),
    ('--config.train.steps=abc', 'steps'),
    ('--config.experiment=nope', "config.experiment='nope' is unknown"),
    ('--config.models.policy.num_kv_heads=3', 'must be a multiple of model.num_kv_heads=3'),
    ('--config.seeds=(0,0)', 'config.seeds=(0, 0) must be distinct ints'),
    ('--config.stages=lm,nope', "stage 'nope' has no block"),
    ('--config.data.tokenizer=chars', 'chars'),
  ],
)
def test_bad_command_line_configs_name_the_field(tmp_path, flag, message):
  out = subprocess.run(
    main_command(tmp_path, '--config.train.steps=2', flag),
    cwd=REPO_ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, 'XLA_FLAGS': ''},
  )
  assert out.returncode != 0
  assert message in out.stderr
  ckpt = tmp_path / 'seed_0' / 'lm' / 'checkpoints'
  assert not ckpt.exists() or not os.listdir(ckpt)


def test_missing_data_dir_for_a_real_corpus_is_named(tmp_path):
  config = tiny_lm_pipeline_config()
  config.data.name = 'c4'
  config.data.data_dir = str(tmp_path / 'nowhere')
  with pytest.raises(FileNotFoundError, match='nowhere'):
    run_experiment(config, str(tmp_path / 'work'))


def _param_shapes(model_config) -> list[tuple[int, ...]]:
  """The parameter shapes of the model of this config section (built abstractly)."""
  import jax
  from flax import nnx

  from kuaijax.models.transformer import Transformer, TransformerConfig

  cfg = TransformerConfig.from_config(model_config)
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  return [p.shape for p in jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))]


def _param_count(model_config) -> int:
  return sum(int(np.prod(shape)) for shape in _param_shapes(model_config))


def _matmul_params(model_config) -> int:
  """Weights that multiply activations: every matrix (attention and MLP kernels; the embedding as
  the tied output head), norms' scales not. For a tied SwiGLU model."""
  assert model_config.get('tie_embeddings', True) and model_config.get('mlp', 'swiglu') == 'swiglu'
  return sum(int(np.prod(shape)) for shape in _param_shapes(model_config) if len(shape) >= 2)


def test_bench_train_utilisation_is_recomputed_from_its_inputs(tmp_path):
  """The benchmark's figures against their definitions: FLOPs per token from the model's parameter
  shapes, tokens per round from the config, tokens/s, utilisation and the ratio to transformers
  from the recorded per-round times (the times themselves are not tested)."""
  from kuaijax.config_lib import load_config

  config = load_config(os.path.join(REPO_ROOT, 'configs/lm/bench_train.py') + ':runlocal')
  config.parallel.num_devices = 1
  results = run_experiment(config, str(tmp_path))
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['utilisation'] == results['utilisation']
  m, b = config.model, config.bench
  seq = config.data.seq_len
  # Per token: 2 FLOPs per weight forward, x3 with the backward pass; attention scores and
  # values: 2 x 2 x seq x heads x head_dim forward per layer, x3 likewise.
  head_dim = m.get('head_dim') or m.d_model // m.num_heads
  flops = 6 * _matmul_params(m) + 12 * m.num_layers * seq * m.num_heads * head_dim
  assert saved['model_flops_per_token'] == flops
  tokens = b.steps_per_round * config.train.batch_size * seq
  assert saved['tokens_per_round'] == tokens
  sides = saved['sides']
  with_torch = importlib.util.find_spec('torch') is not None  # CI's Python 3.12 leg has none
  assert set(sides) == ({'kuaijax', 'transformers'} if with_torch else {'kuaijax'})
  for side in sides.values():
    assert len(side['rounds']) == b.rounds
    assert side['median_s'] == pytest.approx(float(np.median(side['rounds'])), rel=1e-12)
    assert side['tokens_per_s'] == pytest.approx(tokens / side['median_s'], rel=1e-12)
    assert side['utilisation'] == pytest.approx(
      side['tokens_per_s'] * flops / saved['matmul_flops_per_s'], rel=1e-12
    )
    ratios = np.asarray(side['rounds']) / np.asarray(sides['kuaijax']['rounds'])
    assert side['ratio_to_kuaijax']['median'] == pytest.approx(float(np.median(ratios)))
  assert saved['utilisation'] == sides['kuaijax']['utilisation']
  if with_torch:
    assert saved['speedup_vs_transformers'] == sides['transformers']['ratio_to_kuaijax']
  assert f'{saved["utilisation"]:.1%}' in (tmp_path / 'results.md').read_text()


def test_sentencepiece_tokenizer_is_trained_once_per_pipeline(tmp_path):
  config = tiny_lm_pipeline_config(steps=2, eval_every=2, checkpoint_every=2)
  config.data.update(tokenizer='sentencepiece', spm_vocab_size=384, spm_train_examples=300)
  config.seeds = (0, 1)
  results = run_experiment(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'shared')) == ['spm.model', 'spm.vocab']
  assert not list(tmp_path.glob('seed_*/lm/spm.model'))  # not one per stage or seed
  assert results['step'] == 2 and results['model']['loss'] > 0
  config.data.spm_vocab_size = 1000  # larger than models.policy.vocab_size=384
  with pytest.raises(ValueError, match='models.policy.vocab_size=384 is smaller'):
    run_experiment(config, str(tmp_path / 'other'))
