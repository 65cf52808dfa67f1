"""Self-Agreement vs Self-Consistency, USC and greedy CoT on a toy model (kj_arith + a word task).

A small model trained from scratch has no aggregation ability, which LLMs bring from pre-training,
so one SFT run teaches both: the policy (kj_arith solutions with the "The answer is" trigger, the
same problems in a no-trigger "Let's think step by step." format ending at the last step, and a
word task answered by its last line) and a generic aggregation task built only from TRAINING
problems: candidate sets of 1..k_max solutions (last lines, majority answer drawn at random) -> the
majority answer (SA format) or the number of the first response holding it (USC format).

Evaluation on held-out test problems, per scenario ('trigger': kj_arith with the trigger; 'mixed':
kj_arith without the trigger plus word questions, where trigger-based SC has nothing to vote on):
k paths per question in one batched generate call (k_max drawn once per seed; k = the first k of
them), then greedy CoT, SC (trigger rule), USC and SA, accuracy vs k, mean ± std over the seeds,
plus the uncertain-problem fraction and each method's counted fallbacks. Writes results.json,
results.md, accuracy_vs_k.png and loss_curves.png.
"""

from __future__ import annotations

import dataclasses
import os
import random
import time

import numpy as np
from matplotlib.figure import Figure

from kuaijax import plotting
from kuaijax.data import arith, tasks, tokenizers
from kuaijax.hf import model_io
from kuaijax.inference import aggregate, answers, multi_run
from kuaijax.train import lm_task
from kuaijax.train.trainer import write_results

SCENARIOS = ('trigger', 'mixed')
METHODS = ('greedy', 'sc', 'usc', 'sa')
TOY_SA_INSTRUCTION = 'Count the final answers and reply with the most common one.'
TOY_USC_INSTRUCTION = 'Pick the response that agrees with the most others.'
WORDS = tuple(
  [
    'apple',
    'bread',
    'cloud',
    'dance',
    'eagle',
    'flame',
    'grape',
    'horse',
    'igloo',
    'jelly',
    'kite',
    'lemon',
    'mango',
    'night',
    'ocean',
    'piano',
    'queen',
    'river',
    'snake',
    'tiger',
    'umbra',
    'violin',
    'water',
    'xenon',
    'yacht',
    'zebra',
  ]
)
NO_TRIGGER_CUE = "Let's think step by step."


@dataclasses.dataclass(frozen=True)
class Item:
  """One evaluation question: its prompt, gold answer (normal form) and answer type."""

  question: str
  prompt: str
  gold: str
  answer_type: str


def no_trigger_prompt(question: str) -> str:
  return f'Question: {question}\n{NO_TRIGGER_CUE}\n'


def without_trigger(solution: str) -> str:
  """A kj_arith gold solution without its answer line (it ends at the last step)."""
  return '\n'.join(line for line in solution.splitlines() if answers.TRIGGER not in line)


def word_problem(rng: random.Random) -> tuple[str, str, str]:
  """(question, solution, answer): the alphabetically first of 3-4 words, answered on the last line."""
  words = rng.sample(WORDS, rng.randint(3, 4))
  ordered = sorted(words)
  question = f'Which word comes first in the alphabet: {", ".join(words)}?'
  return question, f'Sorted: {", ".join(ordered)}\n{ordered[0]}', ordered[0]


def word_problems(seed: int, count: int, exclude=frozenset()) -> list[tuple[str, str, str]]:
  rng, out = random.Random(f'sa_words/{seed}'), []
  while len(out) < count:
    item = word_problem(rng)
    if item[0] not in exclude:
      out.append(item)
  return out


def _distractors(rng: random.Random, answer: str, answer_type: str) -> list[str]:
  if answer_type == 'number':
    value = int(answer)
    return [str(v) for v in rng.sample([value + d for d in (-3, -2, -1, 1, 2, 3, 10)], 3) if v >= 0]
  return rng.sample([w for w in WORDS if w != answer], 3)


def candidate_set(rng: random.Random, answer: str, answer_type: str, render, k: int):
  """k rendered candidate solutions whose answers mix `answer` with up to 3 distractors; returns
  (texts, their answers, majority answer with ties to the first occurrence)."""
  pool = [answer] + _distractors(rng, answer, answer_type)
  weights = [rng.random() ** 0.5 for _ in pool]
  picks = rng.choices(pool, weights=weights, k=k)
  return [render(a) for a in picks], picks, aggregate.majority_vote(picks).answer


