"""RLMEC's stages: the records its method trains on, from a program teacher or a trained
generative reward model (GRM).

  minimal_edit  RLMEC records from kj_arith samples with the exact program teacher (p_t = 1 when
                the Levenshtein alignment keeps y_t, else 0), standing in for a trained GRM;
  teacher       minimum-editing verdicts (first wrong step, rewrite) on a sample stage's data, by
                the program teacher or by a model (`kuaijax.grm.ModelTeacher`, e.g. the trained
                GRM), optionally compared with another teacher stage (GRM quality);
  grm_data      the GRM's locate / rewrite / copy training records (`minimum_edit.grm_examples`),
                for a 'train' stage with method 'sft' and model role 'grm';
  rewards       the RLMEC records from a teacher stage: usable samples only, p_t from the GRM's
                teacher-forced probabilities (or from the alignment: the programmatic reward).
The record layout is described in `kuaijax.methods.rlmec`.
"""

from __future__ import annotations

import collections
import time

import numpy as np
from flax import nnx

from kuaijax import grm, sampling
from kuaijax.data import minimum_edit, sequences
from kuaijax.stages.base import register_stage_type


def keep_probs_from_alignment(sample, rewrite) -> np.ndarray:
  """1 for sample tokens the token-level Levenshtein alignment keeps unchanged ('match'), else 0."""
  return 1.0 - grm.changed_tokens(sample, rewrite).astype(np.float32)


def minimal_edit_records(samples, tokenizer) -> tuple[list[dict], dict]:
  """RLMEC records of kj_arith samples with the program teacher (see the module docstring).

  A correct sample is its own rewrite (keep-probability 1 everywhere) and is kept once per prompt;
  a wrong one gets the `minimum_edit.ProgramTeacher` rewrite (the teacher of the GRM stages too).
  Returns (records, stats).
  """
  teacher = minimum_edit.ProgramTeacher()
  out, seen = [], set()
  stats = {'samples': len(samples), 'correct': 0, 'wrong': 0, 'duplicates': 0}
  for s in samples:
    sample = np.asarray(s['completion_tokens'], np.int32)
    if s['correct']:
      key = (s['index'], tuple(sample.tolist()))
      if key in seen:
        stats['duplicates'] += 1
        continue
      seen.add(key)
      rewrite, keep = sample, np.ones(len(sample), np.float32)
    else:
      rewrite = sequences.completion_ids(tokenizer, teacher.edit(_case(s)).rewrite)
      keep = keep_probs_from_alignment(sample, rewrite)
    stats['correct' if s['correct'] else 'wrong'] += 1
    fields = ('index', 'prompt', 'completion', 'completion_tokens', 'logprobs', 'correct')
    out.append({**{k: s[k] for k in fields}, 'rewrite_tokens': rewrite, 'keep_probs': keep})
  return out, stats


@register_stage_type('minimal_edit', refs=('data',))
def minimal_edit_stage(stage) -> dict:
  """Options: data (a kj_arith `sample` stage). Writes the RLMEC records (data.jsonl)."""
  records, stats = minimal_edit_records(stage.records(stage.block.data), stage.tokenizer)
  stage.write_data(records)
  return stats


# ----------------------------------------------------------------------------- GRM stages


def _case(record: dict) -> minimum_edit.Case:
  """A sample-stage record as a teacher case (gold = the task record's completion text)."""
  return minimum_edit.Case(
    str(record.get('question', record['prompt'])),
    str(record['gold']),
    str(record['answer']),
    str(record['completion']),
  )


def _edit(record: dict) -> minimum_edit.Edit:
  return minimum_edit.Edit(int(record['error_step']), str(record['rewrite']), str(record['note']))


def _model(stage, ref: str):
  return nnx.merge(*stage.load_model(ref))


def _rate(count: float, seconds: float) -> float:
  return count / seconds if seconds else float('nan')


