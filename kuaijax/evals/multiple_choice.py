"""Multiple-choice log-likelihood evaluation (lm-eval-harness style): PIQA, HellaSwag, ARC, CSQA, BBH.

Each record becomes (context, choices, label) through a per-format adapter; every choice is scored
by the summed log-probability of its tokens after the context,
  score(choice) = sum_t log p(choice_t | bos, context, choice_<t),
from the model's final hidden states through the fused `token_logprobs` kernel (no [B, L, V]
logits). `acc` takes the argmax of the scores, `acc_norm` the argmax of score / len(choice) in
characters, as lm-eval-harness does. Rows (one per choice) are padded to a fixed [batch_size,
max_len] so the scoring function compiles once.

Records come from a local jsonl file (errors name the file and line) or a prepared tfds data set
(through `kuaijax.data.sources.get_data_source`; errors name the data set, split and index).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax.numpy as jnp
import numpy as np

from kuaijax import parallel
from kuaijax.data import sources
from kuaijax.evals.base import Evaluator
from kuaijax.evals.registry import register_evaluator
from kuaijax.jit_cache import ParamsJit
from pallas_kernels.token_logprobs import token_logprobs


@dataclasses.dataclass(frozen=True)
class MCExample:
  """One question: the context, the candidate continuations and the index of the right one."""

  context: str
  choices: tuple[str, ...]
  label: int


class RecordError(ValueError):
  """A raw record that an adapter cannot map (missing field, bad label...)."""


def _field(record: Mapping, name: str):
  if not isinstance(record, Mapping) or name not in record:
    present = sorted(record) if isinstance(record, Mapping) else type(record).__name__
    raise RecordError(f'missing field {name!r} (record has {present})')
  return record[name]


def _text(record: Mapping, name: str) -> str:
  value = _field(record, name)
  if not isinstance(value, str):
    raise RecordError(f'field {name!r} must be a string, got {type(value).__name__}')
  return value


def _index_label(value, num_choices: int, name: str = 'label') -> int:
  """An integer label (int or digit string) checked against the number of choices."""
  if isinstance(value, str) and value.strip().lstrip('-').isdigit():
    value = int(value.strip())
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise RecordError(f'{name}={value!r} is not an integer choice index')
  if not 0 <= value < num_choices:
    raise RecordError(f'{name}={value} is out of range for {num_choices} choices')
  return int(value)


def _keyed_label(key, keys: Sequence[str], name: str = 'answerKey') -> int:
  if key not in keys:
    raise RecordError(f'{name}={key!r} is not one of the choice labels {list(keys)}')
  return list(keys).index(key)


def _question(question: str) -> str:
  return f'Question: {question}\nAnswer:'


def _choice_list(choices, where: str) -> tuple[list[str], list[str]]:
  """(labels, texts) from {label: [...], text: [...]} or [{label, text}, ...]."""
  if isinstance(choices, Mapping):
    labels, texts = list(_field(choices, 'label')), list(_field(choices, 'text'))
  elif isinstance(choices, Sequence) and not isinstance(choices, str):
    labels = [_field(c, 'label') for c in choices]
    texts = [_field(c, 'text') for c in choices]
  else:
    raise RecordError(f'{where} must be {{label, text}} lists or a list of {{label, text}}')
  if len(labels) != len(texts) or not texts:
    raise RecordError(f'{where} has {len(labels)} labels and {len(texts)} texts')
  if not all(isinstance(t, str) for t in texts):
    raise RecordError(f'{where} texts must be strings')
  return [str(label) for label in labels], texts


def piqa(record: Mapping) -> MCExample:
  """PIQA: goal, sol1, sol2, label (0/1)."""
  choices = (' ' + _text(record, 'sol1'), ' ' + _text(record, 'sol2'))
  return MCExample(
    _question(_text(record, 'goal')), choices, _index_label(_field(record, 'label'), 2)
  )


def _hellaswag_clean(text: str) -> str:
  text = text.strip().replace(' [title]', '. ')
  text = re.sub(r'\[.*?\]', '', text)
  return text.replace('  ', ' ')


def hellaswag(record: Mapping) -> MCExample:
  """HellaSwag: ctx (or ctx_a + ctx_b), endings, label; activity_label prefixes the context."""
  if 'ctx' in record:
    ctx = _text(record, 'ctx')
  else:
    ctx = _text(record, 'ctx_a') + ' ' + _text(record, 'ctx_b').capitalize()
  if record.get('activity_label'):
    ctx = f'{record["activity_label"]}: {ctx}'
  endings = _field(record, 'endings')
  if isinstance(endings, str) or not isinstance(endings, Sequence) or not endings:
    raise RecordError('field "endings" must be a non-empty list of strings')
  choices = tuple(' ' + _hellaswag_clean(str(e)) for e in endings)
  return MCExample(
    _hellaswag_clean(ctx), choices, _index_label(_field(record, 'label'), len(choices))
  )


def arc(record: Mapping) -> MCExample:
  """ARC (easy/challenge): question, choices {text, label}, answerKey (a letter or a digit)."""
  labels, texts = _choice_list(_field(record, 'choices'), 'field "choices"')
  label = _keyed_label(str(_field(record, 'answerKey')), labels)
  return MCExample(_question(_text(record, 'question')), tuple(' ' + t for t in texts), label)


def csqa(record: Mapping) -> MCExample:
  """CommonsenseQA: {question: {stem, choices: [{label, text}]}, answerKey} or the flat HF form
  {question, choices: {label, text}, answerKey}."""
  question = _field(record, 'question')
  if isinstance(question, Mapping):
    stem = _text(question, 'stem')
    labels, texts = _choice_list(_field(question, 'choices'), 'field "question.choices"')
  else:
    stem = _text(record, 'question')
    labels, texts = _choice_list(_field(record, 'choices'), 'field "choices"')
  label = _keyed_label(str(_field(record, 'answerKey')), labels)
  return MCExample(_question(stem), tuple(' ' + t for t in texts), label)


_BBH_OPTION = re.compile(r'^\s*\(([A-Z])\)\s*(.*?)\s*$')


def bbh(record: Mapping) -> MCExample:
  """BIG-Bench-Hard style: input, target, and options (a list) or an "Options:" block in input.

  With options parsed from "(A) text" lines and a letter target like "(B)", the choices are the
  letters as the target writes them; otherwise the choices are the option texts and the target
  must equal one of them.
  """
  question, target = _text(record, 'input'), _text(record, 'target').strip()
  if 'options' in record:
    options = record['options']
    if isinstance(options, str) or not isinstance(options, Sequence) or not options:
      raise RecordError('field "options" must be a non-empty list of strings')
    choices = [str(o).strip() for o in options]
  else:
    parsed = [m.groups() for m in map(_BBH_OPTION.match, question.splitlines()) if m]
    if not parsed:
      raise RecordError('no "options" field and no "(A) ..." option lines in "input"')
    letters = [f'({letter})' for letter, _ in parsed]
    choices = letters if target in letters else [text for _, text in parsed]
  if target not in choices:
    raise RecordError(f'target={target!r} is not one of the options {choices}')
  return MCExample(f'Q: {question}\nA:', tuple(' ' + c for c in choices), choices.index(target))


FORMATS: dict[str, Callable[[Mapping], MCExample]] = {
  'piqa': piqa,
  'hellaswag': hellaswag,
  'arc': arc,
  'csqa': csqa,
  'bbh': bbh,
}


def _plain(value):
  """tfds values (bytes, numpy arrays, nested dicts) as plain Python (str, list, dict)."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return [_plain(v) for v in value.tolist()] if value.ndim else _plain(value.item())
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


