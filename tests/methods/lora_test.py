"""Every post-training method trains LoRA adapters through the trainer: a few steps each, finite
losses, the base untouched, and the frozen reference of DPO-family and GRPO losses is the base
(no reference params are passed: at the first step the policy equals it)."""

import math
import types

import jax
import ml_collections
import numpy as np
import pytest

from kuaijax.data import sequences
from kuaijax.methods import get_method
from kuaijax.models import lora
from kuaijax.stages import parrot as parrot_stages
from kuaijax.stages import rlmec as rlmec_stages
from kuaijax.stages.roles import role_config
from kuaijax.train import lm_task
from kuaijax.train.trainer import train
from tests.conftest import tiny_lm_pipeline_config
from tests.methods import parrot_test
from tests.methods.methods_test import (
  CTX,
  TOK,
  dataset,
  pair_records,
  records,
  sample_record,
  wrong,
)


def lora_config():
  pipeline = tiny_lm_pipeline_config(steps=3, batch_size=4, checkpoint_every=100, log_every=1)
  pipeline.optimizer.update(lr=3e-3, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.0)
  with pipeline.unlocked():
    pipeline.models.policy.lora = dict(rank=4, alpha=8.0, dropout=0.1)
  config = role_config(pipeline, 'policy')
  config.lock()
  return config


def capo_pairs():
  written = {}
  stage = types.SimpleNamespace(
    name='pairs',
    block=ml_collections.ConfigDict(dict(data='task:train', kinds=('neglect',), limit=4)),
    records=lambda ref: parrot_test.RECORDS,
    write_data=lambda rs: written.setdefault('pairs', rs),
  )
  parrot_stages.capo_pairs_stage(stage)
  return written['pairs']


def rft_records():
  return [sample_record(i, r, r['solution'], True) for i, r in enumerate(records(4))]


def rlmec_records():
  samples = []
  for i, r in enumerate(records(4)):
    text = wrong(r['solution']) if i % 2 else r['solution']
    tokens = sequences.completion_ids(TOK, text)
    sample = sample_record(i, r, text, not i % 2, tokens)
    samples.append({**sample, 'logprobs': [-1.0] * len(tokens)})  # the sampler's log-probs
  return rlmec_stages.minimal_edit_records(samples, TOK)[0]


CASES = {  # name -> (context, options, records)
  'sft': (CTX, {}, lambda: records(4)),
  'rft': (CTX, {}, rft_records),
  'dpo': (CTX, dict(loss=dict(beta=0.5), reference='model'), lambda: pair_records(4)),
  'capo': (CTX, dict(reference='model'), lambda: pair_records(4)),
  'd2po': (CTX, dict(reference='model'), lambda: pair_records(4)),
  'grpo': (CTX, dict(group_size=4, loss=dict(kl_coef=0.01), offline_injection=True), None),
  'chat_sft': (parrot_test._ctx(), {}, lambda: parrot_test.RECORDS[:4]),
  'chat_capo': (parrot_test._ctx(), dict(loss=dict(beta=0.1), reference='model'), capo_pairs),
  'rlmec': (CTX, dict(loss=dict(eps=0.3, lam=1.0)), rlmec_records),
}


@pytest.mark.parametrize('name', list(CASES))
def test_lora_steps_of_every_method(tmp_path, name):
  ctx, options, make_records = CASES[name]
  method = get_method(name)(ctx, **options)
  examples, _ = method.examples(make_records() if make_records else records(2))
  config = lora_config()
  result = train(
    config,
    str(tmp_path),
    model_factory=lm_task.model_factory(config.model, config.model_lora),
    loss_fn=method.loss_fn,
    train_dataset=dataset(examples, 4),
    prepare_batch=method.rollout,
    count_tokens=method.count_tokens,
  )
  assert result.step == 3 and all(np.isfinite(h['loss']) for h in result.history)
  adapters, base = lora.split_params(result.params)
  assert jax.tree.leaves(adapters) and max(float(abs(b).max()) for b in _bs(adapters)) > 0
  if name in ('dpo', 'capo', 'd2po', 'chat_capo'):  # reference = base = the fresh policy at step 1
    assert result.history[0]['loss'] == pytest.approx(math.log(2), abs=1e-5)


def _bs(adapters):
  return [leaf for path, leaf in jax.tree.leaves_with_path(adapters) if path[-1].key == 'b']
