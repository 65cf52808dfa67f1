"""RLMEC: token-level RL with a minimum-editing constraint, and the stages that feed it.

Records (one per policy sample): `prompt` text, the sample `completion_tokens` with the sampling
policy's `logprobs`, `correct`, the teacher's `rewrite_tokens` (ỹ) and `keep_probs` p_t per sample
token (the generative reward model's probability that the token survives the rewrite). The method
turns them into the features of `kuaijax.losses.rl.rlmec_loss` ([seq_len] rows, target-aligned):
  rewards            r_t = clip(p_t - 0.5, -0.1, 0) for wrong samples, clip(p_t - 0.5, 0, 0.5) for
                     correct ones (`rl.rlmec_token_rewards`);
  imitation_weights  over ỹ: 1.0 on edited tokens, 0.5 elsewhere (`kuaijax.data.edits`); 0.5 on
                     every token of a correct sample (its own rewrite).
`<stage>.loss` is forwarded to `rlmec_loss` (eps, lam). Any teacher that writes these records plugs
in; `kuaijax.stages.rlmec` has the exact program teacher of kj_arith and the paper's trained
generative reward model (GRM) pipeline.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from kuaijax.data import edits, sequences
from kuaijax.losses import rl
from kuaijax.methods.base import Method, register_method
from kuaijax.sampling import score


def _aligned(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Per-completion-token values placed at the mask's positions of a [seq_len] row."""
  out = np.zeros(mask.shape, np.float32)
  out[mask > 0] = values[: int(mask.sum())]
  return out


def rlmec_example(
  prompt, sample, sample_logps, rewrite, keep_probs, correct: bool, *, seq_len: int, pad_id: int
) -> dict | None:
  """RLMEC features of one sample (tokens incl. stop token) and its rewrite; None if too long."""
  sample, rewrite = np.asarray(sample, np.int32), np.asarray(rewrite, np.int32)
  if len(sample_logps) != len(sample) or len(keep_probs) != len(sample):
    raise ValueError(
      f'{len(sample_logps)} log-probs and {len(keep_probs)} keep-probs for {len(sample)} tokens'
    )
  y = sequences.encode_sequence(prompt, sample, seq_len, pad_id)
  ry = sequences.encode_sequence(prompt, rewrite, seq_len, pad_id)
  if y is None or ry is None:
    return None
  if correct:
    weights = np.full(len(rewrite), 0.5, np.float32)
  else:
    weights = np.asarray(edits.imitation_weights(sample, rewrite), np.float32)
  keep = np.asarray(keep_probs, np.float32)
  rewards = np.asarray(
    rl.rlmec_token_rewards(keep[None], jnp.asarray([correct]), np.ones((1, len(keep)))), np.float32
  )[0]
  (tokens, mask), (rewrite_tokens, rewrite_mask) = y, ry
  return {
    'tokens': tokens,
    'mask': mask,
    'old_logps': _aligned(np.asarray(sample_logps, np.float32), mask),
    'rewards': _aligned(rewards, mask),
    'rewrite_tokens': rewrite_tokens,
    'rewrite_mask': rewrite_mask,
    'imitation_weights': _aligned(weights, rewrite_mask),
  }


@register_method('rlmec')
class RLMEC(Method):
  token_fields = ('tokens', 'rewrite_tokens')

  def examples(self, records):
    tok, out, too_long = self.ctx.tokenizer, [], 0
    for r in records:
      example = rlmec_example(
        sequences.prompt_ids(tok, r['prompt']),
        r['completion_tokens'],
        r['logprobs'],
        r['rewrite_tokens'],
        r['keep_probs'],
        bool(r['correct']),
        seq_len=self.ctx.seq_len,
        pad_id=tok.pad_id,
      )
      if example is None:
        too_long += 1
      else:
        out.append(example)
    return out, {'examples': len(out), 'too_long': too_long}

  def loss_fn(self, model, batch, rng, frozen=None):
    """Scores y and ỹ in one forward."""
    del rng, frozen
    tokens = jnp.concatenate([batch['tokens'], batch['rewrite_tokens']])
    mask = jnp.concatenate([batch['mask'], batch['rewrite_mask']])
    token_logps, _ = score(model, tokens, loss_mask=mask)
    logps, imitation_logps = jnp.split(token_logps, 2)
    return rl.rlmec_loss(
      logps,
      batch['old_logps'],
      batch['rewards'],
      batch['mask'],
      imitation_logps,
      batch['imitation_weights'],
      batch['rewrite_mask'],
      **self.loss,
    )