def _adapt(adapter, record, where: str) -> MCExample:
  try:
    return adapter(record)
  except RecordError as e:
    raise RecordError(f'{where}: {e}') from None


def load_examples(
  source: str,
  format: str,
  *,
  split: str = 'validation',
  data_dir: str | os.PathLike | None = None,
  limit: int | None = None,
) -> list[MCExample]:
  """Examples of one task from a local jsonl file or a prepared tfds data set.

  source: a path ending in .jsonl (or 'jsonl:PATH'; '{split}' in it is replaced by the split) or a
  tfds name. format: one of FORMATS. limit: keep the first `limit` examples (None: all).
  """
  if format not in FORMATS:
    raise ValueError(f'multiple-choice format {format!r} is not one of {sorted(FORMATS)}')
  adapter = FORMATS[format]
  path = source.removeprefix(sources.JSONL_PREFIX).replace('{split}', split)
  examples = []
  if source.startswith(sources.JSONL_PREFIX) or source.endswith('.jsonl'):
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'multiple-choice jsonl file not found: {path}')
    with path.open(encoding='utf-8') as f:
      for line_number, line in enumerate(f, 1):
        if limit is not None and len(examples) >= limit:
          break
        if not line.strip():
          continue
        try:
          record = json.loads(line)
        except json.JSONDecodeError as e:
          raise RecordError(f'{path}:{line_number}: invalid JSON ({e})') from None
        examples.append(_adapt(adapter, record, f'{path}:{line_number}'))
  else:
    data = sources.get_data_source(source, split=split, data_dir=data_dir)
    count = len(data) if limit is None else min(limit, len(data))
    for i in range(count):
      examples.append(_adapt(adapter, _plain(data[i]), f'{source}[{split}] record {i}'))
  if not examples:
    raise ValueError(f'multiple-choice source {source!r} (split {split!r}) has no records')
  return examples


