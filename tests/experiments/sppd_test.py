"""SPPD end to end on a tiny model (configs/sppd/arith.py through experiments/sppd.py): every stage
runs, the rows share their budget, and each stage's output agrees with what it was built from."""

import json
import os

import numpy as np
import pytest

from configs.sppd import arith
from experiments import sppd as sppd_exp
from kuaijax.config_lib import load_config
from kuaijax.data import records as records_lib
from kuaijax.data import tokenizers
from kuaijax.stages import sppd as sppd_stages
from tests.conftest import REPO_ROOT
from tests.experiments.arith_posttrain_test import shrink

CONFIG = os.path.join(REPO_ROOT, 'configs/sppd/arith.py')
TOK = tokenizers.ByteTokenizer()


def tiny_config(seeds=(0,)):
  config = shrink(load_config(CONFIG + ':runlocal'), ('sft', 'prm', *arith.ROWS))
  config.seeds = seeds
  config.models.prm.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64)
  # a policy trained for 4 steps at a high rate: trees with some structure in seconds
  config.stage.sft.optimizer.update(lr=1e-2, warmup_steps=1)
  for name in ('tree', 'prm_tree'):
    config.stage[name].update(limit=3, branching=2, max_depth=2, max_step_tokens=12, rollouts=2)
  config.stage.prm_tree.offset = 3
  for name in ('step_pairs_mc', 'step_pairs_prm'):  # an untrained policy: any value difference
    config.stage[name].min_gap = -1.0
  config.stage.pairs.gold_fallback = True
  config.stage.prm_rerank.update(limit=2, num_samples=2, batch_size=4)
  config.evals.arith.update(groups=(1, 2), per_group=2, seeds=(0,), batch_size=4)
  return config


def read(workdir, stage):
  return records_lib.read_records(os.path.join(workdir, 'seed_0', stage, 'data.jsonl'))


def test_rows_share_the_budget_and_the_prm_is_its_own_role():
  config = load_config(CONFIG + ':runlocal')
  stage = config.stage
  assert config.seeds == (0, 1, 2) and config.reference_row == 'sft_more'
  assert stage.sft.shared_seed == 0 and stage.prm.model == 'prm' and 'prm' in config.models
  budgets = {
    (stage[n].train.steps, stage[n].train.batch_size, stage[n].optimizer.lr) for n in arith.ROWS
  }
  assert len(budgets) == 1
  assert stage.step_dpo.loss.gamma == 0 and stage.sppd_mc.loss.gamma > 0
  assert stage.sppd_mc.loss.to_dict() == stage.sppd_prm.loss.to_dict()
  # the PRM learns on other problems than the trees it values
  assert stage.prm_tree.offset >= stage.tree.offset + stage.tree.limit
  gpu = load_config(CONFIG + ':gpu')
  assert gpu.stage.sft.to_dict() == stage.sft.to_dict()
  assert gpu.stage.tree.limit > stage.tree.limit and gpu.stage.dpo.train.steps > 40


@pytest.mark.slow
def test_tiny_pipeline_end_to_end(tmp_path):
  config = tiny_config()
  results = sppd_exp.run(config, str(tmp_path))
  stages = results['runs']['0']
  assert {n for n in results['order'] if stages[n].get('eval')} == {'sft', *arith.ROWS}
  assert stages['prm']['model'] == 'prm'
  table = (tmp_path / 'results.md').read_text()
  for label in ('SFT', 'DPO', 'step-DPO', 'SPPD (MC)', 'SPPD (PRM)', 'PRM vs program check'):
    assert f'| {label} ' in table, label
  assert (tmp_path / 'sppd.png').exists() and results['seeds']['training'] == [0]
  # tree nodes: prefixes are their parents' paths; program truth as the stage computes it
  nodes = read(tmp_path, 'tree')
  by_id = {r['node']: r for r in nodes}
  for r in nodes:
    if r['parent'] >= 0:
      parent = by_id[r['parent']]
      np.testing.assert_array_equal(
        r['prefix_tokens'], np.concatenate([parent['prefix_tokens'], parent['step_tokens']])
      )
    path = TOK.decode(np.concatenate([r['prefix_tokens'], r['step_tokens']]))
    assert r['step_correct'] == sppd_stages.step_correct({**r, 'completion': r['gold']}, path)
  # PRM values of the same nodes, and the pairs built from them
  valued = read(tmp_path, 'prm_values')
  assert [r['node'] for r in valued] == [r['node'] for r in nodes]
  assert all(0 < r['prm_value'] < 1 for r in valued)
  for r in read(tmp_path, 'step_pairs_prm'):
    assert r['chosen_value'] >= r['rejected_value']
  info = json.loads((tmp_path / 'seed_0' / 'prm_rerank' / 'stage.json').read_text())
  summary = info['summary']
  assert summary['sample_accuracy'] <= summary['oracle_accuracy']
  assert summary['best_of_n_accuracy'] <= summary['oracle_accuracy']
