"""The pairwise preference family: DPO (six loss types), CaPO, D2PO and SPPD.

Records (one per pair): `prompt` text; `chosen` / `rejected` as stored tokens (`chosen_tokens`, a
model's own sample) or text; optional `prefix_tokens`, completion tokens both sides share after the
prompt (SPPD's step pairs: the steps before the two sibling steps); SPPD also `chosen_value` /
`rejected_value` (the values of the states after each step). Each side becomes a row in the shared
layout (`kuaijax.data.sequences`); the objective is the method's name and `<stage>.loss` is
forwarded to its loss function in `kuaijax.losses.preference` (dpo: loss_type, beta,
label_smoothing, simpo_gamma; capo: beta, label_smoothing; d2po: gamma, beta; sppd: beta, gamma).

Reference log-probs (`reference` option): 'precomputed' scores every pair once with the reference
before training; 'model' passes the reference params as the trainer's `frozen` state and scores
every step (same loss, tested). DPO with loss_type 'simpo' needs no reference.

`pair_records` turns a `sample` data set into (correct, wrong) pairs of the same prompt (the
`pairs` stage of `kuaijax.stages.preference`).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np

from kuaijax import parallel
from kuaijax.config_lib import check_choice
from kuaijax.data import sequences
from kuaijax.jit_cache import ParamsJit
from kuaijax.losses import preference as pref
from kuaijax.methods.base import Method, reference_model, register_method, tokens_or_text
from kuaijax.sampling import pair_token_logps

REFERENCE_SOURCES = ('precomputed', 'model')
_reference_logps = ParamsJit(pair_token_logps)


class _Pairwise(Method):
  """Shared by the family: pair examples, reference handling, one forward for both sides."""

  extra_fields: tuple[str, ...] = ()
  token_fields = ('chosen_tokens', 'rejected_tokens')

  def __init__(self, ctx, *, loss=None, reference: str = 'precomputed'):
    super().__init__(ctx, loss=loss)
    check_choice(f'{self.name} reference', reference, REFERENCE_SOURCES)
    self.reference = reference

  @property
  def needs_reference(self):
    return True

  @property
  def frozen_reference(self):
    return self.needs_reference and self.reference == 'model'

  def examples(self, records):
    tok, out, too_long = self.ctx.tokenizer, [], 0
    for r in records:
      prompt = sequences.prompt_ids(tok, r['prompt'])
      if 'prefix_tokens' in r:
        prompt = np.concatenate([prompt, r['prefix_tokens']]).astype(np.int32)
      chosen, rejected = (tokens_or_text(r, side, tok) for side in ('chosen', 'rejected'))
      example = sequences.pair_example(prompt, chosen, rejected, self.ctx.seq_len, tok.pad_id)
      if example is None:
        too_long += 1
        continue
      for field in self.extra_fields:
        example[field] = np.float32(r[field])
      out.append(example)
    return out, {'pairs': len(out), 'too_long': too_long}

  def prepare(self, examples, graphdef, params):
    if self.frozen_reference or not self.needs_reference or not examples:
      return examples
    batch_size = 64
    out = []
    for start in range(0, len(examples), batch_size):
      chunk = examples[start : start + batch_size]
      padded = chunk + [chunk[0]] * (batch_size - len(chunk))
      batch = sequences.stack([{k: e[k] for k in sequences.PAIR_FIELDS} for e in padded])
      chosen, rejected = parallel.host_value(_reference_logps(graphdef, params, batch))
      for i, e in enumerate(chunk):
        out.append({**e, 'ref_chosen_logps': chosen[i], 'ref_rejected_logps': rejected[i]})
    return out

  def objective(self, batch, chosen, rejected, ref_chosen, ref_rejected):
    raise NotImplementedError

  def loss_fn(self, model, batch, rng, frozen=None):
    del rng
    chosen, rejected = pair_token_logps(model, batch)
    if not self.needs_reference:
      ref_chosen = ref_rejected = None
    elif self.frozen_reference:
      ref_model = reference_model(model, frozen)
      ref_chosen, ref_rejected = jax.lax.stop_gradient(pair_token_logps(ref_model, batch))
    else:
      ref_chosen, ref_rejected = batch['ref_chosen_logps'], batch['ref_rejected_logps']
    return self.objective(batch, chosen, rejected, ref_chosen, ref_rejected)


def _sums(batch, chosen, rejected, ref_chosen, ref_rejected):
  cm, rm = batch['chosen_mask'], batch['rejected_mask']
  pc, lc = pref.sequence_logps(chosen, cm)
  pr, lr = pref.sequence_logps(rejected, rm)
  rc = None if ref_chosen is None else pref.sequence_logps(ref_chosen, cm)[0]
  rr = None if ref_rejected is None else pref.sequence_logps(ref_rejected, rm)[0]
  return pc, pr, rc, rr, lc, lr


@register_method('dpo')
class DPO(_Pairwise):
  """`dpo_loss` by `loss.loss_type` (sigmoid, hinge, ipo, robust, sigmoid_norm, simpo)."""

  @property
  def needs_reference(self):
    return self.loss.get('loss_type', 'sigmoid') != 'simpo'

  def objective(self, batch, *logps):
    pc, pr, rc, rr, lc, lr = _sums(batch, *logps)
    return pref.dpo_loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, **self.loss)


@register_method('capo')
class CaPO(_Pairwise):
  """`capo_loss`: sigmoid DPO on context-aware pairs (the data makes it CaPO)."""

  def objective(self, batch, *logps):
    pc, pr, rc, rr, _, _ = _sums(batch, *logps)
    return pref.capo_loss(pc, pr, rc, rr, **self.loss)


@register_method('d2po')
class D2PO(_Pairwise):
  """`d2po_loss`: sigmoid DPO on temporally decayed per-token log-probs."""

  def objective(self, batch, chosen, rejected, ref_chosen, ref_rejected):
    cm, rm = batch['chosen_mask'], batch['rejected_mask']
    return pref.d2po_loss(chosen, rejected, ref_chosen, ref_rejected, cm, rm, **self.loss)


@register_method('sppd')
class SPPD(_Pairwise):
  """`sppd_loss`: step-level DPO with a value margin (records carry chosen/rejected_value)."""

  extra_fields = ('chosen_value', 'rejected_value')

  def objective(self, batch, chosen, rejected, ref_chosen, ref_rejected):
    cm, rm = batch['chosen_mask'], batch['rejected_mask']
    cv, rv = batch['chosen_value'], batch['rejected_value']
    return pref.sppd_loss(chosen, rejected, ref_chosen, ref_rejected, cm, rm, cv, rv, **self.loss)


# ----------------------------------------------------------------------------- pairs of samples


def pair_records(
  samples: Sequence[dict], *, max_pairs_per_prompt: int = 1, gold_fallback: bool = False
) -> tuple[list[dict], dict]:
  """(correct, wrong) pairs of a policy's own samples of the same prompt (the RLMEC paper's DPO).

  For each prompt with at least one correct and one wrong distinct sample, the first
  `max_pairs_per_prompt` correct and wrong samples are zipped into pairs. With `gold_fallback`, a
  prompt with wrong samples only pairs them with its gold completion (`gold` text) as the chosen
  side (for policies too weak to produce correct samples). Returns (pair records, stats); the stats
  include the mean chosen and rejected lengths (tokens) and the fraction of sampled pairs whose
  chosen side is longer.
  """
  by_prompt: dict[int, list] = {}
  for s in samples:
    by_prompt.setdefault(s['index'], []).append(s)
  pairs, mixed, gold = [], 0, 0
  for index, group in sorted(by_prompt.items()):
    seen, right, wrong = set(), [], []
    for s in group:
      key = tuple(s['completion_tokens'])
      if key not in seen:
        seen.add(key)
        (right if s['correct'] else wrong).append(s)
    chosen = [{'chosen_tokens': c['completion_tokens']} for c in right]
    if not chosen and wrong and gold_fallback:
      chosen, gold = [{'chosen': group[0]['gold']}] * len(wrong), gold + 1
    if not chosen or not wrong:
      continue
    mixed += bool(right)
    for c, w in list(zip(chosen, wrong))[:max_pairs_per_prompt]:
      pairs.append(
        {'index': index, 'prompt': w['prompt'], **c, 'rejected_tokens': w['completion_tokens']}
      )
  stats = {
    'prompts': len(by_prompt),
    'mixed_prompts': mixed,
    'gold_chosen_prompts': gold,
    'pairs': len(pairs),
  }
  sampled = [p for p in pairs if 'chosen_tokens' in p]  # the length bias a DPO-family loss sees
  if sampled:
    chosen = np.array([len(p['chosen_tokens']) for p in sampled], np.float64)
    rejected = np.array([len(p['rejected_tokens']) for p in sampled], np.float64)
    stats.update(
      chosen_length=float(chosen.mean()),
      rejected_length=float(rejected.mean()),
      chosen_longer=float((chosen > rejected).mean()),
    )
  return pairs, stats
