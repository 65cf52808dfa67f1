"""Trainer: resume equality after a real SIGKILL, grad accumulation, non-finite guard, checkpoint
safety, init_from.

`python -m tests.train.trainer_test WORKDIR` trains `kill_config()` on the synthetic batches into
WORKDIR: the process the kill test SIGKILLs.
"""

import os
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kuaijax.losses.lm import lm_loss
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train import lm_task
from kuaijax.train.metrics import read_metrics
from kuaijax.train.trainer import train
from tests import sigkill
from tests.conftest import tiny_lm_config

SEQ = 16  # the synthetic batches ignore data.seq_len


class Batches(grain.MapDataset):
  """Deterministic random token batches; poisons the loss at `nan_at`."""

  def __init__(self, batch, nan_at=None, vocab=100):
    super().__init__()
    self.batch, self.nan_at, self.vocab = batch, nan_at, vocab

  def __len__(self):
    return 10_000

  def __getitem__(self, index):
    rng = np.random.default_rng(index)
    tokens = rng.integers(3, self.vocab, (self.batch, SEQ + 1), dtype=np.int32)
    shape = (self.batch, SEQ)
    return {
      'inputs': tokens[:, :-1],
      'targets': tokens[:, 1:],
      'segment_ids': np.ones(shape, np.int32),
      'positions': np.broadcast_to(np.arange(SEQ, dtype=np.int32), shape).copy(),
      'loss_mask': np.ones(shape, np.float32),
      'poison': np.full((self.batch,), float(index == self.nan_at), np.float32),
    }


def dataset(batch, **kwargs):
  return Batches(batch, **kwargs).to_iter_dataset(grain.ReadOptions(num_threads=0))


