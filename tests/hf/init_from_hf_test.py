"""`config.init_from_hf`: the trainer's fresh-run params come from a Hugging Face folder."""

import jax
import ml_collections
import numpy as np
import pytest

from kuaijax.config_lib import trainer_config
from kuaijax.hf import model_io
from kuaijax.models.transformer import TransformerConfig
from kuaijax.train import lm_task
from kuaijax.train.metrics import read_metrics
from kuaijax.train.trainer import initial_params, param_layout, train
from tests.conftest import tiny_lm_config
from tests.hf.model_io_errors_test import _params, random_model

MODEL = dict(vocab_size=259, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64)
MOE = dict(
  qk_norm=True,
  mlp='moe',
  mlp_options=dict(num_experts=4, routing='top_k', k=2, renormalize=True, expert_d_ff=16),
)


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('qwen3_moe'))
  model = random_model(TransformerConfig(**MODEL, **MOE), seed=5)
  model_io.save_model(model, out)
  return out, _params(model)


def _config(path, **model_changes):
  config = trainer_config()
  config.model = ml_collections.ConfigDict(model_io.model_section(path))
  config.init_from_hf = path
  config.parallel.num_devices = 2
  for key, value in model_changes.items():
    if key == 'mlp_options':
      config.model.mlp_options.update(value)
    else:
      config.model[key] = value
  return config


def test_initial_params_come_from_the_folder(folder):
  path, params = folder
  # Continued training of the pretrained top-2 MoE with dynamic Top-P routing is allowed.
  config = _config(path, mlp_options=dict(routing='top_p', p=0.5, k_max=4))
  layout = param_layout(config, lm_task.model_factory(config.model))
  loaded = initial_params(config, layout.abstract_params, layout.shardings, None)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), params)


@pytest.mark.parametrize(
  'change, message',
  [
    (dict(norm_eps=1e-5), 'model.norm_eps=1e-05 but the checkpoint has 1e-06'),
    (dict(mlp_options=dict(expert_d_ff=8)), 'model.mlp_options.expert_d_ff=8'),
  ],
)
def test_mismatched_model_section_is_named(folder, change, message):
  path, _ = folder
  config = _config(path, **change)
  layout = param_layout(config, lm_task.model_factory(config.model))
  with pytest.raises(ValueError, match='init_from_hf') as e:
    initial_params(config, layout.abstract_params, layout.shardings, None)
  assert message in str(e.value)


def _transformers_loss(hf, batch, torch):
  """The trainer's loss (mean next-token cross-entropy over the loss mask) of a transformers model
  on a packed batch: each document (segment) of each row is its own sequence from position 0."""
  inputs, targets, segments, positions, mask = (
    np.asarray(batch[k]) for k in ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')
  )
  total = 0.0
  for row in range(inputs.shape[0]):
    for segment in np.unique(segments[row][segments[row] > 0]):
      (index,) = np.nonzero(segments[row] == segment)
      assert (positions[row, index] == np.arange(len(index))).all()
      logits = hf(input_ids=torch.from_numpy(inputs[row, index][None]).long()).logits[0]
      ce = torch.nn.functional.cross_entropy(
        logits, torch.from_numpy(targets[row, index]).long(), reduction='none'
      )
      total = total + (ce * torch.from_numpy(mask[row, index])).sum()
  return total / float(mask.sum())


@pytest.mark.slow
def test_lm_training_starts_from_the_folder(folder, tmp_path):
  """The first training step from the imported weights against transformers and torch AdamW on
  the same batch: its loss and gradient norm are those of the transformers model loaded from the
  folder, and its update (at learning rate 1e-3 from the first step) is torch AdamW's (clipping,
  weight decay on matrices only), so the run trains from exactly the imported weights."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  path, params = folder
  config = tiny_lm_config(steps=1)
  config.model = ml_collections.ConfigDict(model_io.model_section(path))
  config.init_from_hf = path
  config.optimizer.update(lr=1e-3, warmup_steps=0)
  oc = config.optimizer
  data = lm_task.build_lm_data(config, str(tmp_path))
  batch = next(iter(data.train_dataset))  # what the trainer's first step reads: the same order
  result = train(
    config,
    str(tmp_path),
    model_factory=lm_task.model_factory(config.model),
    loss_fn=lm_task.lm_loss_fn(config.train.z_loss),
    train_dataset=data.train_dataset,
  )
  first = [r for r in read_metrics(str(tmp_path)) if 'loss' in r][0]
  assert first['step'] == 1 and first['lr'] == pytest.approx(oc.lr)

  hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  assert type(hf).__name__ == 'Qwen3MoeForCausalLM'
  loss = _transformers_loss(hf, batch, torch)
  loss.backward()
  grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in hf.parameters()))
  assert first['loss'] == pytest.approx(loss.item(), rel=1e-5)
  assert first['grad_norm'] == pytest.approx(grad_norm.item(), rel=1e-4)

  matrices = [p for p in hf.parameters() if p.ndim >= 2]
  vectors = [p for p in hf.parameters() if p.ndim < 2]
  optimizer = torch.optim.AdamW(
    [dict(params=matrices, weight_decay=oc.weight_decay), dict(params=vectors, weight_decay=0.0)],
    lr=oc.lr,
    betas=(oc.b1, oc.b2),
    eps=oc.eps,
  )
  torch.nn.utils.clip_grad_norm_(hf.parameters(), oc.clip_norm)
  optimizer.step()
  hf.save_pretrained(str(tmp_path / 'stepped'))
  expected = _params(model_io.load_model(str(tmp_path / 'stepped')))

  # A first Adam step moves every weight with a gradient by about lr (m / sqrt(v) = sign(g)); both
  # sides agree to within 1% of that (measured: 1.6e-4 of it, float32 rounding).
  def check(key, got, want, start):
    moved = np.asarray(want) - start
    assert np.abs(moved).max() > 0.5 * oc.lr, key  # the reference step moved this weight
    np.testing.assert_allclose(np.asarray(got) - start, moved, rtol=0, atol=1e-2 * oc.lr)

  jax.tree_util.tree_map_with_path(check, jax.device_get(result.params), expected, params)
