"""SPPD on kj_arith end to end (arXiv 2502.13516, step-level preferences with a dynamic value
margin): step trees of the SFT policy's own samples, Monte Carlo step values and a trained process
reward model (PRM), against SFT / sequence-level DPO / step-DPO on the same samples.

Stages (per training seed in `<workdir>/seed_<s>/`; the SFT policy trained once in
`<workdir>/shared/sft`): `tree` (the SFT policy's step trees of training problems: 2 steps sampled
at every newline, down to 4 steps, Monte Carlo values from the tree's own outcomes and rollouts from
cut leaves; the program check of every step) -> `step_pairs_mc` (sibling steps whose MC values
differ by more than 0.5) and `tree_paths` -> `pairs` (the trees' complete solutions as (correct,
wrong) pairs); the PRM: `prm_tree` (trees of OTHER problems) -> `prm` (its own model role, started
from the SFT policy, trained on the MC values) -> `prm_values` (the PRM's values of `tree`'s nodes:
held-out accuracy) -> `step_pairs_prm`; rows from the SFT policy with the same updates, pairs per
update and learning rate: `sft_more` (SFT continued), `dpo`, `step_dpo` (sppd with gamma 0 on the MC
pairs), `sppd_mc`, `sppd_prm`; and `prm_rerank` (best-of-8 of the SFT policy by the PRM on test
problems). experiments/sppd.py writes the table (experiments/sppd/README.md has our numbers).

runlocal (2 CPU cores, 3 training seeds; the 0.84M-parameter SFT policy of
configs/arith/posttrain.py with ~27% sampled accuracy on levels 1-2; 400 tree problems per seed, 40 updates x 16 pairs at lr
5e-5 per row; evaluated on 100 test problems per level, 4 sampling runs + greedy). Measured
2026-12-07 on 2 cores shared with other jobs (load 6-8): SFT 20 min, ~28 min of stages per seed; a
quiet machine is estimated, not measured, at ~45 min for 3 seeds. ± over 3 training seeds: SFT
27.0%, SFT continued 29.2 ± 0.4, DPO 25.9 ± 1.4, step-DPO 27.0 ± 1.3, SPPD (MC) 26.4 ± 2.0, SPPD
(PRM) 19.1 ± 0.7 (the tiny PRM ranks sibling steps at chance: 1-4 pairs); MC values match the
program check on 90.4% of steps, the PRM on 84.1% (all-"bad" baseline 79.8%):
  python -m kuaijax.main --config=configs/sppd/arith.py:runlocal --workdir=workdirs/sppd_arith
gpu (one GPU, never run on a device): the same SFT policy; 4000 tree problems, a PRM trained for
3000 steps x 32, 150 updates x 64 pairs per row.
full scale (~76M policy, levels 1-4; not run):
  python -m kuaijax.main --config=configs/sppd/arith.py --workdir=gs://.../sppd_arith
Args: `seeds=0+1+2`, `gamma=1.0` (SPPD's margin scale), `sft_from=<workdir>/shared/sft` (import a
finished SFT policy), `stages=` (rows to run; their inputs are added).
"""

import ml_collections

from configs.arith import posttrain
from kuaijax.config_lib import parse_arg, stage_steps
from kuaijax.config_lib import train_stage as _train

CD = ml_collections.ConfigDict

ROWS = ('sft_more', 'dpo', 'step_dpo', 'sppd_mc', 'sppd_prm')
STAGES = ('sft', *ROWS, 'prm_rerank')


def tree_stage(*, limit, offset) -> CD:
  """The SFT policy's step trees of `limit` training problems from `offset`."""
  return CD(
    dict(
      type='step_tree',
      policy='sft',
      data='task:train',
      limit=limit,
      offset=offset,
      branching=2,
      max_depth=4,  # kj_arith levels 1-2: at most 3 steps and the answer line
      max_step_tokens=24,
      rollouts=4,
      temperature=1.0,
      top_p=1.0,
      batch_size=64,
    )
  )


def _row(method, label, data, *, gamma=None, reference='sft') -> CD:
  """A post-training row from the SFT policy (steps, batch and optimizer set by `_resize`)."""
  options, loss = {}, {}
  if method in ('dpo', 'sppd'):
    options = dict(reference='precomputed')
    loss = dict(beta=0.1, gamma=gamma) if method == 'sppd' else dict(loss_type='sigmoid', beta=0.1)
  return _train(
    method,
    label,
    data=data,
    init_from='sft',
    reference=reference if options else '',
    steps=1000,
    batch_size=64,
    optimizer=dict(lr=5e-6, warmup_steps=30, weight_decay=0.0, min_lr_ratio=0.0),
    options=options,
    loss=loss,
  )


