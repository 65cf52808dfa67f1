"""Many-shot ICL by gradient matching end to end on tiny models, and the toy tasks' properties."""

import json
import os
import random

import numpy as np
import pytest

from experiments import icl as icl_exp
from kuaijax.config_lib import load_config
from kuaijax.data import icl_toy
from kuaijax.data import records as records_lib
from kuaijax.inference import gradient_matching as gm
from tests.conftest import REPO_ROOT

CONFIG = os.path.join(REPO_ROOT, 'configs/icl/gradient_matching.py')
TINY = dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)


def tiny_config(arg='runlocal,seeds=0+1,ks=2+8'):
  config = load_config(f'{CONFIG}:{arg}')
  config.unlock()
  config.parallel.num_devices = 1
  config.train.update(progress=False, async_checkpoint=False)
  stage = config.stage
  stage.tasks.update(train=24, dev=6, test=6)
  if 'meta_data' in stage:
    stage.meta_data.update(rows=40, lines=8)
    for role in ('policy', 'proxy'):
      config.models[role].update(**TINY)
    for name in ('proxy', 'target'):
      stage[name].train.update(steps=2, batch_size=2, log_every=1, checkpoint_every=2, eval_every=2)
      stage[name].optimizer.warmup_steps = 1
  stage.features.update(projection_dim=64, batch_size=8)
  stage.select.update(draws=2, best_of_n=2)
  stage.icl_eval.batch_size = 6
  config.data.prompt_len = 24  # the 8-shot prompts do not fit: the earliest demonstrations drop
  config.lock()
  return config


def test_lookup_tasks_follow_their_table_and_zipf_weights():
  rng = random.Random(0)
  spec = icl_toy.LOOKUP_SETS['colors']
  task = icl_toy.lookup_task(rng, spec)
  assert len(set(task.keys)) == spec.num_keys and set(task.labels) <= set(spec.labels)
  assert np.isclose(sum(task.weights), 1.0) and task.weights[0] / task.weights[1] == pytest.approx(
    2.0
  )
  examples = icl_toy.draw_examples(task, 4000, rng)
  table = dict(zip(task.keys, task.labels))
  assert all(e['label'] == table[e['key']] and e['clean'] for e in examples)
  top = sum(e['key'] == task.keys[0] for e in examples) / len(examples)
  assert top == pytest.approx(task.weights[0], abs=0.02)
  noisy = icl_toy.draw_examples(task, 4000, rng, label_words=spec.labels, noise=0.3)
  wrong = [e for e in noisy if e['label'] != table[e['key']]]
  assert len(wrong) / len(noisy) == pytest.approx(0.3, abs=0.03)
  assert all(not e['clean'] for e in wrong)
  demos = [{'prompt': 'A', 'completion': 'red'}, {'prompt': 'B', 'completion': 'blue'}]
  assert icl_toy.icl_prompt(demos, icl_toy.query('A')) == 'Ared\nBblue\nA'
  with pytest.raises(ValueError, match='noise'):
    icl_toy.draw_examples(task, 3, rng, noise=1.0)
  with pytest.raises(ValueError, match='key letters'):
    icl_toy.lookup_task(rng, icl_toy.LookupSet(('Red', 'blue'), num_keys=4, zipf=1.0))


def test_meta_training_rows_repeat_blocks_in_their_share():
  rows = icl_toy.meta_training_texts(random.Random(0), 400, lines=20, repeat_share=0.5)
  lines = [r.split('\n') for r in rows]
  assert all(len(x) == 20 for x in lines)
  repeated = sum(x[:10] == x[10:] for x in lines) / len(lines)
  assert repeated == pytest.approx(0.5, abs=0.08)
  assert all(x[0][0] in icl_toy.KEY_ALPHABET and x[0][1:] for x in lines)
  with pytest.raises(ValueError, match='repeat_share'):
    icl_toy.meta_training_texts(random.Random(0), 1, lines=4, repeat_share=1.5)


def test_gradient_matching_represents_the_keys_in_proportion():
  """With one feature direction per key (as the gradients of identical examples are), greedy
  matching of the pool's mean is a largest-deficit rounding: after k picks every key appears within
  one of k times its share of the pool."""
  rng = random.Random(1)
  task = icl_toy.lookup_task(rng, icl_toy.LookupSet(('a', 'b'), num_keys=8, zipf=1.0))
  pool = icl_toy.draw_examples(task, 400, rng)
  keys = sorted({e['key'] for e in pool})
  features = np.eye(len(keys))[[keys.index(e['key']) for e in pool]]
  share = features.mean(axis=0)
  order, _ = gm.select_gradient_matching(features, 12)
  for k in (4, 8, 12):
    counts = features[order[:k]].sum(axis=0)
    assert np.all(np.abs(counts - k * share) < 1), (k, counts, k * share)


