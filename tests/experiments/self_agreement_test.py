"""The Self-Agreement experiment on the stage pipeline: its toy training data, the table over
training seeds, the notebook (a tiny end-to-end run), bad config, an imported model evaluated as
it is and fine-tuned, and the runlocal run (slow)."""

import json
import os
import random
import statistics

import pytest

from experiments import self_agreement as sa
from kuaijax.config_lib import load_config
from kuaijax.data import arith
from kuaijax.data import records as records_lib
from kuaijax.inference import aggregate, answers, sa_toy
from kuaijax.main import run_experiment
from tests.colab_test import PNG_MAGIC, execute_notebook
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/self_agreement/toy.py')


def test_aggregation_examples_label_the_majority_of_training_problems():
  problems = [arith.generate_problem(0, i, 1) for i in range(6)]
  words = sa_toy.word_problems(0, 4)
  pairs = sa_toy.training_pairs(
    problems, words, sets=60, k_choices=(1, 2, 3, 5), rng=random.Random(0)
  )
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
  no_trigger = sa_toy.without_trigger(problems[0].solution)
  assert answers.TRIGGER not in no_trigger and no_trigger.endswith(str(problems[0].answer))


def _eval(accuracy_sa3, greedy, statuses):
  """A flat 'self_agreement' evaluation of one scenario ('trigger'), ks (1, 3)."""
  out = {'sa/trigger/num_items': 4, 'sa/trigger/greedy/accuracy': greedy}
  for k in (1, 3):
    for method in ('sc', 'usc', 'sa'):
      acc = accuracy_sa3 if (k, method) == (3, 'sa') else 0.25
      base = f'sa/trigger/k{k}/{method}'
      out.update(
        {
          f'{base}/accuracy': acc,
          f'{base}/accuracy/std': 0.1,
          f'{base}/uncertain_fraction': 0.5,
          f'{base}/accuracy_on_certain': 0.0,
          f'{base}/num_runs': 2,
        }
      )
      out.update({f'{base}/status/{s}': n for s, n in statuses.items()})
  return out


def test_table_over_training_seeds_is_mean_and_std_over_them():
  config = load_config(CONFIG + ':runlocal')
  config.evals.self_agreement.update(scenarios=('trigger',), ks=(1, 3), seeds=(0, 1))
  info = lambda e: {
    'sft': {'eval': e, 'block': {'label': 'SFT'}, 'type': 'train', 'seed': 0, 'wall_s': 1.0}
  }
  one = {0: info(_eval(0.5, 0.25, {'ok': 3, 'not_candidate': 1}))}
  two = {**one, 1: info(_eval(1.0, 0.75, {'ok': 4}))}
  cell = sa.summarise(one, config)['sft']['scenarios']['trigger']['by_k']['3']['sa']
  assert cell['accuracy'] == 50.0 and cell['accuracy/std'] == pytest.approx(10.0)  # sampling
  policy = sa.summarise(two, config)['sft']
  cell = policy['scenarios']['trigger']['by_k']['3']['sa']
  assert cell['accuracy'] == 75.0 and cell['accuracy/std'] == pytest.approx(35.355, abs=1e-3)
  assert cell['fallbacks'] == {'ok': 7, 'not_candidate': 1}
  greedy = policy['scenarios']['trigger']['by_k']['1']['greedy']
  assert greedy['accuracy'] == 50.0 and greedy['accuracy/std'] == pytest.approx(35.355, abs=1e-3)
  assert 'over 2 training seeds' in sa.spread_note(two, config.evals.self_agreement)
  assert '1 training seed, mean ± std over 2 sampling seeds' in sa.spread_note(
    one, config.evals.self_agreement
  )


def test_bad_ks(tmp_path):
  config = load_config(CONFIG + ':runlocal')
  config.parallel.num_devices = 1
  config.stage.toy_data.update(limit=4, word_examples=2, sets=2)
  config.evals.self_agreement.update(problems_per_level=1, word_questions=1, ks=(0, 3))
  with pytest.raises(ValueError, match=r'ks \(paths per question\)'):
    run_experiment(config, str(tmp_path))
  assert not (tmp_path / 'seed_0' / 'sft' / 'stage.json').exists()  # failed before training


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
  assert results['seeds'] == {'training': [0], 'sampling': [0, 1]}
  assert set(results['policies']) == {'sft'}
  scenarios = results['policies']['sft']['scenarios']
  assert set(scenarios) == {'trigger', 'mixed'}
  for scenario in scenarios.values():
    assert set(scenario['by_k']) == {'1', '3'}
    for method in ('sc', 'usc', 'sa'):
      cell = scenario['by_k']['3'][method]
      assert cell['num_runs'] == 2 and 0 <= cell['accuracy'] <= 100
      assert sum(cell['fallbacks'].values()) == 2 * scenario['num_items']
    # k = 1: SA and USC can only return the one path's answer.
    assert scenario['by_k']['1']['sa']['fallbacks'] == {'ok': 2 * scenario['num_items']}
  data = records_lib.read_records(str(workdir / 'shared' / 'toy_data' / 'data.jsonl'))
  assert {r['kind'] for r in data} == {'trigger', 'no_trigger', 'word', 'sa', 'usc'}
  assert (workdir / 'seed_0' / 'sft' / 'stage.json').exists()
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
  for scenario in results['policies']['sft']['scenarios'].values():
    assert set(scenario['by_k']) == {'1', '3', '5', '10', '20'}