def loss_fn(model, batch, rng, frozen=None):
  del rng, frozen
  logits, _ = model(batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids'])
  loss, metrics = lm_loss(logits, batch['targets'], batch['loss_mask'])
  poison = jnp.where(batch['poison'].max() > 0, jnp.nan, 0.0)
  return loss + poison, metrics


def run(workdir, config=None, **kwargs):
  config = config or tiny_lm_config()
  micro = config.train.batch_size // config.train.grad_accum
  kwargs.setdefault('train_dataset', dataset(micro))
  return train(
    config,
    str(workdir),
    model_factory=lm_task.model_factory(config.model),
    loss_fn=loss_fn,
    **kwargs,
  )


def assert_trees_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


KILL_STEPS = 24


def kill_config():
  """24 steps, each logged, a checkpoint every 2 written in the background (as real runs do)."""
  return tiny_lm_config(
    steps=KILL_STEPS, log_every=1, checkpoint_every=2, eval_every=100, async_checkpoint=True
  )


def test_sigkill_at_a_random_point_then_resume_equals_uninterrupted_run(tmp_path):
  """A training process SIGKILLed at a random point (mid-step, or while a checkpoint is being
  written), then the same run again: it continues from the last finished checkpoint (a partly
  written one is ignored) and ends with the parameters and metrics of an uninterrupted run, bit
  for bit."""
  straight = run(tmp_path / 'a', kill_config())
  # Kill points in the first third: the run is still going when the kill lands.
  point = sigkill.draw_kill_point(
    logged=list(range(1, 9)), checkpointing=[2, 4, 6, 8], max_delay=0.05
  )
  killed = tmp_path / 'b'
  command = sigkill.python('tests.train.trainer_test', killed)
  kill = sigkill.kill_at(point, command, killed, env=dict(os.environ))
  assert kill.killed and KILL_STEPS not in kill.checkpoints, kill
  latest = max(sigkill.checkpoint_folders(killed)[0], default=0)  # the last finished checkpoint
  resumed = run(killed, kill_config())
  assert [r['step'] for r in resumed.history] == list(range(latest + 1, KILL_STEPS + 1))
  assert resumed.step == straight.step == KILL_STEPS
  assert_trees_equal(straight.params, resumed.params)
  strip = lambda rs: [{k: v for k, v in r.items() if k != 'tokens_per_s'} for r in rs]
  assert strip(read_metrics(tmp_path / 'a')) == strip(read_metrics(killed))
  for name in ('config.json', 'metrics.jsonl', 'tensorboard'):
    assert os.path.exists(killed / name)


def test_gradient_accumulation_matches_full_batch(tmp_path):
  full = run(tmp_path / 'full', tiny_lm_config(steps=2, grad_accum=1))
  accum = run(
    tmp_path / 'accum',
    tiny_lm_config(steps=2, grad_accum=2),
    train_dataset=grain.MapDataset.range(10_000)
    .map(lambda i: jax.tree.map(lambda x: x[(i % 2) * 2 : (i % 2) * 2 + 2], Batches(4)[i // 2]))
    .to_iter_dataset(grain.ReadOptions(num_threads=0)),
  )
  assert full.history[0]['loss'] == pytest.approx(accum.history[0]['loss'], rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6), full.params, accum.params)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  with pytest.raises(FloatingPointError, match=r'step 6 .*last good checkpoint: step 4'):
    run(tmp_path, train_dataset=dataset(4, nan_at=5))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), keep=3, save_every=4)
  assert checkpointer.all_steps() == [4]


def _snapshot(directory):
  return {
    os.path.join(root, f): os.stat(os.path.join(root, f)).st_mtime_ns
    for root, _, files in os.walk(directory)
    for f in files
  }


def test_workdir_of_a_different_model_is_refused_untouched(tmp_path):
  run(tmp_path, tiny_lm_config(steps=4))
  before = _snapshot(tmp_path / 'checkpoints')
  other = tiny_lm_config(steps=8)
  other.model.d_ff = 96
  with pytest.raises(ckpt_lib.CheckpointError, match=r'different model: .*mlp.*w1.*\[32, 64'):
    run(tmp_path, other)
  assert _snapshot(tmp_path / 'checkpoints') == before


def test_corrupt_checkpoint_is_reported_and_left_in_place(tmp_path):
  run(tmp_path, tiny_lm_config(steps=4))
  state_dir = tmp_path / 'checkpoints' / '4' / 'state'
  for root, _, files in os.walk(state_dir):
    for f in files:
      if 'manifest' in f or f.endswith('.ocdbt') or f.startswith('d'):
        with open(os.path.join(root, f), 'wb') as fh:
          fh.write(b'garbage')
  with pytest.raises(ckpt_lib.CheckpointError, match=r'checkpoints/4 could not be read'):
    run(tmp_path, tiny_lm_config(steps=8))
  assert state_dir.exists()


def test_init_from_loads_params_of_another_run(tmp_path):
  first = run(tmp_path / 'first', tiny_lm_config(steps=4))
  config = tiny_lm_config(steps=1)
  config.init_from = str(tmp_path / 'first')
  config.optimizer.lr = 1e-9  # one near-zero step: params must still equal the loaded ones
  second = run(tmp_path / 'second', config)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), first.params, second.params
  )
  config.init_from = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='init_from=.*missing'):
    run(tmp_path / 'third', config)


def test_eight_devices_match_one_device(tmp_path):
  one = run(tmp_path / 'one', tiny_lm_config(steps=2, batch_size=8))
  config = tiny_lm_config(steps=2, batch_size=8)
  config.parallel.num_devices = 0
  config.parallel.mesh.update(data=2, fsdp=2, tensor=2)
  eight = run(tmp_path / 'eight', config)
  assert len(jax.devices()) == 8
  assert abs(one.history[0]['loss'] - eight.history[0]['loss']) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), one.params, eight.params)
  wq = eight.params['layers'][0]['attn']['wq']
  assert wq.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor', None)


@pytest.mark.parametrize(
  'field, value, message',
  [
    ('train.batch_size', 6, 'batch_size=6 must be a positive multiple of train.grad_accum=4'),
    ('train.steps', 0, 'train.steps must be > 0'),
    ('optimizer.lr', -1.0, 'optimizer.lr must be > 0'),
    ('parallel.mesh.tensor', 3, 'needs a multiple of 3 devices'),
  ],
)
def test_bad_train_configs(tmp_path, field, value, message):
  config = tiny_lm_config(grad_accum=4 if field == 'train.batch_size' else 1)
  section, *rest = field.split('.')
  target = config[section]
  for key in rest[:-1]:
    target = target[key]
  target[rest[-1]] = value
  with pytest.raises(ValueError, match=message):
    run(tmp_path, config, train_dataset=dataset(4))
  assert not os.path.exists(tmp_path / 'checkpoints' / '1')


if __name__ == '__main__':
  run(sys.argv[1], kill_config())
