"""Post-training on kj_arith: SFT a small policy, then DPO / RLMEC on its own samples and online GRPO.

Stages run in `config.stages` order, each in its own trainer workdir (`<workdir>/<stage>`, so each
resumes on its own). 'sft' trains on gold solutions; 'dpo', 'rlmec' and 'grpo' start from the SFT
policy (the 'sft' stage of this run, else `config.init_from`), which is also their reference:
- dpo: (correct, wrong) pairs of the SFT policy's samples -> `preference_task` (loss by name);
- rlmec: the SFT policy's samples with minimum-editing rewrites -> `rl_task` (token-level RL);
- grpo: online groups from the current policy, reward by name -> `grpo_task`.
Every trained policy (and the initial one when 'sft' is not run) is evaluated on held-out test
problems (`kuaijax.evals.arith_accuracy`): sampled accuracy by level over several seeds (mean and
sample std) plus greedy accuracy. Writes results.json, results.md (the table) and loss_curves.png
(training loss of every stage) into the workdir.
"""

from __future__ import annotations

import copy
import json
import os
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from kuaijax import parallel, plotting
from kuaijax.evals import arith_accuracy
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train import grpo_task, lm_task, preference_task, rl_task, sft_task
from kuaijax.train.trainer import param_layout, train, write_results

STAGES = ('sft', 'dpo', 'rlmec', 'grpo')
_LABELS = {'init': 'initial policy', 'sft': 'SFT', 'dpo': 'DPO', 'rlmec': 'RLMEC', 'grpo': 'GRPO'}


def parse_stages(text: str) -> tuple[str, ...]:
  """'sft+dpo+grpo' (or comma-separated) -> ('sft', 'dpo', 'grpo'), validated."""
  stages = tuple(s.strip() for s in text.replace(',', '+').split('+') if s.strip())
  bad = [s for s in stages if s not in STAGES]
  if not stages or bad or len(set(stages)) != len(stages):
    raise ValueError(f'stages={text!r}: a "+"-separated list of distinct names from {STAGES}')
  return stages


def stage_config(config, stage: str, init_from: str) -> ml_collections.ConfigDict:
  """The trainer config of one stage: `config.<stage>.train/optimizer` over the shared sections."""
  out = copy.deepcopy(config)
  out.unlock()
  out.train.update(config[stage].train.to_dict())
  out.optimizer.update(config[stage].optimizer.to_dict())
  out.init_from = init_from
  out.lock()
  return out


def _micro(cfg) -> int:
  return cfg.train.batch_size // cfg.train.grad_accum // jax.process_count()


class _Context:
  """What the stages share: tokenizer, problem sets and per-stage data stats."""

  def __init__(self, config):
    dc = config.data
    self.config = config
    self.tokenizer = sft_task.get_tokenizer(dc)
    if self.tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(
        f'model.vocab_size={config.model.vocab_size} is smaller than the tokenizer vocabulary '
        f'({self.tokenizer.vocab_size})'
      )
    levels = tuple(dc.train_levels)
    self.train_problems = sft_task.load_problems(
      'train', levels=levels, limit=dc.train_examples or None, data_dir=dc.data_dir or None
    )
    ec = config.eval
    self.eval_problems = []
    for level in ec.levels:
      self.eval_problems += sft_task.load_problems(
        ec.split, levels=(level,), limit=ec.problems_per_level, data_dir=dc.data_dir or None
      )
    self.gen_options = dict(
      prompt_len=dc.prompt_len, max_new_tokens=dc.max_new_tokens, batch_size=ec.batch_size
    )
    self.stats = {}

  def rollout_problems(self, count: int, offset: int):
    """Train problems for sampling rollouts, from `offset` (cycling)."""
    n = len(self.train_problems)
    return [self.train_problems[(offset + i) % n] for i in range(min(count, n))]

  def rollouts(self, model, problems, section, seed_offset: int):
    return arith_accuracy.sample_solutions(
      model,
      self.tokenizer,
      problems,
      num_samples=section.num_samples,
      seed=self.config.data.seed + seed_offset,
      temperature=section.temperature,
      **self.gen_options,
    )

  def evaluate(self, model) -> dict:
    ec = self.config.eval
    sampled = arith_accuracy.evaluate_arith(
      model,
      self.tokenizer,
      self.eval_problems,
      seeds=tuple(ec.seeds),
      greedy=False,
      temperature=ec.temperature,
      **self.gen_options,
    )
    greedy = arith_accuracy.evaluate_arith(
      model, self.tokenizer, self.eval_problems, seeds=(0,), greedy=True, **self.gen_options
    )
    return {'sampled': sampled, 'greedy': {k: v for k, v in greedy.items() if k != 'per_seed'}}