@register_stage_type('teacher', refs=('data', 'teacher', 'compare'))
def teacher_stage(stage) -> dict:
  """Minimum-editing verdicts on a sample stage's records (`kuaijax.data.minimum_edit`).

  Options: data (a sample stage); teacher ('program', exact on kj_arith, or a stage name /
  checkpoint path of a causal LM prompted like the GRM); compare ('' or a teacher stage over the
  same samples: `grm_quality` against it); batch_size, max_prompt_len (model teachers). Writes the
  sample records plus error_step (0 = correct, kept), rewrite, note and reaches_gold.
  """
  b = stage.block
  records = stage.records(b.data)
  cases = [_case(r) for r in records]
  stats = {}
  if b.teacher == 'program':
    edits_ = minimum_edit.ProgramTeacher()(cases)
  else:
    with stage.axis_rules():
      teacher = grm.ModelTeacher(
        _model(stage, b.teacher),
        stage.tokenizer,
        max_prompt_len=b.max_prompt_len,
        max_new_tokens=stage.config.data.max_new_tokens,
        batch_size=b.batch_size,
      )
      edits_ = teacher(cases)
    for phase in ('locate', 'rewrite'):
      seconds = teacher.stats.get(f'{phase}/seconds', 0.0)
      stats[f'{phase}_samples_per_s'] = _rate(teacher.stats.get(f'{phase}/samples', 0), seconds)
      stats[f'{phase}_tokens_per_s'] = _rate(teacher.stats.get(f'{phase}/tokens', 0), seconds)
  out = [
    {
      **r,
      'error_step': e.error_step,
      'rewrite': e.rewrite,
      'note': e.note,
      'reaches_gold': minimum_edit.reaches_gold(c, e),
    }
    for r, c, e in zip(records, cases, edits_)
  ]
  stage.write_data(out)
  wrong = [r for r in out if r['error_step'] != 0]
  stats.update(
    samples=len(out),
    wrong=len(wrong),
    notes=dict(collections.Counter(r['note'] for r in out)),
    rewrite_success=float(np.mean([r['reaches_gold'] for r in wrong])) if wrong else float('nan'),
  )
  if b.compare:
    stats['quality'] = grm_quality(stage.records(b.compare), out, stage.tokenizer)
  return stats


def grm_quality(reference: list[dict], judged: list[dict], tokenizer) -> dict:
  """A model teacher's verdicts against a reference teacher's, on the same wrong samples.

  locate_accuracy: the same first wrong step, parsed from the model's own answer (a fallback k
  after an unparsable or out-of-range answer counts as wrong); rewrite_success: the model's rewrite reaches the gold
  answer; edit_distance / reference_edit_distance: mean token edit distance from the sample to the
  model's / the reference's rewrite, over samples where both reach gold, and their ratio (1 = as
  minimal as the reference).
  """
  if len(reference) != len(judged):
    raise ValueError(f'compare: {len(reference)} reference records but {len(judged)} judged')
  same, success, mine, theirs = [], [], [], []
  for ref, got in zip(reference, judged):
    if (ref['index'], ref['completion']) != (got['index'], got['completion']):
      raise ValueError('compare: the two teacher stages judged different samples')
    if ref['error_step'] == 0:
      continue
    located = got['note'] not in ('locate_unparsed', 'locate_out_of_range', 'prompt_too_long')
    same.append(located and ref['error_step'] == got['error_step'])
    success.append(bool(got['reaches_gold']))
    if got['reaches_gold'] and ref['reaches_gold']:
      sample = tokenizer.encode(got['completion'])
      mine.append(grm.edit_distance(sample, tokenizer.encode(got['rewrite'])))
      theirs.append(grm.edit_distance(sample, tokenizer.encode(ref['rewrite'])))
  mean = lambda x: float(np.mean(x)) if x else float('nan')
  return {
    'wrong_samples': len(same),
    'locate_accuracy': mean(same),
    'rewrite_success': mean(success),
    'edit_distance': mean(mine),
    'reference_edit_distance': mean(theirs),
    'edit_distance_ratio': mean(mine) / mean(theirs) if sum(theirs) else float('nan'),
  }


@register_stage_type('grm_data', refs=('data',))
def grm_data_stage(stage) -> dict:
  """Options: data (a teacher stage). Writes GRM training records: prompt, completion, task."""
  records = stage.records(stage.block.data)
  examples, stats = minimum_edit.grm_examples(
    [_case(r) for r in records], [_edit(r) for r in records], seed=stage.seed()
  )
  stage.write_data(
    {'prompt': e['prompt'], 'completion': e['target'], 'task': e['task']} for e in examples
  )
  return stats