def encode_rows(
  examples: Sequence[MCExample], tokenizer, max_len: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """One row per (example, choice): [bos] + context + choice, left-truncated to max_len + 1 tokens.

  Returns arrays inputs/targets/positions/segment_ids/loss_mask [rows, max_len] (the loss mask
  covers the choice's tokens in `targets`) and the example index of every row.
  """
  rows = [(i, c) for i, ex in enumerate(examples) for c in range(len(ex.choices))]
  shape = (len(rows), max_len)
  out = {k: np.zeros(shape, np.int32) for k in ('inputs', 'targets', 'segment_ids', 'loss_mask')}
  out['positions'] = np.broadcast_to(np.arange(max_len, dtype=np.int32), shape).copy()
  context_cache = {}
  for r, (i, c) in enumerate(rows):
    ex = examples[i]
    if i not in context_cache:
      context_cache[i] = [tokenizer.bos_id, *tokenizer.encode(ex.context)]
    continuation = list(tokenizer.encode(ex.choices[c]))
    if not continuation:
      raise ValueError(f'choice {c} of example {i} encodes to no tokens: {ex.choices[c]!r}')
    if len(continuation) > max_len:
      raise ValueError(
        f'choice {c} of example {i} has {len(continuation)} tokens, more than max_len={max_len}'
      )
    seq = (context_cache[i] + continuation)[-(max_len + 1) :]
    n = len(seq) - 1
    out['inputs'][r, :n] = seq[:-1]
    out['targets'][r, :n] = seq[1:]
    out['segment_ids'][r, :n] = 1
    out['loss_mask'][r, n - len(continuation) : n] = 1
  out['inputs'][out['segment_ids'] == 0] = tokenizer.pad_id
  return out, np.asarray([i for i, _ in rows], np.int64)


def accuracy(examples: Sequence[MCExample], scores: Sequence[np.ndarray]) -> dict[str, float]:
  """acc (argmax of summed log-probs) and acc_norm (argmax per character of the choice)."""
  correct = correct_norm = 0
  for ex, s in zip(examples, scores, strict=True):
    lengths = np.asarray([max(len(c), 1) for c in ex.choices], np.float64)
    correct += int(np.argmax(s)) == ex.label
    correct_norm += int(np.argmax(np.asarray(s) / lengths)) == ex.label
  n = len(examples)
  return {'acc': correct / n, 'acc_norm': correct_norm / n}


class MultipleChoiceEvaluator(Evaluator):
  """Scores a model on fixed multiple-choice tasks.

  tasks: task name -> examples (see `load_examples`). Metrics: acc/<task>, acc_norm/<task>,
  count/<task> (examples) and choices/<task>, plus acc and acc_norm averaged over tasks.
  """

  def __init__(
    self,
    tasks: Mapping[str, Sequence[MCExample]],
    tokenizer,
    *,
    max_len: int,
    batch_size: int,
    mesh=None,
    rules=None,
    implementation: str = 'auto',
  ):
    if not tasks:
      raise ValueError('multiple-choice evaluation needs at least one task')
    if max_len <= 1 or batch_size <= 0:
      raise ValueError(f'max_len must be > 1 and batch_size > 0, got {max_len}, {batch_size}')
    for name, examples in tasks.items():
      if not examples:
        raise ValueError(f'multiple-choice task {name!r} has no examples')
    self.tasks = {name: list(examples) for name, examples in tasks.items()}
    self.batch_size, self.max_len = batch_size, max_len
    self._mesh, self._rules, self._implementation = mesh, rules, implementation
    self._rows = {name: encode_rows(ex, tokenizer, max_len) for name, ex in self.tasks.items()}
    self._score = ParamsJit(self._score_rows)

  def _score_rows(self, model, batch):
    hidden, _ = model(
      batch['inputs'],
      positions=batch['positions'],
      segment_ids=batch['segment_ids'],
      return_hidden=True,
    )
    logprobs, _ = token_logprobs(
      hidden, model.output_head(), batch['targets'], implementation=self._implementation
    )
    return jnp.sum(jnp.where(batch['loss_mask'] > 0, logprobs, 0.0), axis=-1)

  def _batches(self, arrays: Mapping[str, np.ndarray]) -> Iterable[tuple[dict, int]]:
    """Fixed-shape batches; the last one is padded with empty rows (mask 0)."""
    total = len(arrays['inputs'])
    for start in range(0, total, self.batch_size):
      batch = {k: v[start : start + self.batch_size] for k, v in arrays.items()}
      n = len(batch['inputs'])
      if n < self.batch_size:
        batch = {
          k: np.concatenate([v, np.zeros((self.batch_size - n, *v.shape[1:]), v.dtype)])
          for k, v in batch.items()
        }
      yield batch, n

  def choice_scores(self, graphdef, params) -> dict[str, list[np.ndarray]]:
    """Task name -> per example, the summed log-prob of each choice."""
    results = {}
    for name, (arrays, example_of_row) in self._rows.items():
      row_scores = []
      for batch, n in self._batches(arrays):
        if self._mesh is not None:
          with parallel.axis_rules(self._mesh, self._rules):
            out = self._score(
              graphdef, params, parallel.shard_batch(batch, self._mesh, self._rules)
            )
        else:
          out = self._score(graphdef, params, batch)
        row_scores.append(np.asarray(parallel.host_value(out), np.float64)[:n])
      flat = np.concatenate(row_scores)
      results[name] = [flat[example_of_row == i] for i in range(len(self.tasks[name]))]
    return results

  def evaluate(self, graphdef, params, step=None) -> dict:
    del step
    metrics = {}
    scores = self.choice_scores(graphdef, params)
    for name, examples in self.tasks.items():
      result = accuracy(examples, scores[name])
      metrics[f'acc/{name}'] = result['acc']
      metrics[f'acc_norm/{name}'] = result['acc_norm']
      metrics[f'count/{name}'] = len(examples)
      metrics[f'choices/{name}'] = sum(len(ex.choices) for ex in examples)
    metrics['acc'] = float(np.mean([metrics[f'acc/{n}'] for n in self.tasks]))
    metrics['acc_norm'] = float(np.mean([metrics[f'acc_norm/{n}'] for n in self.tasks]))
    return metrics


def build_evaluator(
  task_configs: Sequence[Mapping], tokenizer, *, max_len: int, batch_size: int, **kwargs
) -> MultipleChoiceEvaluator:
  """From config entries {name, source, format, split='validation', data_dir=None, limit=None}."""
  tasks = {}
  for entry in task_configs:
    entry = dict(entry)
    unknown = sorted(set(entry) - {'name', 'source', 'format', 'split', 'data_dir', 'limit'})
    if unknown or not {'name', 'source', 'format'} <= set(entry):
      raise ValueError(
        f'multiple-choice task entry {entry} needs name, source, format (and optionally split, '
        f'data_dir, limit); unknown keys: {unknown}'
      )
    name = entry.pop('name')
    if name in tasks:
      raise ValueError(f'multiple-choice task {name!r} is listed twice')
    tasks[name] = load_examples(
      entry.pop('source'),
      entry.pop('format'),
      split=entry.get('split', 'validation'),
      data_dir=entry.get('data_dir') or None,
      limit=entry.get('limit'),
    )
  return MultipleChoiceEvaluator(tasks, tokenizer, max_len=max_len, batch_size=batch_size, **kwargs)


@register_evaluator('multiple_choice')
def build(options: dict, ctx) -> MultipleChoiceEvaluator | None:
  """Zero-shot accuracy. Options: tasks (list of {name, source, format, ...}, `build_evaluator`;
  none: nothing to evaluate), max_len, batch_size."""
  if not options['tasks']:
    return None
  return build_evaluator(
    [dict(t) for t in options['tasks']],
    ctx.tokenizer,
    max_len=options['max_len'],
    batch_size=options['batch_size'],
    mesh=ctx.mesh,
    rules=ctx.rules,
  )
