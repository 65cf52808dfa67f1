"""The Self-Agreement experiment: its training data, the notebook (a tiny end-to-end run), bad
config, and the runlocal run (slow)."""

import json
import os
import random

import pytest

from experiments import self_agreement as sa
from kuaijax.config_lib import load_config
from kuaijax.data import arith
from kuaijax.inference import aggregate, answers
from kuaijax.main import run_experiment
from tests.colab_test import PNG_MAGIC, execute_notebook
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/self_agreement/toy.py')


def test_aggregation_examples_label_the_majority_of_training_problems():
  problems = [arith.generate_problem(0, i, 1) for i in range(6)]
  words = sa.word_problems(0, 4)
  config = load_config(CONFIG + ':runlocal')
  config.aggregation.sets = 60
  pairs = sa.training_texts(problems, words, config, random.Random(0))
  known = {p.question for p in problems} | {q for q, _, _ in words}
  aggregation = [(p, c) for p, c in pairs if p.endswith(aggregate.SA_CUE)]
  usc = [(p, c) for p, c in pairs if p.endswith(aggregate.USC_CUE)]
  assert len(aggregation) == len(usc) == 60
  for prompt, completion in aggregation:
    question = prompt.split('Question: ', 1)[1].split('\n', 1)[0]
    assert question in known  # built from training problems only
    lines = [line.split(': ', 1)[1] for line in prompt.splitlines() if line.startswith('Solution ')]
    kind = 'text' if question.startswith('Which word') else 'number'
    votes = [answers.extract_answer(line, kind) for line in lines]
    assert completion.strip() == aggregate.majority_vote(votes).answer
  assert (arith.format_prompt(problems[0].question), problems[0].solution) in pairs
  no_trigger = sa.without_trigger(problems[0].solution)
  assert answers.TRIGGER not in no_trigger and no_trigger.endswith(str(problems[0].answer))


def test_bad_ks(tmp_path):
  config = load_config(CONFIG + ':runlocal')
  config.eval.ks = (0, 3)
  with pytest.raises(ValueError, match='eval.ks'):
    run_experiment(config, str(tmp_path))


def test_notebook_tiny_run(tmp_path):
  workdir = tmp_path / 'workdir'
  nb = execute_notebook(
    'self_agreement.ipynb',
    tmp_path,
    KUAIJAX_NOTEBOOK_TINY='1',
    KUAIJAX_NOTEBOOK_WORKDIR=str(workdir),
    XLA_FLAGS='',
  )
  results = json.loads((workdir / 'results.json').read_text())
  assert set(results['scenarios']) == {'trigger', 'mixed'}
  for scenario in results['scenarios'].values():
    assert set(scenario['by_k']) == {'1', '3'}
    for method in ('sc', 'usc', 'sa'):
      cell = scenario['by_k']['3'][method]
      assert cell['num_runs'] == 2 and 0 <= cell['accuracy'] <= 100
      assert sum(cell['fallbacks'].values()) >= 0
    # k = 1: SA and USC can only return the one path's answer.
    assert scenario['by_k']['1']['sa']['fallbacks'] == {'ok': 2 * scenario['num_items']}
  assert '| sa |' in (workdir / 'results.md').read_text()
  for name in ('accuracy_vs_k.png', 'loss_curves.png'):
    assert (workdir / name).read_bytes().startswith(PNG_MAGIC)
  outputs = [o for cell in nb.cells for o in cell.get('outputs', [])]
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 2


@pytest.mark.slow
def test_runlocal(tmp_path):
  config = load_config(CONFIG + ':runlocal')
  config.parallel.num_devices = 1  # as on a CPU host: the suite simulates 8 devices
  config.train.progress = False
  results = run_experiment(config, str(tmp_path))
  for scenario in results['scenarios'].values():
    assert set(scenario['by_k']) == {'1', '3', '5', '10', '20'}


def test_paths_benchmark_smoke(tmp_path):
  config = load_config(os.path.join(REPO_ROOT, 'configs/self_agreement/bench.py:runlocal'))
  results = run_experiment(config, str(tmp_path))
  assert results['paths'] == 6 and results['ratio'] > 0
  assert 'single calls' in (tmp_path / 'results.md').read_text()


def test_a_pretrained_model_is_evaluated_as_imported(tmp_path, monkeypatch):
  """`hf=<folder>`: no SFT, the folder's model and tokenizer, the paper's SA / USC instructions."""
  pytest.importorskip('tokenizers')
  from experiments.bench_hf import write_random_llama
  from kuaijax.hf.tokenizer import train_bpe

  folder = str(tmp_path / 'hf_model')
  texts = [arith.format_prompt(arith.generate_problem(0, i, 1).question) for i in range(50)]
  train_bpe(texts + ['The answer is 42. Which word comes first?'], folder, vocab_size=300)
  model = dict(vocab_size=320, d_model=32, num_layers=1, d_ff=64, num_heads=2, num_kv_heads=1)
  write_random_llama(folder, {**model, 'tie_embeddings': False})
  config = load_config(CONFIG + f':runlocal,hf={folder}')
  assert config.train.steps == 0 and config.data.tokenizer == 'hf'
  assert (config.model.d_model, config.model.vocab_size) == (32, 320)
  config.eval.update(
    levels=(1,), problems_per_level=2, word_questions=2, ks=(1, 2), seeds=(0,), max_new_tokens=6
  )
  instructions = []
  prompt = aggregate.self_agreement_prompt
  monkeypatch.setattr(
    aggregate,
    'self_agreement_prompt',
    lambda *a, **kw: instructions.append(kw['instruction']) or prompt(*a, **kw),
  )
  results = run_experiment(config, str(tmp_path / 'run'))
  assert results['train']['steps'] == 0 and results['train']['imported'] == folder
  assert not (tmp_path / 'run' / 'sft').exists()
  assert instructions and set(instructions) == {aggregate.SA_INSTRUCTION}
  for scenario in results['scenarios'].values():
    assert sum(scenario['by_k']['2']['sa']['fallbacks'].values()) == scenario['num_items']
  assert (tmp_path / 'run' / 'accuracy_vs_k.png').read_bytes().startswith(PNG_MAGIC)
  config.init_from_hf = ''
  with pytest.raises(ValueError, match='train.steps=0 evaluates an imported model'):
    run_experiment(config, str(tmp_path / 'run2'))