def _stages(gamma: float) -> CD:
  s = CD()
  s.tree = tree_stage(limit=8000, offset=0)
  s.tree_paths = CD(dict(type='tree_paths', data='tree'))
  s.pairs = CD(dict(type='pairs', data='tree_paths', max_pairs_per_prompt=2, gold_fallback=False))
  pairs = dict(type='step_pairs', min_gap=0.5, max_pairs_per_parent=1)
  s.step_pairs_mc = CD(dict(pairs, data='tree', value='mc_value'))
  s.prm_tree = tree_stage(limit=8000, offset=8000)
  s.prm = _train(
    'prm',
    'PRM',
    data='prm_tree',
    model='prm',
    init_from='sft',
    steps=3000,
    batch_size=32,
    optimizer=dict(lr=2e-5, warmup_steps=100, weight_decay=0.0, min_lr_ratio=0.1),
    evaluate=False,
  )
  s.prm_values = CD(dict(type='prm_values', data='tree', prm='prm', batch_size=128))
  s.step_pairs_prm = CD(dict(pairs, data='prm_values', value='prm_value'))
  s.sft_more = _row('sft', 'SFT (continued)', 'task:train')
  s.dpo = _row('dpo', 'DPO', 'pairs')
  s.step_dpo = _row('sppd', 'step-DPO', 'step_pairs_mc', gamma=0.0)
  s.sppd_mc = _row('sppd', 'SPPD (MC)', 'step_pairs_mc', gamma=gamma)
  s.sppd_prm = _row('sppd', 'SPPD (PRM)', 'step_pairs_prm', gamma=gamma)
  s.prm_rerank = CD(
    dict(
      type='prm_rerank',
      policy='sft',
      prm='prm',
      data='task:test',
      limit=1000,
      offset=0,
      num_samples=8,
      temperature=0.7,
      batch_size=128,
    )
  )
  return s


def _resize(config, *, trees, prm, rows, rerank) -> None:
  """Sizes in place: `trees` (problems of the policy's and of the PRM's trees), `prm` (steps,
  batch, lr), `rows` (steps, pairs per step, lr: every row alike), `rerank` test problems."""
  s = config.stage
  s.tree.limit = s.prm_tree.limit = s.prm_tree.offset = trees
  steps, batch_size, lr = prm
  s.prm.train.update(stage_steps(steps, batch_size, checkpoints=2))
  s.prm.optimizer.update(lr=lr, warmup_steps=max(1, steps // 30))
  steps, batch_size, lr = rows
  for name in ROWS:
    s[name].train.update(stage_steps(steps, batch_size, checkpoints=2))
    s[name].optimizer.update(lr=lr, warmup_steps=max(1, steps // 10))
  s.prm_rerank.limit = rerank


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False, gpu=False, seeds='', sft_from='', gamma=1.0, stages='')
  base = CD(
    dict(
      runlocal=False,
      repro=args.runlocal,  # the post-training comparison's repro policy and widths
      gpu=args.gpu,
      seeds=args.seeds,
      sft_from=args.sft_from,
      sft_per_seed=False,
    )
  )
  config = posttrain.comparison_config(arg, base, reference_row='sft_more')
  config.experiment = 'sppd'
  sft = config.stage.sft
  config.stage = _stages(args.gamma)
  config.stage.sft = sft
  config.stages = args.stages.replace('+', ',') or ','.join(STAGES)
  # The PRM is a model role of its own (here the policy's architecture, started from the policy).
  config.models.prm = CD(config.models.policy.to_dict())
  if args.gpu:
    _resize(config, trees=4000, prm=(3000, 32, 1e-3), rows=(150, 64, 5e-5), rerank=500)
  elif args.runlocal:
    _resize(config, trees=400, prm=(300, 16, 1e-3), rows=(40, 16, 5e-5), rerank=200)
  if args.runlocal or args.gpu:
    for name in ('tree', 'prm_tree'):
      config.stage[name].batch_size = 100
    posttrain.trained_levels_eval(config)
    config.stage.prm_rerank.batch_size = 100
    config.train.update(progress=False)
  return config