def _run_sft(ctx: _Context, cfg, stage_dir: str):
  dataset, dropped = sft_task.sft_dataset(
    ctx.train_problems,
    ctx.tokenizer,
    seq_len=cfg.data.seq_len,
    batch_size=_micro(cfg),
    seed=cfg.data.seed,
    pack=cfg.data.pack,
  )
  ctx.stats['sft'] = {'examples': len(ctx.train_problems) - dropped, 'dropped_too_long': dropped}
  return train(
    cfg,
    stage_dir,
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=lm_task.lm_loss_fn(),
    train_dataset=dataset,
  )


def _reference(cfg):
  """(policy model at init_from, its params placed with the trainer's shardings)."""
  factory = lm_task.model_factory(cfg.model)
  layout = param_layout(cfg, factory)
  params, _ = ckpt_lib.load_params(cfg.init_from, layout.abstract_params, layout.shardings)
  return nnx.merge(layout.graphdef, params), params, layout


def _run_dpo(ctx: _Context, cfg, stage_dir: str):
  sc = ctx.config.dpo
  ref_model, ref_params, layout = _reference(cfg)
  with parallel.axis_rules(layout.mesh, layout.rules):
    problems = ctx.rollout_problems(sc.problems, sc.problem_offset)
    rollouts = ctx.rollouts(ref_model, problems, sc, seed_offset=1000)
    pairs, stats = preference_task.pairs_from_rollouts(
      problems,
      rollouts,
      ctx.tokenizer,
      seq_len=cfg.data.prompt_len + cfg.data.max_new_tokens,
      max_pairs_per_problem=sc.max_pairs_per_problem,
      gold_fallback=sc.gold_fallback,
    )
    stats['sample_accuracy'] = float(np.mean([r.correct for r in rollouts]))
    ctx.stats['dpo'] = stats
    if not pairs:
      raise RuntimeError(f'dpo: no (correct, wrong) pair among {len(rollouts)} samples: {stats}')
    if sc.reference == 'precomputed':
      pairs = preference_task.precompute_reference_logps(
        ref_model, pairs, batch_size=ctx.config.eval.batch_size
      )
  loss_fn = preference_task.preference_loss_fn(
    sc.loss_type,
    beta=sc.beta,
    reference=sc.reference,
    label_smoothing=sc.label_smoothing,
    simpo_gamma=sc.simpo_gamma,
    d2po_gamma=sc.d2po_gamma,
  )
  dataset = sft_task.in_memory_dataset(pairs, batch_size=_micro(cfg), seed=cfg.data.seed)
  return train(
    cfg,
    stage_dir,
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=loss_fn,
    train_dataset=dataset,
    frozen=ref_params if sc.reference == 'model' else None,
  )


def _run_rlmec(ctx: _Context, cfg, stage_dir: str):
  sc = ctx.config.rlmec
  policy, _, layout = _reference(cfg)
  with parallel.axis_rules(layout.mesh, layout.rules):
    problems = ctx.rollout_problems(sc.problems, sc.problem_offset)
    rollouts = ctx.rollouts(policy, problems, sc, seed_offset=2000)
  examples, stats = rl_task.rlmec_examples(
    problems, rollouts, ctx.tokenizer, seq_len=cfg.data.prompt_len + cfg.data.max_new_tokens
  )
  stats['sample_accuracy'] = float(np.mean([r.correct for r in rollouts]))
  ctx.stats['rlmec'] = stats
  dataset = sft_task.in_memory_dataset(examples, batch_size=_micro(cfg), seed=cfg.data.seed)
  return train(
    cfg,
    stage_dir,
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=rl_task.rlmec_loss_fn(eps=sc.eps, lam=sc.lam),
    train_dataset=dataset,
  )