@register_stage_type('rewards', refs=('data', 'grm', 'auc_data'))
def rewards_stage(stage) -> dict:
  """RLMEC records (see the module docstring) from a teacher stage's verdicts.

  Options: data (a teacher stage); grm ('': p_t = 1 where the alignment of the sample with its
  rewrite keeps y_t, else 0, the programmatic reward; or the GRM's stage / path: p_t = its
  teacher-forced probability of y_t after the rewrite prompt and "Correct prediction:");
  auc_data ('' or a program-teacher stage over the same samples: `reward_auc` of the rewards of
  wrong samples against the tokens that teacher's rewrite changes); batch_size, max_prompt_len.
  Samples whose rewrite misses the gold answer are dropped and correct ones de-duplicated
  (`minimum_edit.usable_samples`); the records also carry the rewards r_t for inspection.
  """
  b, tok = stage.block, stage.tokenizer
  records = stage.records(b.data)
  cases, verdicts = [_case(r) for r in records], [_edit(r) for r in records]
  keep, stats = minimum_edit.usable_samples([r['index'] for r in records], cases, verdicts)
  samples = {i: np.asarray(records[i]['completion_tokens'], np.int32) for i in keep}
  rewrites = {
    i: samples[i]
    if verdicts[i].error_step == 0
    else sequences.completion_ids(tok, verdicts[i].rewrite)
    for i in keep
  }
  if b.grm:
    prompts = {
      i: sequences.prompt_ids(tok, minimum_edit.GrmPrompts().rewrite_prompt(cases[i])) for i in keep
    }
    fits = [i for i in keep if len(prompts[i]) + len(samples[i]) <= b.max_len]
    stats['dropped_too_long'] = len(keep) - len(fits)
    keep = fits
    scored = [(prompts[i], samples[i]) for i in keep]
    start = time.perf_counter()  # wall, compilation included
    with stage.axis_rules():
      logps = sampling.score_completion_lists(
        _model(stage, b.grm),
        [p for p, _ in scored],
        [c for _, c in scored],
        batch_size=b.batch_size,
        pad_id=tok.pad_id,
      )
    seconds = time.perf_counter() - start
    stats['scoring_samples_per_s'] = _rate(len(scored), seconds)
    stats['scoring_tokens_per_s'] = _rate(sum(len(p) + len(c) for p, c in scored), seconds)
    keep_probs = [np.exp(x) for x in logps]
  else:
    keep_probs = [keep_probs_from_alignment(samples[i], rewrites[i]) for i in keep]
  correct = [verdicts[i].error_step == 0 for i in keep]
  rewards = grm.token_rewards(keep_probs, correct)
  out = []
  for i, p, r in zip(keep, keep_probs, rewards):
    fields = ('index', 'prompt', 'completion', 'completion_tokens', 'logprobs', 'correct', 'level')
    out.append(
      {
        **{k: records[i][k] for k in fields if k in records[i]},
        'error_step': verdicts[i].error_step,
        'rewrite': verdicts[i].rewrite,
        'rewrite_tokens': rewrites[i],
        'keep_probs': p,
        'rewards': r,
      }
    )
  if b.auc_data:
    stats['reward_auc'] = reward_auc_against(stage.records(b.auc_data), out, tok)
  stage.write_data(out)
  stats['rewarded_tokens_fraction'] = float(
    np.mean(np.concatenate([r != 0 for r in rewards])) if rewards else float('nan')
  )
  return stats


def reward_auc_against(reference: list[dict], used: list[dict], tokenizer) -> float:
  """`grm.reward_auc` of the rewards of wrong samples, bad = tokens the reference rewrite changes."""
  by_sample = {(r['index'], r['completion']): r for r in reference}
  scores, bad = [], []
  for record in used:
    ref = by_sample.get((record['index'], record['completion']))
    if ref is None or ref['error_step'] == 0 or record['error_step'] == 0:
      continue
    rewrite = sequences.completion_ids(tokenizer, ref['rewrite'])
    scores.append(np.asarray(record['rewards']))
    bad.append(grm.changed_tokens(np.asarray(record['completion_tokens']), rewrite))
  return grm.reward_auc(scores, bad)
