"""D2PO vs DPO (configs/d2po/arith.py through the post-training experiment): every gamma row differs
from DPO only in its loss, and a tiny run reports the pairs' length statistics, the evaluation
length and the paired difference to DPO."""

import os

import pytest

from configs.d2po import arith
from experiments import arith_posttrain
from kuaijax.config_lib import load_config
from tests.conftest import REPO_ROOT
from tests.experiments.arith_posttrain_test import shrink

CONFIG = os.path.join(REPO_ROOT, 'configs/d2po/arith.py')


def test_gamma_rows_differ_from_dpo_only_in_the_loss():
  config = load_config(CONFIG + ':repro')
  assert config.seeds == (0, 1, 2) and config.reference_row == 'dpo'
  rows = [arith.row_name(g) for g in arith.GAMMAS]
  assert config.stages.split(',') == ['sft', 'samples', 'pairs', 'dpo', *rows]
  dpo = config.stage.dpo.to_dict()
  for gamma, name in zip(arith.GAMMAS, rows):
    block = config.stage[name].to_dict()
    assert block.pop('loss') == {'beta': dpo['loss']['beta'], 'gamma': gamma}
    assert (block.pop('method'), block.pop('label')) == ('d2po', f'D2PO, gamma {gamma}')
    assert block == {k: v for k, v in dpo.items() if k not in ('loss', 'method', 'label')}
  with pytest.raises(ValueError, match='alternatives'):
    load_config(CONFIG + ':repro,runlocal')
  gpu = load_config(CONFIG + ':gpu')  # the same SFT policy, more pairs and updates
  assert gpu.stage.sft.to_dict() == config.stage.sft.to_dict() and gpu.stage.samples.limit == 10_000
  assert gpu.stage.d2po_g090.train.steps == gpu.stage.dpo.train.steps == 200
  shared = load_config(CONFIG + ':repro,sft_from=/tmp/policy/sft')
  assert shared.stage.sft.type == 'params' and shared.stage.sft.path == '/tmp/policy/sft'
  assert shared.stage.d2po_g098.to_dict() == config.stage.d2po_g098.to_dict()


def test_tiny_run_reports_lengths_and_the_difference_to_dpo(tmp_path):
  config = shrink(load_config(CONFIG + ':runlocal'), ('sft', 'dpo', 'd2po_g098'))
  config.stages = 'sft,samples,pairs,dpo,d2po_g098'
  config.stage.pairs.gold_fallback = True
  config.stage.samples.update(limit=4, batch_size=4)
  config.evals.arith.update(groups=(1, 2), per_group=3, seeds=(0, 1), batch_size=6)
  results = arith_posttrain.run(config, str(tmp_path))
  stages = results['runs']['0']
  assert stages['d2po_g098']['summary']['steps'] == 2
  for name in ('sft', 'dpo', 'd2po_g098'):
    assert stages[name]['eval']['completion_length'] > 0
  table = (tmp_path / 'results.md').read_text()
  difference = stages['d2po_g098']['eval']['accuracy'] - stages['dpo']['eval']['accuracy']
  assert f'| d2po_g098 | {100 * difference:+.4f} |' in table
  assert '| D2PO, gamma 0.98 |' in table and 'length (eval)' in table