def test_tiny_pipeline_writes_the_table(tmp_path):
  config = tiny_config()
  results = icl_exp.run(config, str(tmp_path))
  assert results['seeds']['training'] == [0, 1]
  assert set(results['table']) == {'random', 'best_of_n', 'bm25', 'kmeans', 'gradient_matching'}
  assert set(results['table']['random']) == {'2', '8'}
  # one proxy for every seed, a target per seed
  shared = tmp_path / 'shared' / 'proxy' / 'stage.json'
  assert shared.exists() and (tmp_path / 'seed_1' / 'target' / 'stage.json').exists()
  evals = records_lib.read_records(str(tmp_path / 'seed_0' / 'icl_eval' / 'data.jsonl'))
  sel = records_lib.read_records(str(tmp_path / 'seed_0' / 'select' / 'data.jsonl'))
  # prefixes: gradient matching's k=2 selection is the start of its k=8 one
  gm2, gm8 = (
    next(
      s['indices']
      for s in sel
      if s['method'] == 'gradient_matching' and s['k'] == k and s['set'] == 'colors'
    )
    for k in (2, 8)
  )
  assert gm8[:2] == gm2
  best = [r for r in evals if r['method'] == 'best_of_n']
  assert best and all(r['candidates'] == 2 and 0 <= r['dev_accuracy'] <= 1 for r in best)
  # the 8-shot prompts exceed prompt_len=24 tokens: demonstrations were dropped and counted
  assert any(r['dropped_demonstrations'] > 0 for r in evals if r['k'] == 8)
  assert all(r['dropped_demonstrations'] == 0 for r in evals if r['k'] == 2)
  features = np.load(tmp_path / 'seed_0' / 'features' / 'features_colors.npy')
  assert features.shape == (24, 64) and np.isfinite(features).all()
  table = (tmp_path / 'results.md').read_text()
  assert '| gradient matching |' in table and (tmp_path / 'accuracy_vs_k.png').exists()
  json.loads((tmp_path / 'results.json').read_text())


def test_imported_proxy_and_target_with_task_files(tmp_path):
  """The full setting: two Hugging Face folders (a smaller proxy, a larger target; no training) and
  jsonl task files per set and split; a missing field is an error naming the file and line."""
  pytest.importorskip('tokenizers')
  from experiments.bench_hf import write_random_llama
  from kuaijax.hf.tokenizer import train_bpe

  rng = random.Random(0)
  files = tmp_path / 'tasks'
  for name in ('alpha', 'beta'):
    (files / name).mkdir(parents=True)
    for split, n in (('train', 12), ('dev', 3), ('test', 4)):
      rows = [
        {'prompt': f'{rng.choice("abcdef")} =', 'completion': f' {rng.choice("xyz")}'}
        for _ in range(n)
      ]
      (files / name / f'{split}.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  folders = {}
  for role, layers in (('proxy', 1), ('target', 2)):
    folder = str(tmp_path / role)
    train_bpe(['a = x', 'b = y', 'c = z d e f'] * 5, folder, vocab_size=280)
    shape = dict(
      vocab_size=300, d_model=32, num_layers=layers, d_ff=64, num_heads=2, num_kv_heads=1
    )
    write_random_llama(folder, {**shape, 'tie_embeddings': False})
    folders[role] = folder
  arg = (
    f'proxy_hf={folders["proxy"]},target_hf={folders["target"]},'
    f'files={files}/{{set}}/{{split}}.jsonl,sets=alpha+beta,ks=2+4'
  )
  config = load_config(f'{CONFIG}:{arg}')
  assert config.stage.proxy.type == config.stage.target.type == 'params' and config.seeds == (0,)
  config.unlock()
  config.parallel.num_devices = 1
  config.stage.tasks.update(train=0, dev=0, test=0)  # every record of the files
  config.stage.features.update(projection_dim=32, batch_size=4)
  config.stage.select.update(draws=2, best_of_n=2)
  config.lock()
  results = icl_exp.run(config, str(tmp_path / 'run'))
  assert set(results['per_set']) == {'alpha', 'beta'}
  features = np.load(tmp_path / 'run' / 'seed_0' / 'features' / 'features_alpha.npy')
  assert features.shape == (12, 32)
  (files / 'beta' / 'test.jsonl').write_text('{"prompt": "a ="}\n')
  with pytest.raises(ValueError, match=r'test.jsonl:1: .*completion'):
    icl_exp.run(config, str(tmp_path / 'again'))


def test_accuracy_of_a_copying_model_is_the_coverage_of_the_demonstrations(monkeypatch):
  """A model that answers from the demonstration with the query's key (else 'none') scores exactly
  the share of test items whose key is demonstrated; demonstrations that do not fit the context
  are dropped from the front and counted."""
  from types import SimpleNamespace

  from kuaijax.data import tokenizers
  from kuaijax.stages import icl

  def copying(model, tokenizer, prompts, **options):
    out = []
    for p in prompts:
      *demos, query = p.split('\n')
      table = {d[0]: d[1:] for d in demos}
      out.append(SimpleNamespace(text=table.get(query, 'none') + '\nB'))
    return out

  monkeypatch.setattr(icl, 'sample_completions', copying)
  rng = random.Random(3)
  task = icl_toy.lookup_task(rng, icl_toy.LOOKUP_SETS['colors'])
  rows = lambda n: [  # noqa: E731
    {**e, 'prompt': icl_toy.query(e['key']), 'completion': e['label']}
    for e in icl_toy.draw_examples(task, n, rng)
  ]
  pool, test = rows(40), rows(30)
  stage = SimpleNamespace(
    config=SimpleNamespace(data=SimpleNamespace(prompt_len=1000)),
    tokenizer=tokenizers.ByteTokenizer(),
  )
  demos = list(range(10))
  accuracy, dropped = icl._accuracy(stage, None, pool, demos, test, 8, 4)
  shown = {pool[i]['key'] for i in demos}
  assert dropped == 0 and accuracy == np.mean([r['key'] in shown for r in test])
  stage.config.data.prompt_len = (
    1 + 2 + sum(len(pool[i]['prompt'] + pool[i]['completion']) + 1 for i in demos[4:])
  )
  accuracy, dropped = icl._accuracy(stage, None, pool, demos, test, 8, 4)
  shown = {pool[i]['key'] for i in demos[4:]}
  assert dropped == 4 and accuracy == np.mean([r['key'] in shown for r in test])
