"""configs/hf/eval.py (an evaluation-only pipeline) end to end on a tiny exported MoE model with a
locally trained tokenizer."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip('tokenizers')

from kuaijax import main  # noqa: E402
from kuaijax.config_lib import load_config  # noqa: E402
from kuaijax.hf import model_io  # noqa: E402
from kuaijax.hf.tokenizer import train_bpe  # noqa: E402
from kuaijax.models.transformer import TransformerConfig  # noqa: E402
from tests.conftest import REPO_ROOT  # noqa: E402
from tests.hf.model_io_errors_test import random_model  # noqa: E402

TEXTS = [
  'The quick brown fox jumps over the lazy dog.',
  'Grüße aus Köln 🚀 and 12 + 30 = 42.',
  'def add(a, b):\n    return a + b',
  'short',
]


@pytest.mark.parametrize('sweep', ['', pytest.param('0.2+1.0', marks=pytest.mark.slow)])
def test_eval_command_on_exported_model(tmp_path, sweep):
  folder = str(tmp_path / 'model')
  tok = train_bpe(TEXTS * 4, folder, vocab_size=300)
  cfg = TransformerConfig(
    vocab_size=tok.vocab_size,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    d_ff=64,
    qk_norm=True,
    mlp='moe',
    mlp_options=dict(num_experts=4, routing='top_k', k=2, renormalize=True, expert_d_ff=16),
  )
  model = random_model(cfg, seed=3)
  assert model_io.save_model(model, folder) == 'qwen3_moe'
  eval_file = tmp_path / 'texts.jsonl'
  eval_file.write_text('\n'.join(json.dumps({'text': t}) for t in TEXTS) + '\n')
  spec = f':path={folder},runlocal' + (f',top_p_sweep={sweep}' if sweep else '')
  config = load_config(os.path.join(REPO_ROOT, 'configs/hf/eval.py') + spec)
  config.eval_file = str(eval_file)  # both evaluators read it
  assert config.evals.text.eval_file == config.evals.generations.eval_file == str(eval_file)
  config.evals.generations.max_new_tokens = 4
  config.parallel.num_devices = 1
  workdir = tmp_path / 'wd'
  main.run_experiment(config, str(workdir))
  results = json.loads((workdir / 'results.json').read_text())

  # Independent reference: full-softmax NLL of each text under the exported-then-imported model.
  loaded = model_io.load_model(folder)
  ids = [tok.encode(text) for text in TEXTS]
  assert all(row[0] == tok.bos_id for row in ids)
  padded = np.zeros((len(ids), max(map(len, ids))), np.int32)  # right padding: causal, harmless
  for i, row in enumerate(ids):
    padded[i, : len(row)] = row
  logp = jax.nn.log_softmax(loaded(jnp.asarray(padded))[0], -1)
  total = -sum(float(logp[i, np.arange(len(r) - 1), r[1:]].sum()) for i, r in enumerate(ids))
  count = sum(len(r) - 1 for r in ids)
  assert results['tokens'] == count
  np.testing.assert_allclose(results['mean_nll'], total / count, rtol=1e-5)
  np.testing.assert_allclose(results['perplexity'], math.exp(total / count), rtol=1e-5)
  assert results['seeds'] == {'training': [0], 'sampling': []}
  assert results['experts_per_token'] == 2.0  # the exported top-2 routing
  stage = json.loads((workdir / 'shared' / 'base' / 'stage.json').read_text())
  assert stage['params_format'] == 'hf' and stage['eval']['mean_nll'] == results['mean_nll']
  if sweep:  # p = 1 keeps every expert; a near-uniform router at p = 0.2 keeps only the top-1
    rows = {row['p']: row for row in results['top_p_sweep']}
    assert (rows[1.0]['experts_per_token'], rows[0.2]['experts_per_token']) == (4.0, 1.0)
    assert rows[1.0]['layer_mean_k'] == [4.0, 4.0]
    # p = 1 with every expert is another function than the exported top-2 model
    assert rows[1.0]['mean_nll'] != results['mean_nll']
    assert (workdir / 'top_p_sweep.png').exists()
    assert sorted(os.listdir(workdir / 'shared')) == ['base', 'top_p_0_2', 'top_p_1']
  else:
    assert 'top_p_sweep' not in results
  assert len(results['generations']) == 3
  md = (workdir / 'results.md').read_text()
  assert 'Greedy generations' in md and 'perplexity' in md
  assert (workdir / 'nll_by_position.png').exists()


def test_top_p_sweep_of_a_dense_model_is_refused(tmp_path):
  cfg = TransformerConfig(vocab_size=64, d_model=16, num_layers=1, num_heads=2, d_ff=32)
  folder = str(tmp_path / 'dense')
  model_io.save_model(random_model(cfg, seed=0), folder, family='llama')
  with pytest.raises(ValueError, match='top_p_sweep needs an MoE model'):
    load_config(os.path.join(REPO_ROOT, 'configs/hf/eval.py') + f':path={folder},top_p_sweep=0.5')
