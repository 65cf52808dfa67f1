"""Held-out CaPO pairs: does the policy prefer the right answer to a context error, and has CaPO
moved that preference away from its reference? A measure of the mechanism that needs no correct
generation (where kj_dialog-8 exact match is 0% for every policy, accuracy cannot show it).

`kj_dialog_pairs`: the CaPO pairs (`dialog.capo_pairs`, the code that builds the training pairs) of
the sessions of a held-out kj_dialog split ('validation' by default; CaPO trains on pairs from train
sessions or from Parrot-Ask sessions that continue train openings, and kj_dialog-8 evaluates on
'test'; 'train' is refused). Each pair is laid out and scored as the `chat_capo` method scores it in
training (`data.chat.chat_pair_example`, `sampling.pair_token_logps`): the history and the
query as the prompt (cut from the oldest exchanges to seq_len), and the summed log-prob of the final
answer's tokens (its content, turn ending and eos), not length-normalised, as `capo_loss` (sigmoid
DPO) takes it. With m = log pi(chosen) - log pi(rejected) and, against the reference policy, the
implicit-reward margin r = beta (log pi(chosen) - log ref(chosen)) - beta (log pi(rejected) -
log ref(rejected)), per negative kind and over every kind together ('all'):

  pairs/<kind>/preference_accuracy  fraction of pairs with m > 0
  pairs/<kind>/margin               mean m (nats)
  pairs/<kind>/reward_accuracy      fraction of pairs with r > 0 (a tie is not a win, as DPO's
                                    rewards/accuracies)
  pairs/<kind>/reward_margin        mean r
  pairs/<kind>/count                pairs scored (a kind without pairs reports only its count)
plus pairs/too_long (pairs left out: the query and the answer alone exceed seq_len) and
pairs/truncated_from_oldest.

The reference (option `reference`) is a stage of the pipeline, found through
`registry.current_stage()` (the stages of the same run, i.e. seed, finished before the evaluated
one) and loaded with `EvalContext.load_model`, or a checkpoint path / Hugging Face folder. When the
evaluated stage is the reference itself, the reference log-probs are the policy's own: every r is 0
and reward accuracy 0. When the reference is not available (the stage has not run yet or is not in
the run, no pipeline, or reference='') the reward metrics are left out and a warning logged.
Reference log-probs are computed once per reference checkpoint and kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np
from absl import logging

from kuaijax import parallel, sampling
from kuaijax.data import chat, dialog, sequences, tasks
from kuaijax.evals import registry
from kuaijax.evals.base import Evaluator
from kuaijax.evals.registry import register_evaluator
from kuaijax.jit_cache import ParamsJit
from kuaijax.losses import preference as pref

ALL = 'all'


def _pair_logps(model, batch):
  """Summed log-probs of both sides of every pair, exactly as the CaPO loss sums them."""
  chosen, rejected = sampling.pair_token_logps(model, batch)
  return (
    pref.sequence_logps(chosen, batch['chosen_mask'])[0],
    pref.sequence_logps(rejected, batch['rejected_mask'])[0],
  )


_pair_logps_jit = ParamsJit(_pair_logps)


def session_pairs(
  sessions: Sequence[Sequence[dialog.Turn]], kinds: Sequence[str] = dialog.NEGATIVE_KINDS
) -> list[dict]:
  """`dialog.capo_pairs` of every session, each record tagged with its session's index."""
  return [
    {**pair, 'session': index}
    for index, session in enumerate(sessions)
    for pair in dialog.capo_pairs([session], kinds=kinds)[0]
  ]


def pair_metrics(
  negative: Sequence[str],
  chosen,
  rejected,
  ref_chosen=None,
  ref_rejected=None,
  *,
  beta: float,
  kinds: Sequence[str] = dialog.NEGATIVE_KINDS,
) -> dict:
  """The module docstring's metrics from per-pair summed log-probs (reward metrics only with a
  reference); `negative` is each pair's kind."""
  negative = np.asarray(negative)
  chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
  margin = chosen - rejected
  reward = None
  if ref_chosen is not None:
    ref_chosen, ref_rejected = (np.asarray(x, np.float64) for x in (ref_chosen, ref_rejected))
    reward = beta * (chosen - ref_chosen) - beta * (rejected - ref_rejected)
  out = {}
  for kind in (*kinds, ALL):
    sel = np.ones(len(negative), bool) if kind == ALL else negative == kind
    key = f'pairs/{kind}'
    out[f'{key}/count'] = int(sel.sum())
    if not sel.any():
      continue
    out[f'{key}/preference_accuracy'] = float((margin[sel] > 0).mean())
    out[f'{key}/margin'] = float(margin[sel].mean())
    if reward is not None:
      out[f'{key}/reward_accuracy'] = float((reward[sel] > 0).mean())
      out[f'{key}/reward_margin'] = float(reward[sel].mean())
  return out


