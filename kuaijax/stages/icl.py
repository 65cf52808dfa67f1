"""Stage types of many-shot in-context learning by gradient matching (`kuaijax.inference.
gradient_matching`, toy tasks `kuaijax.data.icl_toy`).

- 'icl_tasks' (seed-free): the evaluation data sets, one fresh lookup task per set, with a training
  pool (the candidates), a dev split (best-of-n's judge, BM25's queries) and a test split.
- 'icl_meta_data' (seed-free): rows of many fresh tasks for training models to read a table in
  context (a 'train' stage with method 'sft' on them gives the proxy and the target).
- 'grad_features': the proxy model's projected per-example fine-tuning gradients (and mean hidden
  states) of every training-pool example, per set (`features_<set>.npy`, `embeddings_<set>.npy`).
- 'icl_select': the demonstrations of every method, selected once per set for the largest k and
  reused as prefixes (gradient matching: the greedy order; random: a permutation; BM25: the ranking;
  k-means: per k, its clusters differ).
- 'icl_eval': the target model's greedy accuracy on the test split with k demonstrations of each
  method, and best-of-n (of n random draws, the one with the best dev accuracy).
"""

from __future__ import annotations

import os
import random
import time

import numpy as np
from flax import nnx

from kuaijax.data import icl_toy, sequences
from kuaijax.data import records as records_lib
from kuaijax.inference import gradient_matching as gm
from kuaijax.sampling import sample_completions
from kuaijax.stages.base import Stage, register_stage_type

SPLITS = ('train', 'dev', 'test')
METHODS = ('random', 'best_of_n', 'bm25', 'kmeans', 'gradient_matching')


def _check_sets(names) -> list[str]:
  unknown = sorted(set(names) - set(icl_toy.LOOKUP_SETS))
  if unknown or not names:
    raise ValueError(f'sets={list(names)!r}: unknown {unknown}; known: {list(icl_toy.LOOKUP_SETS)}')
  return list(names)


def _task_file(path: str, limit: int) -> list[dict]:
  """The first `limit` (0 = all) prompt / completion records of a jsonl file."""
  out = []
  for where, record in records_lib.iter_jsonl(path, 'icl task'):
    for field in ('prompt', 'completion'):
      if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise ValueError(f'{where}: an icl task record needs a string {field!r} field')
    out.append(record)
    if limit and len(out) == limit:
      break
  if not out:
    raise ValueError(f'icl task file {path!r} has no records')
  return out


@register_stage_type('icl_tasks', seeded=False)
def icl_tasks_stage(stage: Stage) -> dict:
  """Options: sets, train / dev / test (examples per split), noise (label noise of the training
  pool), seed, files. With files '' the sets are toy lookup tasks (names of `icl_toy.LOOKUP_SETS`):
  one record per example with set, split, key, label, clean, prompt (the query line `key:`) and
  completion (the label). With files a pattern such as '/data/icl/{set}/{split}.jsonl', each
  set's splits are read from jsonl files of `prompt` / `completion` records (the first
  train / dev / test of each; 0 = all); a demonstration is its prompt + completion on one line, and
  an answer is right when the first generated line equals the completion, stripped."""
  b = stage.block
  if b.files:
    out = [
      {'set': name, 'split': split, 'prompt': r['prompt'], 'completion': r['completion']}
      for name in b.sets
      for split in SPLITS
      for r in _task_file(b.files.format(set=name, split=split), b[split])
    ]
    stage.write_data(out)
    return {'examples': len(out), 'sets': list(b.sets), 'files': b.files}
  rng = random.Random(b.seed)
  out = []
  for name in _check_sets(b.sets):
    spec = icl_toy.LOOKUP_SETS[name]
    task = icl_toy.lookup_task(rng, spec)
    for split in SPLITS:
      noise = b.noise if split == 'train' else 0.0
      for e in icl_toy.draw_examples(task, b[split], rng, label_words=spec.labels, noise=noise):
        out.append(
          {
            'set': name,
            'split': split,
            **e,
            'prompt': icl_toy.query(e['key']),
            'completion': e['label'],
          }
        )
  stage.write_data(out)
  return {'examples': len(out), 'sets': list(b.sets)}


@register_stage_type('icl_meta_data', seeded=False)
def icl_meta_data_stage(stage: Stage) -> dict:
  """Options: rows, lines (examples per row), repeat_share (rows that are a block written twice),
  seed. Writes SFT records (empty prompt, the row's text as the completion: every label is a
  target, predictable once its key was seen)."""
  b = stage.block
  texts = icl_toy.meta_training_texts(
    random.Random(b.seed), b.rows, lines=b.lines, repeat_share=b.repeat_share
  )
  stage.write_data({'prompt': '', 'completion': t} for t in texts)
  return {'rows': len(texts), 'lines': b.lines, 'repeat_share': b.repeat_share}


def _pool(records: list[dict], name: str, split: str) -> list[dict]:
  rows = [r for r in records if r['set'] == name and r['split'] == split]
  if not rows:
    raise ValueError(f'set {name!r} has no {split} examples')
  return rows


