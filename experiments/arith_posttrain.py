"""Post-training on kj_arith: the stage pipeline of `configs/arith/posttrain.py`, then its table.

Every stage (SFT, sampling, pairs, DPO, RFT, RLMEC rewrites, RLMEC, GRPO) runs through
`kuaijax.stages.run_pipeline`, once per training seed of `config.seeds`, each in
`<workdir>/seed_<s>/<stage>/` and resumable; every stage that produces a policy is evaluated by
`config.evals` (held-out accuracy by level, sampled over several sampling seeds, plus greedy).
This file only writes the table of `kuaijax.stages.posttrain_table` (results.md / results.json) and
the loss curves (loss_curves.png).
"""

from __future__ import annotations

import os
import time

import jax

from kuaijax import plotting
from kuaijax.results import write_results
from kuaijax.stages import report, run_pipeline
from kuaijax.stages.posttrain_table import summarise


def run(config, workdir: str) -> dict:
  start = time.time()
  os.makedirs(workdir, exist_ok=True)
  runs = run_pipeline(config, workdir)
  results, table = summarise(runs, config)
  results['wall_s'] = time.time() - start
  if jax.process_index() == 0:
    plots = plotting.write_loss_curves(workdir, report.trained_stage_dirs(runs, workdir))
    results['plots'] = [os.path.basename(p) for p in plots]
  write_results(workdir, results, table)
  print(table)
  return results
