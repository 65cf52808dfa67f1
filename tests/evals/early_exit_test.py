"""The 'early_exit' evaluator on a tiny random model against values computed independently: the
teacher-forced exit layers and perplexity from the per-layer logits, the full-depth row from normal
greedy decoding; and its construction by name."""

import statistics

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from kuaijax import sampling
from kuaijax.data import sequences, tasks
from kuaijax.data.tokenizers import ByteTokenizer
from kuaijax.evals import registry
from kuaijax.evals.early_exit import EarlyExitEvaluator
from kuaijax.inference import early_exit, exit_sweep
from kuaijax.models.transformer import Transformer, TransformerConfig

LAYERS, THRESHOLD, NEW_TOKENS = 3, 0.3, 5
RECORDS = [
  {'prompt': 'Question: 1+2?\nSolution:\n', 'completion': '1+2=3\nThe answer is 3'},
  {'prompt': 'Question: 4*5?\nSolution:\n', 'completion': '4*5=20\nThe answer is 20'},
  {'prompt': 'Question: 7-1?\nSolution:\n', 'completion': '7-1=6\nThe answer is 6'},
]
TOKENIZER = ByteTokenizer()


def is_correct(text, record):
  """An arbitrary deterministic check, so that the accuracy depends on the decoded texts."""
  return len(text) % 2 == 0


@pytest.fixture(scope='module')
def model():
  cfg = TransformerConfig(
    vocab_size=259,
    d_model=16,
    num_layers=LAYERS,
    num_heads=2,
    num_kv_heads=1,
    d_ff=32,
    init_std=0.5,
  )
  return Transformer(cfg, rngs=nnx.Rngs(1))


@pytest.fixture(scope='module')
def metrics(model):
  settings = exit_sweep.exit_settings((THRESHOLD,), True, (0.5,))
  evaluator = EarlyExitEvaluator(
    tasks.Task(load=None, is_correct=is_correct),
    RECORDS,
    RECORDS,
    TOKENIZER,
    settings,
    score_len=64,
    prompt_len=32,
    max_new_tokens=NEW_TOKENS,
    timing_rounds=2,  # two: the median of per-round ratios differs from the ratio of medians
  )
  return evaluator(model)


def _teacher(model):
  batch = exit_sweep.teacher_batch(RECORDS, TOKENIZER, 64)
  logits = np.asarray(
    early_exit.layer_logits(model, batch['inputs'], batch['positions'], batch['segment_ids'])
  )
  return batch, logits


def _log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def test_settings_and_layer_readouts(metrics):
  assert metrics['early_exit/settings'] == ['full', f'conf_{THRESHOLD}', 'agreement', 'gate_0.5']
  assert metrics['early_exit/num_layers'] == LAYERS and metrics['early_exit/num_test_problems'] == 3
  agreement = metrics['early_exit/layers/agreement']
  assert len(agreement) == LAYERS and agreement[-1] == 1.0
  assert len(metrics['early_exit/gate/w']) == early_exit.NUM_FEATURES


def test_teacher_forced_exits_match_a_hand_computation(model, metrics):
  batch, logits = _teacher(model)
  mask = batch['loss_mask'] > 0
  logp = _log_softmax(logits.astype(np.float64))
  nll = -np.take_along_axis(logp, batch['targets'][None, ..., None], axis=-1)[..., 0]
  # Confidence rule: the first layer (before the last) whose max probability reaches the threshold.
  confident = np.exp(logp.max(axis=-1)) >= THRESHOLD
  confident[-1] = True
  exit_layer = confident.argmax(axis=0)  # 0-based
  label = f'early_exit/conf_{THRESHOLD}'
  assert 1 < exit_layer[mask].mean() + 1 < LAYERS  # the check means something: some tokens exit
  assert metrics[f'{label}/avg_layers_teacher_forced'] == pytest.approx(exit_layer[mask].mean() + 1)
  exit_nll = np.take_along_axis(nll, exit_layer[None], axis=0)[0]
  assert metrics[f'{label}/perplexity'] == pytest.approx(np.exp(exit_nll[mask].mean()), rel=1e-4)
  # Full depth: the last layer's perplexity, which is also the analysis' last loss.
  full_ppl = np.exp(nll[-1][mask].mean())
  assert metrics['early_exit/full/perplexity'] == pytest.approx(full_ppl, rel=1e-4)
  assert metrics['early_exit/layers/loss'][-1] == pytest.approx(np.log(full_ppl), rel=1e-4)
  assert metrics['early_exit/full/avg_layers_teacher_forced'] == LAYERS


def test_full_depth_row_is_normal_greedy_decoding(model, metrics):
  prompts, lengths = sequences.prompt_batch(TOKENIZER, [r['prompt'] for r in RECORDS], 32)
  gen = sampling.generate(
    model,
    prompts,
    lengths,
    max_new_tokens=NEW_TOKENS,
    greedy=True,
    stop_tokens=(TOKENIZER.eos_id,),
    pad_id=TOKENIZER.pad_id,
  )
  tokens, gen_lengths = jax.device_get((gen.tokens, gen.lengths))
  texts = sequences.decode_completions(TOKENIZER, tokens, gen_lengths)
  expected = np.mean([is_correct(t, r) for t, r in zip(texts, RECORDS)])
  assert metrics['early_exit/full/accuracy'] == pytest.approx(expected)
  assert metrics['early_exit/full/avg_layers_decode'] == LAYERS