def _example_rows(tokenizer, pool: list[dict]) -> tuple[np.ndarray, np.ndarray]:
  """(tokens, loss_mask) [N, L] of the query -> answer examples (loss on the answer tokens)."""
  encoded = [
    (
      sequences.prompt_ids(tokenizer, r['prompt']),
      sequences.completion_ids(tokenizer, r['completion']),
    )
    for r in pool
  ]
  width = max(len(p) + len(c) for p, c in encoded)
  rows = [sequences.encode_sequence(p, c, width, tokenizer.pad_id) for p, c in encoded]
  return np.stack([t for t, _ in rows]), np.stack([m for _, m in rows])


@register_stage_type('grad_features', refs=('model', 'data'))
def grad_features_stage(stage: Stage) -> dict:
  """Options: model (the proxy's stage or checkpoint), data (an icl_tasks stage), select (the
  parameter subset, `gradient_matching.parameter_names`; '' = all), projection_dim, batch_size.
  Writes per set `features_<set>.npy` [N, p] and `embeddings_<set>.npy` [N, d] in training-pool
  order."""
  b = stage.block
  records = stage.records(b.data)
  graphdef, params = stage.load_model(b.model)
  model = nnx.merge(graphdef, params)
  summary, start = {}, time.time()
  with stage.axis_rules():
    for name in sorted({r['set'] for r in records}):
      tokens, mask = _example_rows(stage.tokenizer, _pool(records, name, 'train'))
      features = gm.example_gradient_features(
        model,
        tokens,
        mask,
        select=b.select or None,
        projection_dim=b.projection_dim,
        seed=stage.seed('projection'),
        batch_size=b.batch_size,
      )
      embeddings = gm.example_embeddings(model, tokens, mask, batch_size=b.batch_size)
      np.save(os.path.join(stage.dir, f'features_{name}.npy'), features)
      np.save(os.path.join(stage.dir, f'embeddings_{name}.npy'), embeddings)
      summary[name] = {'examples': len(tokens), 'dim': int(features.shape[1])}
  seconds = time.time() - start
  total = sum(s['examples'] for s in summary.values())
  return {
    'sets': summary,
    'parameters': len(gm.parameter_names(model, b.select or None)),
    'examples_per_s': total / seconds if seconds else float('nan'),
  }


def _features(stage: Stage, ref: str, name: str, what: str) -> np.ndarray:
  info = stage.finished(ref, 'features')
  return np.load(os.path.join(info['dir'], f'{what}_{name}.npy'))


def _select_set(stage: Stage, name: str, pool: list[dict], dev: list[dict], ks: list[int]):
  """(selection records, gradient-matching objective per k) of one set (see icl_select)."""
  b = stage.block
  out = []

  def add(method, k, draw, indices, **extra):
    indices = [int(i) for i in indices]
    out.append(dict(set=name, method=method, k=k, draw=draw, indices=indices, **extra))

  def permutations(kind, n):
    return [
      gm.select_random(len(pool), len(pool), stage.seed(f'{name}/{kind}/{d}')) for d in range(n)
    ]

  if 'random' in b.methods:
    for draw, order in enumerate(permutations('random', b.draws)):
      for k in ks:
        add('random', k, draw, order[:k])
  if 'best_of_n' in b.methods:
    for draw, order in enumerate(permutations('best_of_n', b.best_of_n)):
      for k in ks:
        add('best_of_n_candidate', k, draw, order[:k])
  if 'bm25' in b.methods:
    texts = [r['prompt'] + r['completion'] for r in pool]
    queries = [r['prompt'] for r in dev]
    ranking = gm.select_ngram_similarity(texts, queries, ks[-1], unit=b.bm25_unit, n=b.bm25_n)
    for k in ks:
      add('bm25', k, 0, ranking[:k])
  if 'kmeans' in b.methods:
    embeddings = _features(stage, b.features, name, 'embeddings')
    for k in ks:
      add('kmeans', k, 0, gm.select_kmeans(embeddings, k, stage.seed(f'{name}/kmeans/{k}')))
  objective = {}
  if 'gradient_matching' in b.methods:
    order, obj = gm.select_gradient_matching(_features(stage, b.features, name, 'features'), ks[-1])
    for k in ks:
      add('gradient_matching', k, 0, order[:k], objective=float(obj[k - 1]))
      objective[str(k)] = float(obj[k - 1])
  return out, objective


