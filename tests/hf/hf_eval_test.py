"""configs/hf/eval.py end to end on a tiny exported MoE model with a locally trained tokenizer."""

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


@pytest.mark.parametrize('sweep', ['', pytest.param('0.2,1.0', marks=pytest.mark.slow)])
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
  config = load_config(os.path.join(REPO_ROOT, 'configs/hf/eval.py') + f':path={folder},runlocal')
  config.eval_file = str(eval_file)
  config.max_new_tokens = 4
  config.top_p_sweep = sweep
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
  if sweep:  # p = 1 keeps every expert; a near-uniform router at p = 0.2 keeps only the top-1
    rows = {row['p']: row for row in results['top_p_sweep']}
    assert (rows[1.0]['experts_per_token'], rows[0.2]['experts_per_token']) == (4.0, 1.0)
    assert (workdir / 'top_p_sweep.png').exists()
  assert len(results['generations']) == 3
  md = (workdir / 'results.md').read_text()
  assert 'Greedy generations' in md and 'perplexity' in md
  assert (workdir / 'nll_by_position.png').exists()
