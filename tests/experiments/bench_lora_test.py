"""bench_lora's deterministic figures against closed forms on the runlocal model: the trainable
parameters of LoRA (r * (in + out) per adapted weight) and of full fine-tuning, AdamW's state (two
float32 moments per trainable float plus two int32 step counters), the live train state and the
compiled step's memory; timing is only checked for shape, never for a threshold."""

import jax.numpy as jnp
import pytest

from experiments import bench_lora
from kuaijax.models.transformer import TransformerConfig

COUNTERS = 2 * 4  # AdamW's and the schedule's int32 step counts


def lora_params(cfg: TransformerConfig, rank: int) -> int:
  """sum over the adapted weights (every attention projection and SwiGLU weight) of r (in + out)."""
  d, q, kv, f = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.d_ff
  per_layer = (d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d)
  return cfg.num_layers * rank * per_layer


def full_params(cfg: TransformerConfig) -> int:
  d, q, kv, f = cfg.d_model, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.d_ff
  layer = d * q + 2 * d * kv + q * d + 3 * d * f + 2 * d  # + the two RMSNorm scales
  return cfg.num_layers * layer + cfg.vocab_size * d + d  # tied embedding, final norm


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  from configs.lora import bench

  config = bench.get_config('runlocal')
  config.parallel.num_devices = 1  # (the tests' CPU has 8 fake devices; batch 2)
  workdir = tmp_path_factory.mktemp('bench_lora')
  return config, bench_lora.run(config, str(workdir)), workdir


def test_parameter_and_optimizer_figures_match_closed_forms(results):
  config, payload, _ = results
  cfg = TransformerConfig.from_config(config.model)
  sides = payload['sides']
  assert set(sides) == {'full', 'lora', 'lora_bfloat16'}
  total = full_params(cfg)
  adapters = lora_params(cfg, config.lora.rank)
  full, adapted, bf16 = sides['full'], sides['lora'], sides['lora_bfloat16']
  assert full['params'] == full['trainable_params'] == total
  assert adapted['trainable_params'] == bf16['trainable_params'] == adapters
  assert adapted['params'] == bf16['params'] == total + adapters
  for side, trainable in ((full, total), (adapted, adapters), (bf16, adapters)):
    assert side['trainable_param_bytes'] == 4 * trainable  # float32 (adapters always)
    assert side['opt_state_bytes'] == 2 * 4 * trainable + COUNTERS
  assert full['param_bytes'] == 4 * total
  assert adapted['param_bytes'] == 4 * (total + adapters)
  assert bf16['param_bytes'] == 2 * total + 4 * adapters
  for side in sides.values():
    # Between steps the state holds the params, the optimizer state and two int32 scalars.
    assert side['state_live_bytes'] == side['param_bytes'] + side['opt_state_bytes'] + 8
    compiled = side['compiled']
    # The state is donated: its buffers are aliased to the outputs.
    assert compiled['alias'] == side['state_live_bytes'] <= compiled['argument']
    assert compiled['footprint'] >= side['state_live_bytes']
  assert adapted['compiled']['footprint'] < full['compiled']['footprint']
  assert bf16['state_live_bytes'] < adapted['state_live_bytes'] < full['state_live_bytes']


def test_timings_and_report(results):
  config, payload, workdir = results
  for side in payload['sides'].values():
    assert len(side['rounds']) == config.bench.rounds
    assert side['min_s'] <= side['median_s'] <= side['max_s'] and side['tokens_per_s'] > 0
    speed = side['speed_vs_full']
    assert speed['min'] <= speed['median'] <= speed['max']
  assert payload['sides']['full']['speed_vs_full']['median'] == pytest.approx(1.0)
  text = (workdir / 'results.md').read_text()
  assert 'Command: `' in text and 'interleaved rounds' in text and '| lora_bfloat16 |' in text


def test_configs_differ_only_in_what_is_benchmarked():
  from configs.lora import bench

  gpu, cpu = bench.get_config(), bench.get_config('cpu')
  assert cpu.model.param_dtype == gpu.model.param_dtype == 'float32'
  assert jnp.dtype(gpu.model.dtype) == jnp.bfloat16 and gpu.bench.rounds >= 5
  assert cpu.bench.rounds >= 5 and cpu.lora.to_dict() == gpu.lora.to_dict()
  with pytest.raises(ValueError, match='alternatives'):
    bench.get_config('cpu,runlocal')