@register_stage_type('icl_select', refs=('data', 'features'))
def icl_select_stage(stage: Stage) -> dict:
  """Options: data (icl_tasks), features (grad_features), methods (of `METHODS`), ks, draws
  (random selections per k), best_of_n (candidates per k), bm25_unit / bm25_n. Writes one record
  per selection: set, method ('best_of_n_candidate' for best-of-n's candidates), k, draw, indices
  (into the set's training pool) and, for gradient matching, the objective
  |mean selected gradient - mean gradient| / |mean gradient|. BM25 ranks the pool against the dev
  queries taken together (one selection per set, as every other method)."""
  b = stage.block
  unknown = sorted(set(b.methods) - set(METHODS))
  if unknown:
    raise ValueError(f'stage {stage.name}: methods {unknown} unknown; known: {list(METHODS)}')
  ks = sorted({int(k) for k in b.ks})
  records = stage.records(b.data)
  out, objective = [], {}
  for name in sorted({r['set'] for r in records}):
    pool, dev = _pool(records, name, 'train'), _pool(records, name, 'dev')
    if not ks or ks[0] < 1 or ks[-1] > len(pool):
      raise ValueError(f'stage {stage.name}: ks {ks} must lie in [1, {len(pool)}] (set {name!r})')
    selected, objective[name] = _select_set(stage, name, pool, dev, ks)
    out += selected
  stage.write_data(out)
  return {'selections': len(out), 'gradient_matching_objective': objective}


def accuracy_by_method(records: list[dict]) -> dict:
  """{method: {k: test accuracy averaged over the sets, and over the draws within a set}} of one
  icl_eval data set."""
  by_set: dict = {}
  for r in records:
    by_set.setdefault((r['method'], r['k']), {}).setdefault(r['set'], []).append(r['accuracy'])
  cells: dict = {}
  for (method, k), sets in by_set.items():
    cells.setdefault(method, {})[k] = float(np.mean([np.mean(v) for v in sets.values()]))
  return cells


def _answer(text: str) -> str:
  return text.split('\n', 1)[0].strip()


def _accuracy(stage, model, pool, demos, items, batch_size, max_new_tokens) -> tuple[float, int]:
  """(greedy accuracy on `items` with the demonstrations `demos` of `pool`, demonstrations dropped
  from the front so that every prompt fits config.data.prompt_len)."""
  prompt_len = stage.config.data.prompt_len
  lines = [pool[i] for i in demos]
  dropped = 0
  longest = max((r['prompt'] for r in items), key=lambda p: len(stage.tokenizer.encode(p)))

  def width(demonstrations):
    return len(sequences.prompt_ids(stage.tokenizer, icl_toy.icl_prompt(demonstrations, longest)))

  while lines and width(lines) > prompt_len:
    lines, dropped = lines[1:], dropped + 1
  prompts = [icl_toy.icl_prompt(lines, r['prompt']) for r in items]
  samples = sample_completions(
    model,
    stage.tokenizer,
    prompts,
    greedy=True,
    max_new_tokens=max_new_tokens,
    prompt_len=prompt_len,
    batch_size=batch_size,
  )
  right = [_answer(s.text) == r['completion'].strip() for s, r in zip(samples, items)]
  return float(np.mean(right)), dropped


@register_stage_type('icl_eval', refs=('policy', 'data', 'selection'))
def icl_eval_stage(stage: Stage) -> dict:
  """Options: policy (the target model), data (icl_tasks), selection (icl_select), batch_size,
  max_new_tokens. Writes one record per (set, method, k, draw): test accuracy (greedy answer, first
  line, exact label) and the demonstrations dropped to fit the target's context
  (`config.data.prompt_len`); best-of-n: the candidate with the best dev accuracy (ties: the first),
  with its dev accuracy."""
  b = stage.block
  records = stage.records(b.data)
  graphdef, params = stage.load_model(b.policy)
  model = nnx.merge(graphdef, params)
  selections = stage.records(b.selection)
  out = []
  evaluate = lambda pool, sel, items: _accuracy(  # noqa: E731
    stage, model, pool, sel['indices'], items, b.batch_size, b.max_new_tokens
  )
  with stage.axis_rules():
    for name in sorted({s['set'] for s in selections}):
      pool, dev = _pool(records, name, 'train'), _pool(records, name, 'dev')
      test = _pool(records, name, 'test')
      candidates: dict[int, list] = {}
      for sel in (s for s in selections if s['set'] == name):
        if sel['method'] == 'best_of_n_candidate':
          candidates.setdefault(sel['k'], []).append((evaluate(pool, sel, dev)[0], sel))
          continue
        accuracy, dropped = evaluate(pool, sel, test)
        out.append({**sel, 'accuracy': accuracy, 'dropped_demonstrations': dropped})
      for _, scored in sorted(candidates.items()):
        dev_accuracy, best = max(scored, key=lambda c: c[0])
        accuracy, dropped = evaluate(pool, best, test)
        out.append(
          {
            **best,
            'method': 'best_of_n',
            'draw': 0,
            'accuracy': accuracy,
            'dev_accuracy': dev_accuracy,
            'candidates': len(scored),
            'dropped_demonstrations': dropped,
          }
        )
  stage.write_data(out)
  return {
    'accuracy': {
      m: {str(k): v for k, v in row.items()} for m, row in accuracy_by_method(out).items()
    },
    'truncated_selections': sum(r['dropped_demonstrations'] > 0 for r in out),
  }