def test_decoding_counts_and_speed_ratios_match_a_recomputation(model, metrics):
  """Per setting, the deterministic quantities behind the speed columns, recomputed by decoding
  again: the layers run per generated token and the tokens generated; the speed-ups are the medians
  (min, max) of the per-round ratios of the same interleaved timings, the times their medians, and
  tokens/s divide the recomputed token count by the medians (the wall times themselves are not
  checked: timing is not a test)."""
  prompts, lengths = sequences.prompt_batch(TOKENIZER, [r['prompt'] for r in RECORDS], 32)
  gate = early_exit.ExitGate(
    jnp.asarray(metrics['early_exit/gate/w'], jnp.float32),
    jnp.asarray(metrics['early_exit/gate/b'], jnp.float32),
  )
  settings = exit_sweep.exit_settings((THRESHOLD,), True, (0.5,))
  assert [label for label, _, _ in settings] == metrics['early_exit/settings']
  decoded_layers = {}
  for label, rule, threshold in settings:
    out = early_exit.early_exit_generate(
      model,
      prompts,
      lengths,
      max_new_tokens=NEW_TOKENS,
      rule=rule,
      threshold=threshold,
      gate=gate if rule == 'gate' else None,
      stop_tokens=(TOKENIZER.eos_id,),
      pad_id=TOKENIZER.pad_id,
    )
    used, gen_lengths = np.asarray(out.layers_used), np.asarray(out.lengths)
    real = np.arange(used.shape[1])[None] < gen_lengths[:, None]
    head = f'early_exit/{label}'
    decoded_layers[label] = metrics[f'{head}/avg_layers_decode']
    assert decoded_layers[label] == pytest.approx(used[real].mean(), rel=1e-6)
    n_tokens = int(gen_lengths.sum())
    for batch in ('batch1', 'batch'):
      ee, normal = (
        metrics[f'{head}/{batch}/early_exit_rounds_s'],
        metrics[f'{head}/{batch}/normal_rounds_s'],
      )
      assert len(ee) == len(normal) == 2
      per_round = [n / e for n, e in zip(normal, ee)]
      speedup = metrics[f'{head}/{batch}/speedup']
      assert speedup == pytest.approx(statistics.median(per_round), rel=1e-12)
      assert metrics[f'{head}/{batch}/speedup_min'] == min(per_round)
      assert metrics[f'{head}/{batch}/speedup_max'] == max(per_round)
      assert metrics[f'{head}/{batch}/early_exit_s'] == statistics.median(ee)
      assert metrics[f'{head}/{batch}/normal_s'] == statistics.median(normal)
    batch_ee, batch_normal = (
      metrics[f'{head}/batch/early_exit_s'],
      metrics[f'{head}/batch/normal_s'],
    )
    assert metrics[f'{head}/tokens_per_s_batch'] * batch_ee == pytest.approx(n_tokens, rel=1e-9)
    assert metrics[f'{head}/tokens_per_s_normal_batch'] * batch_normal == pytest.approx(
      n_tokens, rel=1e-9
    )
  assert decoded_layers['full'] == LAYERS
  assert decoded_layers[f'conf_{THRESHOLD}'] < LAYERS  # the check means something: some exit


def _options(**overrides):
  return {
    'type': 'early_exit',
    'split': 'test',
    'groups': (1, 2),
    'per_group': 2,
    'thresholds': (0.9,),
    'agreement': False,
    'gate_thresholds': (0.7,),
    'gate_problems': 3,
    'score_len': 256,
    'prompt_len': 224,
    'max_new_tokens': 8,
    'timing_rounds': 1,
    **overrides,
  }


def _ctx(task='kj_arith'):
  return registry.EvalContext(
    tokenizer=TOKENIZER,
    task=tasks.get_task(task) if task else None,
    data=ml_collections.ConfigDict(dict(data_dir='', levels=(1,))),
  )


def test_built_by_name_on_the_task():
  evals = ml_collections.ConfigDict({'ee': _options()})
  evaluator = registry.build_evaluators(evals, _ctx()).evaluators['ee']
  assert [r['level'] for r in evaluator.test_records] == [1, 1, 2, 2]
  gate_levels = {r['level'] for r in evaluator.gate_records}
  assert len(evaluator.gate_records) == 3 and gate_levels == {1}  # training problems, data.levels
  assert [s[0] for s in evaluator.settings] == ['full', 'conf_0.9', 'gate_0.7']


def test_bad_options():
  with pytest.raises(ValueError, match=r'threshold must be in \(0, 1\]'):
    registry.build_evaluators(
      ml_collections.ConfigDict({'ee': _options(thresholds=(1.5,))}), _ctx()
    )
  with pytest.raises(ValueError, match='needs a task'):
    registry.build_evaluators(ml_collections.ConfigDict({'ee': _options()}), _ctx(task=''))
