"""bench_moe's baseline: the original layer's algorithm in PyTorch (loop over experts) equals the
MoE layer in forward and in every gradient, on the same weights."""

import functools

import jax
import numpy as np
import pytest

from experiments import bench_moe
from kuaijax.models import moe

T, D, F, E = 40, 8, 12, 6


def test_torch_loop_equals_the_layer_forward_and_gradients():
  torch = pytest.importorskip('torch')
  ks = jax.random.split(jax.random.key(0), 9)
  x = jax.random.normal(ks[0], (T, D))
  router_w = 0.3 * jax.random.normal(ks[1], (D, E))
  w1, w3 = (0.3 * jax.random.normal(k, (E, D, F)) for k in ks[2:4])
  w2 = 0.3 * jax.random.normal(ks[4], (E, F, D))
  shared = tuple(0.3 * jax.random.normal(k, s) for k, s in zip(ks[5:8], [(D, F), (D, F), (F, D)]))
  params = (x, router_w, w1, w3, w2, *shared)
  cotangent = jax.random.normal(ks[8], (T, D))
  cfg = moe.MoEConfig(num_experts=E, p=0.4, num_shared_experts=1)
  layer = functools.partial(bench_moe._apply, cfg=cfg)
  assert float(moe.moe_ffn(x, router_w, w1, w3, w2, cfg)[1]['mean_k']) > 1.2  # several experts
  y, vjp = jax.vjp(layer, *params)
  grads = vjp(cotangent)
  leaves = [torch.tensor(np.asarray(a), requires_grad=True) for a in params]
  y_torch = bench_moe.torch_loop_layer(0.4)(*leaves)
  (y_torch * torch.tensor(np.asarray(cotangent))).sum().backward()
  np.testing.assert_allclose(y_torch.detach().numpy(), y, rtol=1e-5, atol=1e-6)
  for leaf, g in zip(leaves, grads):
    np.testing.assert_allclose(leaf.grad.numpy(), g, rtol=1e-4, atol=1e-5)


def test_runlocal_reports_every_side_and_the_breakdown(tmp_path):
  from configs.topp_moe import bench

  config = bench.get_config('runlocal')
  config.bench.update(run_cases='e8', sweep_p=(0.4,), dispatches='')
  payload = bench_moe.run(config, str(tmp_path))
  case = payload['cases']['e8']
  sides = set(case['sides'])
  assert {bench_moe.UNCAPPED, bench_moe.DENSE_EQUIVALENT} <= sides
  for side in case['sides'].values():
    assert len(side['rounds']) == config.bench.rounds
    assert side['min_s'] <= side['median_s'] <= side['max_s']
  ratio = case['uncapped_vs_dense']
  assert ratio['min'] <= ratio['median'] <= ratio['max']
  assert any(k.startswith('experts fwd+bwd') for k in case['breakdown'])
  # The breakdown's sort and the layer route the same pairs: T * mean k selected rows.
  assert case['selected_pairs'] == round(config.bench.tokens * case['mean_k'])
  text = (tmp_path / 'results.md').read_text()
  assert 'Command: `' in text and 'interleaved rounds' in text
  assert (tmp_path / 'cost_vs_mean_k.png').exists()