def test_paths_benchmark_compares_the_same_paths_and_reports_their_ratio(tmp_path, monkeypatch):
  """Both sides sample the same number of paths (counted as they are generated), called in turn
  (warm-up calls first, then one call of each side per round); the reported ratio and rates are
  those of the recorded per-round timings (the timings themselves are not tested)."""
  config = load_config(os.path.join(REPO_ROOT, 'configs/self_agreement/bench.py:runlocal'))
  bc = config.bench
  assert bc.rounds >= 5 and bc.warmup >= 1
  calls = []  # (k, paths returned) of every sample_paths call
  sample_paths = aggregate.sample_paths

  def counted(*args, **kwargs):
    out = sample_paths(*args, **kwargs)
    calls.append((kwargs['k'], sum(len(p) for p in out)))
    return out

  monkeypatch.setattr(aggregate, 'sample_paths', counted)
  results = run_experiment(config, str(tmp_path))
  paths = bc.questions * bc.k
  batched = [(bc.k, paths)]  # one batched call of k paths each
  single = [(1, bc.questions)] * bc.k  # k single calls
  assert calls == batched * bc.warmup + single * bc.warmup + (batched + single) * bc.rounds
  saved = json.loads((tmp_path / 'results.json').read_text())
  assert saved['paths'] == results['paths'] == paths
  batched_s, single_s = saved['batched']['rounds'], saved['single_calls']['rounds']
  assert len(batched_s) == len(single_s) == bc.rounds
  per_round = [s / b for s, b in zip(single_s, batched_s)]
  assert saved['ratio']['median'] == pytest.approx(statistics.median(per_round), rel=1e-12)
  assert (saved['ratio']['min'], saved['ratio']['max']) == (min(per_round), max(per_round))
  assert saved['batched_s'] == statistics.median(batched_s)
  assert saved['paths_per_s_batched'] * saved['batched_s'] == pytest.approx(paths, rel=1e-12)
  assert saved['paths_per_s_single_calls'] * saved['single_calls_s'] == pytest.approx(
    paths, rel=1e-12
  )
  text = (tmp_path / 'results.md').read_text()
  ratio = f'{saved["ratio"]["median"]:.2f}x ({min(per_round):.2f}-{max(per_round):.2f})'
  assert ratio in text and text.startswith('k=') and 'Command: `' in text


def test_a_pretrained_model_is_evaluated_as_imported_and_fine_tuned(tmp_path, monkeypatch):
  """`hf=<folder>`: a params stage of the imported role (no SFT), the folder's tokenizer, the
  paper's SA / USC instructions; with `stages=pretrained+sft` also an SFT stage started from it."""
  pytest.importorskip('tokenizers')
  from experiments.bench_hf import write_random_llama
  from kuaijax.hf.tokenizer import train_bpe

  folder = str(tmp_path / 'hf_model')
  texts = [arith.format_prompt(arith.generate_problem(0, i, 1).question) for i in range(50)]
  train_bpe(texts + ['The answer is 42. Which word comes first?'], folder, vocab_size=300)
  model = dict(vocab_size=320, d_model=32, num_layers=1, d_ff=64, num_heads=2, num_kv_heads=1)
  write_random_llama(folder, {**model, 'tie_embeddings': False})
  config = load_config(CONFIG + f':runlocal,hf={folder}')
  assert config.stages == 'pretrained' and config.data.tokenizer == 'hf'
  assert config.models.policy.hf == folder and config.stage.pretrained.type == 'params'
  config.parallel.num_devices = 1
  config.train.update(progress=False, async_checkpoint=False)
  config.evals.self_agreement.update(
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
  assert list(results['policies']) == ['pretrained'] and results['seeds']['training'] == [0]
  assert not (tmp_path / 'run' / 'seed_0' / 'sft').exists()
  assert instructions and set(instructions) == {aggregate.SA_INSTRUCTION}
  for scenario in results['policies']['pretrained']['scenarios'].values():
    assert sum(scenario['by_k']['2']['sa']['fallbacks'].values()) == scenario['num_items']
  assert 'evaluated as imported' in (tmp_path / 'run' / 'results.md').read_text()
  assert (tmp_path / 'run' / 'accuracy_vs_k.png').read_bytes().startswith(PNG_MAGIC)

  config.stages = 'pretrained+sft'  # fine-tune the imported model on the toy data first
  config.stage.toy_data.update(limit=8, word_examples=4, sets=4)
  config.stage.sft.train.update(
    steps=2, batch_size=2, log_every=1, checkpoint_every=2, eval_every=2
  )
  results = run_experiment(config, str(tmp_path / 'run'))  # the params stage is kept
  assert list(results['policies']) == ['pretrained', 'sft']
  sft = results['runs']['0']['sft']
  assert sft['summary']['steps'] == 2 and sft['model'] == 'policy'
  assert 'Training (sft, seed 0): 2 steps' in (tmp_path / 'run' / 'results.md').read_text()


def test_reproduction_settings():
  repro = load_config(CONFIG + ':repro')
  runlocal = load_config(CONFIG + ':runlocal')
  assert repro.seeds == (0, 1, 2) and runlocal.seeds == (0,)
  assert repro.models.policy.to_dict() == runlocal.models.policy.to_dict()
  assert repro.stage.sft.train.steps > runlocal.stage.sft.train.steps
  ev, data = repro.evals.self_agreement, repro.stage.toy_data
  # held-out word questions are the ones after the training ones
  assert ev.train_word_examples == data.word_examples and len(ev.seeds) >= 3
  gpu = load_config(CONFIG + ':gpu')
  assert gpu.models.policy.d_model > repro.models.policy.d_model and gpu.seeds == (0, 1, 2)
  assert gpu.evals.self_agreement.train_word_examples == gpu.stage.toy_data.word_examples
  with pytest.raises(ValueError, match='alternatives'):
    load_config(CONFIG + ':repro,gpu')