def _run_grpo(ctx: _Context, cfg, stage_dir: str):
  sc = ctx.config.grpo
  dc = cfg.data
  frozen = None
  if sc.kl_coef > 0:
    _, frozen, _ = _reference(cfg)
  dataset = grpo_task.prompt_dataset(
    ctx.train_problems,
    ctx.tokenizer,
    prompt_len=dc.prompt_len,
    max_new_tokens=dc.max_new_tokens,
    batch_size=_micro(cfg),
    seed=dc.seed + 3,
  )
  rollouts = grpo_task.GRPORollouts(
    ctx.tokenizer,
    group_size=sc.group_size,
    max_new_tokens=dc.max_new_tokens,
    reward=sc.reward,
    reward_options=sc.reward_options.to_dict() if sc.reward == 'relative_length' else None,
    temperature=sc.temperature,
    sample_filter=sc.sample_filter,
    offline_injection=sc.offline_injection,
  )
  loss_fn = grpo_task.grpo_loss_fn(
    pad_id=ctx.tokenizer.pad_id,
    kl_coef=sc.kl_coef,
    clip_eps=sc.clip_eps,
    aggregation=sc.aggregation,
  )
  result = train(
    cfg,
    stage_dir,
    model_factory=lm_task.model_factory(cfg.model),
    loss_fn=loss_fn,
    train_dataset=dataset,
    frozen=frozen,
    prepare_batch=rollouts,
  )
  if result.history:
    last = result.history[-1]
    ctx.stats['grpo'] = {
      k: last[k] for k in ('reward', 'accuracy', 'zero_advantage_fraction') if k in last
    }
  return result


_RUNNERS = {'sft': _run_sft, 'dpo': _run_dpo, 'rlmec': _run_rlmec, 'grpo': _run_grpo}


def _cell(summary: dict, key: str) -> str:
  if key not in summary:
    return '-'
  return f'{100 * summary[key]:.1f} ± {100 * summary[key + "/std"]:.1f}'


def results_table(results: dict, config) -> str:
  """Markdown: sampled accuracy (%) by level, mean ± sample std over the seeds, and greedy."""
  levels = list(config.eval.levels)
  ec = config.eval
  lines = [
    f'## kj_arith held-out accuracy (%), {ec.split} split, {ec.problems_per_level} problems per '
    f'level; sampled at T={ec.temperature}: mean ± std over {len(ec.seeds)} seeds',
    '',
    '| policy | ' + ' | '.join(f'level {k}' for k in levels) + ' | all | greedy all |',
    '|---|' + '---:|' * (len(levels) + 2),
  ]
  for name, r in results['methods'].items():
    s = r['eval']['sampled']
    cells = [_cell(s, f'accuracy/level_{k}') for k in levels] + [_cell(s, 'accuracy')]
    greedy = f'{100 * r["eval"]["greedy"]["accuracy"]:.1f}'
    lines.append(f'| {_LABELS[name]} | ' + ' | '.join(cells) + f' | {greedy} |')
  lines += ['', '| stage | steps | wall time (s) | data |', '|---|---:|---:|---|']
  for name, r in results['methods'].items():
    stats = json.dumps(results['stats'].get(name, {}), sort_keys=True)
    lines.append(f'| {_LABELS[name]} | {r["step"]} | {r["wall_s"]:.0f} | {stats} |')
  return '\n'.join(lines) + '\n'


def run(config, workdir: str) -> dict:
  stages = parse_stages(config.stages)
  if 'sft' not in stages and not config.init_from:
    raise ValueError(f'stages={config.stages!r} without sft need --config.init_from=<SFT workdir>')
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  ctx = _Context(config)
  results = {'methods': {}, 'stats': ctx.stats, 'stages': list(stages)}
  sft_source, result = config.init_from, None
  if 'sft' not in stages:
    t = time.time()
    model, _, layout = _reference(stage_config(config, stages[0], sft_source))
    with parallel.axis_rules(layout.mesh, layout.rules):
      results['methods']['init'] = {'eval': ctx.evaluate(model), 'step': 0, 'wall_s': 0.0}
    results['methods']['init']['wall_s'] = time.time() - t
  for stage in stages:
    t = time.time()
    stage_dir = os.path.join(workdir, stage)
    cfg = stage_config(config, stage, config.init_from if stage == 'sft' else sft_source)
    result = _RUNNERS[stage](ctx, cfg, stage_dir)
    if stage == 'sft':
      sft_source = stage_dir
    train_s = time.time() - t
    with parallel.axis_rules(parallel.mesh_from_config(cfg.parallel), cfg.parallel.rules):
      evaluation = ctx.evaluate(result.model())
    results['methods'][stage] = {
      'eval': evaluation,
      'step': result.step,
      'wall_s': train_s,
      'eval_s': time.time() - t - train_s,
    }
    print(
      f'{stage}: {json.dumps({k: v for k, v in evaluation["sampled"].items() if k != "per_seed"})}'
    )
  results['wall_s'] = time.time() - start
  results['num_params'] = int(sum(x.size for x in jax.tree.leaves(result.params)))
  table = results_table(results, config)
  plotting.write_loss_curves(workdir, stages)
  write_results(workdir, results, table)
  print(table)
  return results