def _renderers(problem: arith.ArithProblem):
  """How the last line of a solution to `problem` looks with a given answer: trigger and
  no-trigger formats."""
  last_step = without_trigger(problem.solution).splitlines()[-1]
  head = last_step.rsplit('=', 1)[0]
  return (lambda a: f'{answers.TRIGGER} {a}'), (lambda a: f'{head}={a}')


def training_texts(problems, words, config, rng: random.Random) -> list[tuple[str, str]]:
  """(prompt, completion) pairs: the policy's three formats plus SA and USC aggregation sets."""
  ac = config.aggregation
  pairs = []
  for p in problems:
    pairs.append((arith.format_prompt(p.question), p.solution))
    pairs.append((no_trigger_prompt(p.question), without_trigger(p.solution)))
  pairs += [(no_trigger_prompt(q), s) for q, s, _ in words]
  sets = [(p.question, str(p.answer), 'number', r) for p in problems for r in _renderers(p)]
  sets += [(q, a, 'text', lambda x: x) for q, _, a in words]
  for _ in range(ac.sets):
    question, answer, answer_type, render = sets[rng.randrange(len(sets))]
    k = rng.choice(ac.k_choices)
    texts, picks, majority = candidate_set(rng, answer, answer_type, render, k)
    sa = aggregate.self_agreement_prompt(
      question, texts, instruction=TOY_SA_INSTRUCTION, max_solution_lines=1
    )
    pairs.append((sa, f' {majority}'))
    usc = aggregate.usc_prompt(
      question, texts, instruction=TOY_USC_INSTRUCTION, max_response_lines=1
    )
    pairs.append((usc, f' {picks.index(majority) + 1}'))
  return pairs


def eval_items(config) -> dict[str, list[Item]]:
  """Held-out items per scenario (test split; word questions never seen in training)."""
  ec = config.eval
  problems = []
  for level in ec.levels:
    problems += tasks.load_arith_problems(
      'test', levels=(level,), limit=ec.problems_per_level, data_dir=config.data.data_dir
    )
  train_words = {q for q, _, _ in word_problems(0, config.data.word_examples)}
  words = word_problems(2, ec.word_questions, exclude=train_words)
  trigger = [
    Item(p.question, arith.format_prompt(p.question), str(p.answer), 'number') for p in problems
  ]
  mixed = [
    Item(p.question, no_trigger_prompt(p.question), str(p.answer), 'number') for p in problems
  ]
  mixed += [Item(q, no_trigger_prompt(q), a, 'text') for q, _, a in words]
  return {'trigger': trigger, 'mixed': mixed}