class PairsEvaluator(Evaluator):
  """The metrics of the module docstring on CaPO pair records ({'messages' ending with the query,
  'chosen', 'rejected', 'negative'}).

  reference: '' (no reward metrics), a stage name (resolved in `registry.current_stage()`) or a
  checkpoint path / Hugging Face folder (loaded as the model role `reference_model`);
  load_model(path, role) -> (graphdef, params), the pipeline's `EvalContext.load_model`.
  """

  def __init__(
    self,
    tokenizer,
    pairs: Sequence[dict],
    *,
    seq_len: int,
    batch_size: int = 32,
    beta: float = 0.1,
    kinds: Sequence[str] = dialog.NEGATIVE_KINDS,
    reference: str = '',
    reference_model: str = 'policy',
    load_model: Callable[[str, str], tuple] | None = None,
  ):
    bad = sorted(set(kinds) - set(dialog.NEGATIVE_KINDS))
    if bad or not kinds:
      raise ValueError(
        f'kj_dialog_pairs: kinds {list(kinds)} not a subset of {dialog.NEGATIVE_KINDS}'
      )
    if not beta > 0:
      raise ValueError(f'kj_dialog_pairs: beta must be > 0, got {beta}')
    if batch_size < 1:
      raise ValueError(f'kj_dialog_pairs: batch_size must be >= 1, got {batch_size}')
    self.examples, negative, too_long, truncated = [], [], 0, 0
    for record in pairs:
      if record['negative'] not in kinds:
        continue
      example, dropped = chat.chat_pair_example(record, tokenizer, seq_len)
      if example is None:
        too_long += 1
        continue
      truncated += dropped > 0
      self.examples.append({k: example[k] for k in sequences.PAIR_FIELDS})
      negative.append(record['negative'])
    if not self.examples:
      raise ValueError(f'kj_dialog_pairs: no pair to score ({too_long} too long for seq_len)')
    self.negative, self.kinds = np.asarray(negative), tuple(kinds)
    self.counts = {'pairs/too_long': too_long, 'pairs/truncated_from_oldest': truncated}
    self.batch_size, self.beta = batch_size, beta
    self.reference, self.reference_model, self.load_model = reference, reference_model, load_model
    self._reference_logps: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    self._warned: set[str] = set()

  def logps(self, graphdef, params) -> tuple[np.ndarray, np.ndarray]:
    """(chosen [N], rejected [N]) summed answer log-probs of every pair under the model."""
    chosen, rejected = [], []
    size = self.batch_size
    for start in range(0, len(self.examples), size):
      chunk = self.examples[start : start + size]
      batch = sequences.stack(chunk + [chunk[0]] * (size - len(chunk)))
      c, r = parallel.host_value(_pair_logps_jit(graphdef, params, batch))
      chosen.append(np.asarray(c)[: len(chunk)])
      rejected.append(np.asarray(r)[: len(chunk)])
    return np.concatenate(chosen), np.concatenate(rejected)

  def _warn(self, why: str) -> None:
    if why not in self._warned:
      self._warned.add(why)
      logging.warning('kj_dialog_pairs: no reward metrics: %s', why)

  def reference_source(self) -> tuple[str, str] | str | None:
    """(path, role) of the reference, the string 'self' when the evaluated stage is the
    reference, or None (no reference now; a warning says why)."""
    if not self.reference:
      return None
    scope = registry.current_stage()
    if scope is not None and scope.name == self.reference:
      return 'self'
    if scope is not None and self.reference in scope.params:
      source = tuple(scope.params[self.reference])
    elif os.path.isdir(self.reference):
      source = (self.reference, self.reference_model)
    else:
      where = f'of stage {scope.name}' if scope else 'outside a pipeline stage'
      self._warn(
        f'reference {self.reference!r} is not a stage finished before this evaluation '
        f'({where}) nor a checkpoint folder'
      )
      return None
    if self.load_model is None:
      self._warn(f'reference {self.reference!r} needs a pipeline that loads models')
      return None
    return source

  def evaluate(self, graphdef, params, step: int | None = None) -> dict:
    del step
    chosen, rejected = self.logps(graphdef, params)
    source = self.reference_source()
    if source == 'self':
      ref = (chosen, rejected)
    elif source is not None:
      if source not in self._reference_logps:
        self._reference_logps[source] = self.logps(*self.load_model(*source))
      ref = self._reference_logps[source]
    else:
      ref = (None, None)
    out = pair_metrics(self.negative, chosen, rejected, *ref, beta=self.beta, kinds=self.kinds)
    return {**out, **self.counts}


@register_evaluator('kj_dialog_pairs')
def build(options: dict, ctx) -> PairsEvaluator:
  """CaPO preference and implicit-reward accuracy on held-out kj_dialog pairs (module docstring).
  Options: split (a held-out kj_dialog split: 'validation' or 'test'), sessions (the first of the
  split; 0 = all), kinds (negative kinds), reference ('' | a stage name | a checkpoint path),
  reference_model (the model role of a checkpoint path; default 'policy'), beta, batch_size (pairs
  per forward); seq_len from config.data."""
  split = options.get('split', 'validation')
  if split not in dialog.SPLIT_SEEDS or split == 'train':
    held_out = sorted(s for s in dialog.SPLIT_SEEDS if s != 'train')
    raise ValueError(f'kj_dialog_pairs: split={split!r} must be a held-out split {held_out}')
  kinds = tuple(options.get('kinds', dialog.NEGATIVE_KINDS))
  sessions = tasks.load_dialog_sessions(
    split, limit=options['sessions'], data_dir=ctx.data.get('data_dir', '')
  )
  return PairsEvaluator(
    ctx.tokenizer,
    session_pairs(sessions, kinds),
    seq_len=ctx.data.seq_len,
    batch_size=options.get('batch_size', 32),
    beta=options.get('beta', 0.1),
    kinds=kinds,
    reference=options.get('reference', ''),
    reference_model=options.get('reference_model', 'policy'),
    load_model=ctx.load_model,
  )