def _prompt_len(tokenizer, texts) -> int:
  longest = max(len(tokenizer.encode_array(t)) for t in texts) + 1
  return -(-longest // 64) * 64


def _greedy(model, tokenizer, texts, max_new_tokens: int) -> list[str]:
  """Greedy completions of `texts` in one padded width (`_prompt_len`)."""
  return aggregate.greedy_completions(
    model,
    tokenizer,
    texts,
    prompt_len=_prompt_len(tokenizer, texts),
    max_new_tokens=max_new_tokens,
  )


def aggregation_prompting(eval_config) -> dict:
  """Instructions and solution lines of the SA / USC prompts for `eval.prompts` ('toy' | 'paper')."""
  if eval_config.prompts == 'toy':  # what the toy SFT taught: short instructions, last lines only
    return dict(sa_instruction=TOY_SA_INSTRUCTION, usc_instruction=TOY_USC_INSTRUCTION, lines=1)
  if eval_config.prompts == 'paper':  # whole solutions under the paper's instructions
    return dict(
      sa_instruction=aggregate.SA_INSTRUCTION, usc_instruction=aggregate.USC_INSTRUCTION, lines=0
    )
  raise ValueError(f"eval.prompts={eval_config.prompts!r} is not one of ['paper', 'toy']")


def evaluate_seed(model, tokenizer, items: list[Item], seed: int, config) -> dict:
  """Per k and method: correct [items] bool and fallback counts, for one sampling seed."""
  ec = config.eval
  gen = dict(max_new_tokens=ec.max_new_tokens)
  paths = aggregate.sample_paths(
    model,
    tokenizer,
    [it.prompt for it in items],
    k=max(ec.ks),
    seed=seed,
    temperature=ec.temperature,
    top_k=ec.top_k or None,
    prompt_len=_prompt_len(tokenizer, [it.prompt for it in items]),
    **gen,
  )
  gold = np.array([it.gold for it in items])
  extracted = [
    [answers.extract_answer(p, it.answer_type, mode='clean') for p in group]
    for group, it in zip(paths, items)
  ]
  prompting = aggregation_prompting(ec)
  out = {}
  for k in ec.ks:
    first_k = [e[:k] for e in extracted]
    sc = [
      aggregate.self_consistency(g[:k], it.answer_type, mode='trigger').answer
      for g, it in zip(paths, items)
    ]
    record = {'sc': {'correct': np.array(sc) == gold, 'no_answer': sum(a is None for a in sc)}}
    if k == 1:  # one candidate: SA and USC must return it (or fall back to it)
      usc = sa = [e[0] for e in first_k]
      usc_status = sa_status = {'ok': len(items)}
    else:
      usc_texts = [
        aggregate.usc_prompt(
          it.question,
          g[:k],
          instruction=prompting['usc_instruction'],
          max_response_lines=prompting['lines'],
        )
        for g, it in zip(paths, items)
      ]
      replies = _greedy(model, tokenizer, usc_texts, max(1, ec.aggregate_tokens // 2))
      usc, usc_status = [], {}
      for reply, e in zip(replies, first_k):
        index, status = aggregate.parse_usc(reply, k)
        usc_status[status] = usc_status.get(status, 0) + 1
        usc.append(e[index if index is not None else 0])
      sa_texts = [
        aggregate.self_agreement_prompt(
          it.question,
          g[:k],
          instruction=prompting['sa_instruction'],
          max_solution_lines=prompting['lines'],
        )
        for g, it in zip(paths, items)
      ]
      replies = _greedy(model, tokenizer, sa_texts, ec.aggregate_tokens)
      sa, sa_status = [], {}
      for reply, e, it in zip(replies, first_k, items):
        parsed = aggregate.parse_self_agreement(reply, e, it.answer_type)
        sa_status[parsed.status] = sa_status.get(parsed.status, 0) + 1
        sa.append(parsed.answer if parsed.status == 'ok' else e[0])  # fallback: the first path
    record['usc'] = {'correct': np.array(usc) == gold, 'status': usc_status}
    record['sa'] = {'correct': np.array(sa) == gold, 'status': sa_status}
    out[k] = record
  return out


def evaluate_scenario(model, tokenizer, items: list[Item], config) -> dict:
  """Accuracy (%) per method and k: mean ± std over seeds, uncertain fraction, fallbacks."""
  ec = config.eval
  prompts = [it.prompt for it in items]
  greedy_texts = _greedy(model, tokenizer, prompts, ec.max_new_tokens)
  greedy = np.array(
    [
      answers.extract_answer(t, it.answer_type, mode='clean') == it.gold
      for t, it in zip(greedy_texts, items)
    ]
  )
  per_seed = [evaluate_seed(model, tokenizer, items, seed, config) for seed in ec.seeds]
  table = {}
  for k in ec.ks:
    row = {'greedy': {'accuracy': 100 * float(greedy.mean()), 'accuracy/std': 0.0}}
    for method in ('sc', 'usc', 'sa'):
      correct = np.stack([s[k][method]['correct'] for s in per_seed])
      stats = multi_run.run_statistics(
        [{'accuracy': 100 * float(c.mean())} for c in correct], correct
      )
      fallbacks = {}
      for s in per_seed:
        for name, n in (
          s[k][method].get('status', {'no_answer': s[k][method].get('no_answer', 0)}).items()
        ):
          fallbacks[name] = fallbacks.get(name, 0) + int(n)
      row[method] = {**stats, 'fallbacks': fallbacks}
    table[str(k)] = row
  return {'by_k': table, 'num_items': len(items), 'greedy_texts_sample': greedy_texts[:3]}


def results_table(results: dict, config) -> str:
  ec = config.eval
  lines = [
    f'## Accuracy (%) vs k paths, mean ± std over {len(ec.seeds)} sampling seeds '
    f'(T={ec.temperature}, top-k {ec.top_k or "off"})',
    '',
  ]
  for scenario, r in results['scenarios'].items():
    lines += [
      f'### scenario: {scenario} ({r["num_items"]} held-out questions)',
      '',
      '| method | ' + ' | '.join(f'k={k}' for k in ec.ks) + ' |',
      '|---|' + '---:|' * len(ec.ks),
    ]
    for method in METHODS:
      cells = [r['by_k'][str(k)][method] for k in ec.ks]
      lines.append(
        f'| {method} | '
        + ' | '.join(f'{c["accuracy"]:.1f} ± {c["accuracy/std"]:.1f}' for c in cells)
        + ' |'
      )
    kmax = str(max(ec.ks))
    lines += ['', f'k={kmax}: uncertain-problem fraction and counted fallbacks over all seeds:', '']
    for method in ('sc', 'usc', 'sa'):
      c = r['by_k'][kmax][method]
      lines.append(
        f'- {method}: uncertain {100 * c["uncertain_fraction"]:.0f}%, accuracy on certain '
        f'{100 * c["accuracy_on_certain"]:.1f}%, statuses {c["fallbacks"]}'
      )
    lines.append('')
  train = results['train']
  if 'imported' in train:
    lines.append(f'Model: {train["imported"]}, evaluated as imported (no training).')
  else:
    lines.append(
      f'Training: {train["steps"]} steps, {train["rows"]} packed rows, {train["wall_s"]:.0f} s.'
    )
  lines.append(f'Evaluation: {results["eval_wall_s"]:.0f} s.')
  return '\n'.join(lines) + '\n'


def plot(results: dict, config, workdir: str) -> list[str]:
  """accuracy_vs_k.png (one panel per scenario) and loss_curves.png."""
  ks = list(config.eval.ks)
  fig = Figure(figsize=(5 * len(results['scenarios']), 4))
  for i, (scenario, r) in enumerate(results['scenarios'].items()):
    ax = fig.add_subplot(1, len(results['scenarios']), i + 1)
    for method in METHODS:
      mean = np.array([r['by_k'][str(k)][method]['accuracy'] for k in ks])
      std = np.array([r['by_k'][str(k)][method]['accuracy/std'] for k in ks])
      ax.errorbar(ks, mean, yerr=std, label=method, capsize=3, marker='o')
    ax.set(xscale='log', xlabel='k paths', ylabel='accuracy (%)', title=scenario)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'accuracy_vs_k.png'), dpi=80)
  curves = plotting.write_loss_curves(workdir, ['sft'])  # none for a model evaluated as imported
  return ['accuracy_vs_k.png'] + (['loss_curves.png'] if curves else [])


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  bad_k = [k for k in config.eval.ks if not isinstance(k, int) or k < 1]
  if bad_k or not config.eval.ks:
    raise ValueError(f'eval.ks must be ints >= 1, got {tuple(config.eval.ks)}')
  aggregation_prompting(config.eval)  # a bad eval.prompts fails before any training
  dc, imported = config.data, config.get('init_from_hf', '')
  if config.train.steps == 0 and not imported:
    raise ValueError('train.steps=0 evaluates an imported model: set init_from_hf (or hf=...)')
  tokenizer = tokenizers.get_tokenizer(
    dc.tokenizer, spm_model_path=dc.spm_model_path or None, hf_path=imported or None
  )
  if config.train.steps == 0:  # a pretrained model, evaluated as it is
    model = model_io.load_model(imported, dtype=config.model.dtype)
    train = {'steps': 0, 'imported': imported}
  else:
    problems = tasks.load_arith_problems(
      'train', levels=tuple(dc.train_levels), limit=dc.train_examples or 0, data_dir=dc.data_dir
    )
    words = word_problems(0, dc.word_examples)
    pairs = training_texts(problems, words, config, random.Random(dc.seed))
    result, rows, _ = lm_task.train_on_pairs(
      config, os.path.join(workdir, 'sft'), pairs, tokenizer, drop_too_long=False
    )
    model = result.model()
    train = {'steps': result.step, 'rows': rows, 'pairs': len(pairs)}
  train['wall_s'] = time.time() - start
  scenarios = {
    name: evaluate_scenario(model, tokenizer, items, config)
    for name, items in eval_items(config).items()
    if name in config.eval.scenarios
  }
  results = {
    'scenarios': scenarios,
    'train': train,
    'eval_wall_s': time.time() - start - train['wall_s'],
  }
  results['plots'] = plot(results, config, workdir)
  results['wall_s'] = time.time() - start
  table = results_table(results, config)
  write_results(workdir, results, table)
  print(table)
  return results
