"""The generic training loop shared by every experiment.

`train(...)` takes a model factory, a loss function `loss_fn(model, batch, rng, frozen) -> (loss,
metrics)` (scalar metrics; `frozen` is None unless given), a grain dataset of per-process
micro-batches and an optional `evaluate(graphdef, params, step) -> dict` (the split model, as the
trainer holds it; `kuaijax.evals.base.Evaluator.evaluate`). It owns the
mesh, the sharded init, the jitted step (donated state, explicit in/out shardings, gradient
accumulation by `lax.scan`), orbax checkpoints with the data-iterator state, metrics, the progress bar
and the non-finite guard.

Resume order: the latest checkpoint in `workdir` -> `config.init_from` (params only) ->
`config.init_from_hf` (a Hugging Face folder, params only) -> scratch.
Randomness: parameters from `train.seed`; the step rng is `fold_in(key(train.seed + 1), step)`, so a
resumed run replays exactly the steps an uninterrupted run would take.

Post-training hooks (both optional, off by default): `frozen` is a pytree of arrays (e.g. a reference
model's params placed with `param_layout(...).shardings`) passed to `loss_fn` as its 4th argument
and never updated or saved; `prepare_batch(model, batch, rng)` rewrites each
host-local micro-batch with the CURRENT model before the step (online data such as GRPO rollouts).
Its rng is `fold_in(fold_in(key(train.seed + 2), step), micro_index)`, so a resumed run regenerates the
same online batches. It gets this process's rows; to run the model on them it uses
`parallel.on_process_rows` (the whole mesh works on every process's rows, each gets its own back).

LoRA: when the model carries adapters (`kuaijax.models.lora`), only they are trained: gradients,
optimizer state and checkpoints cover the adapters, the base parameters ride along in the state
unchanged (frozen, in their own dtype, e.g. bfloat16) and come back on resume from the same source
as at the start (`init_from`, `init_from_hf` or the seed). `state['params']` and everything handed
out (evaluate, prepare_batch, the result) hold base and adapters together.

Non-finite guard: a step whose loss or gradient norm is not finite leaves params and optimizer state
unchanged and records its step; the host checks that record before every log, evaluation and save,
then stops with the step number. No state after a bad step is ever saved, so the last checkpoint is
the last good one.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from kuaijax import parallel
from kuaijax.models import lora
from kuaijax.train import checkpoint as ckpt_lib
from kuaijax.train.metrics import MetricsWriter, Progress
from kuaijax.train.optim import make_optimizer


@dataclasses.dataclass
class TrainResult:
  """What a finished run hands back to its experiment."""

  graphdef: nnx.GraphDef
  params: dict
  step: int
  history: list[dict]
  last_eval: dict

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params)


def _mean_metrics(records: list[dict]) -> dict:
  return {k: float(np.mean([r[k] for r in records])) for k in records[0]}


@dataclasses.dataclass
class ParamLayout:
  """The model's abstract parameters and their shardings on the configured mesh (nothing allocated)."""

  graphdef: nnx.GraphDef
  abstract_params: dict
  shardings: dict
  mesh: jax.sharding.Mesh
  rules: dict


def param_layout(config, model_factory: Callable[[nnx.Rngs], nnx.Module]) -> ParamLayout:
  """Graph definition, abstract params and parameter shardings for `config.parallel`.

  The same layout `train` uses; callers place extra frozen params (a reference model) with it.
  """
  mesh = parallel.mesh_from_config(config.parallel)
  rules = parallel.rules_dict(config.parallel.rules)
  abstract_model = nnx.eval_shape(lambda: model_factory(nnx.Rngs(int(config.train.seed))))
  graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
  abstract_params = nnx.to_pure_dict(abstract_state)
  shardings = parallel.state_shardings(
    abstract_params, parallel.logical_axes_tree(abstract_state), mesh, rules
  )
  return ParamLayout(graphdef, abstract_params, shardings, mesh, rules)


def check_batch_config(train_config, mesh, rules) -> int:
  """Validates batch_size / grad_accum against processes and mesh; returns the per-process micro batch."""
  batch, accum = int(train_config.batch_size), int(train_config.grad_accum)
  if batch <= 0 or accum <= 0 or batch % accum:
    raise ValueError(
      f'train.batch_size={batch} must be a positive multiple of train.grad_accum={accum}'
    )
  micro = batch // accum
  split = parallel.batch_mesh_size(mesh, rules)
  if micro % split or micro % jax.process_count():
    raise ValueError(
      f'train.batch_size/grad_accum={micro} must be divisible by the batch mesh '
      f'axes ({split} ways) and by the process count ({jax.process_count()})'
    )
  return micro // jax.process_count()


def _write_config(workdir: str, config) -> None:
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'config.json')
  text = config.to_json_best_effort(indent=2, sort_keys=True)
  if os.path.exists(path):
    with open(path) as f:
      if f.read() != text:
        logging.warning("%s differs from this run's config; kept the original", path)
    return
  with open(path, 'w') as f:
    f.write(text)


def initial_params(config, abstract_params, shardings, init_params: Callable[[], dict]):
  """Params of a run without a checkpoint in its workdir: `config.init_from` (a kuaijax workdir),
  else `config.init_from_hf` (a Hugging Face folder matching `config.model`), else `init_params()`.

  LoRA adapters are not in those sources: the base parameters are loaded and the adapters start
  from `init_params()` (only the adapters of it are computed).
  """
  abstract_base, base_shardings = (
    lora.split_params(abstract_params)[1],
    lora.split_params(shardings)[1],
  )
  if config.get('init_from'):
    params, from_step = ckpt_lib.load_params(config.init_from, abstract_base, base_shardings)
    logging.info('initialised params from %s (step %d)', config.init_from, from_step)
  elif config.get('init_from_hf'):
    from kuaijax.hf import model_io
    from kuaijax.models.transformer import TransformerConfig

    cfg = TransformerConfig.from_config(config.model)
    params = model_io.load_for_config(config.init_from_hf, cfg, abstract_base, base_shardings)
    logging.info('initialised params from Hugging Face folder %s', config.init_from_hf)
  else:
    return jax.jit(init_params, out_shardings=shardings)()
  adapter_shardings = lora.split_params(shardings)[0]
  if not adapter_shardings:
    return params
  fresh = jax.jit(lambda: lora.split_params(init_params())[0], out_shardings=adapter_shardings)
  return lora.join_params(fresh(), params)


@dataclasses.dataclass
class TrainProgram:
  """The compiled pieces of a run: the sharded init and the jitted, state-donating train step."""

  layout: ParamLayout
  abstract_state: dict  # {'params', 'opt_state', 'step', 'nonfinite_step'} as ShapeDtypeStructs
  state_shardings: dict
  has_adapters: bool  # LoRA: only the adapters are trained and checkpointed
  init_params: Callable[[], dict]  # fresh params from `train.seed` (unsharded)
  init_state: Callable[[dict], dict]  # params -> the sharded train state
  step: Callable  # (state, batch, frozen) -> (state, metrics); donates `state`


def train_program(config, model_factory: Callable[[nnx.Rngs], nnx.Module], loss_fn) -> TrainProgram:
  """The optimizer, the state layout and the train step `train` runs (benchmarks time it alone)."""
  tc = config.train
  steps, accum = int(tc.steps), int(tc.grad_accum)
  if steps <= 0:
    raise ValueError(f'train.steps must be > 0, got {steps}')
  layout = param_layout(config, model_factory)
  mesh, graphdef = layout.mesh, layout.graphdef
  seed = int(tc.seed)
  tx, schedule = make_optimizer(config.optimizer, steps)
  replicated = NamedSharding(mesh, PartitionSpec())

  def init_state(params):
    return {
      'params': params,
      'opt_state': tx.init(lora.trainable_split(params)[0]),
      'step': jnp.zeros((), jnp.int32),
      'nonfinite_step': jnp.full((), -1, jnp.int32),
    }

  def init_params():
    return nnx.to_pure_dict(nnx.split(model_factory(nnx.Rngs(seed)), nnx.Param)[1])

  abstract_state = jax.eval_shape(init_state, layout.abstract_params)
  state_shardings = {
    'params': layout.shardings,
    'opt_state': optax.tree_map_params(
      tx,
      lambda _, s: s,
      abstract_state['opt_state'],
      lora.trainable_split(layout.shardings)[0],
      transform_non_params=lambda _: replicated,
    ),
    'step': replicated,
    'nonfinite_step': replicated,
  }
  base_rng = jax.random.key(seed + 1)

  def loss_of_params(params, base, batch, rng, frozen):
    model = nnx.merge(graphdef, lora.join_params(params, base))
    lora.seed_dropout(model, rng)
    return loss_fn(model, batch, rng, frozen)

  grad_fn = jax.value_and_grad(loss_of_params, has_aux=True)

  def train_step(state, batch, frozen):
    step = state['step']
    params, base = lora.trainable_split(state['params'])
    rng = jax.random.fold_in(base_rng, step)
    if accum == 1:
      (loss, metrics), grads = grad_fn(params, base, batch, rng, frozen)
    else:
      first = jax.tree.map(lambda x: x[0], batch)
      zeros = jax.eval_shape(grad_fn, params, base, first, rng, frozen)
      zeros = jax.tree.map(jnp.zeros_like, zeros)

      def body(acc, xs):
        micro, i = xs
        out = grad_fn(params, base, micro, jax.random.fold_in(rng, i), frozen)
        return jax.tree.map(jnp.add, acc, out), None

      summed, _ = jax.lax.scan(body, zeros, (batch, jnp.arange(accum)))
      (loss, metrics), grads = jax.tree.map(lambda x: x / accum, summed)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    nonfinite = state['nonfinite_step']
    new_state = {
      'params': lora.join_params(keep(new_params, params), base),
      'opt_state': keep(opt_state, state['opt_state']),
      'step': step + 1,
      'nonfinite_step': jnp.where((nonfinite < 0) & ~finite, step, nonfinite),
    }
    metrics = {**metrics, 'loss': loss, 'grad_norm': grad_norm, 'lr': schedule(step)}
    return new_state, metrics

  return TrainProgram(
    layout=layout,
    abstract_state=abstract_state,
    state_shardings=state_shardings,
    has_adapters=bool(lora.split_params(layout.abstract_params)[0]),
    init_params=init_params,
    init_state=jax.jit(init_state, out_shardings=state_shardings),
    step=jax.jit(train_step, out_shardings=(state_shardings, replicated), donate_argnums=0),
  )


def _saved(state: dict) -> dict:
  """The part of a train state (or of its shardings) a checkpoint holds: without a model's frozen
  base parameters when it trains LoRA adapters."""
  return {**state, 'params': lora.trainable_split(state['params'])[0]}


def train(
  config,
  workdir: str,
  *,
  model_factory: Callable[[nnx.Rngs], nnx.Module],
  loss_fn: Callable,
  train_dataset,
  evaluate: Callable[[nnx.GraphDef, dict, int], dict] | None = None,
  frozen=None,
  prepare_batch: Callable[[nnx.Module, dict, jax.Array], dict] | None = None,
  count_tokens: Callable[[dict], int] | None = None,
) -> TrainResult:
  """Trains (or resumes) per `config.train`, `config.optimizer`, `config.parallel`.

  `frozen` and `prepare_batch` are the post-training hooks described in the module docstring;
  `count_tokens(batch)` gives the tokens a batch processes for tokens/s (default: `inputs`' size).
  """
  tc = config.train
  steps, accum = int(tc.steps), int(tc.grad_accum)
  for name in ('log_every', 'eval_every', 'checkpoint_every'):
    if int(tc[name]) <= 0:
      raise ValueError(f'train.{name} must be > 0, got {tc[name]}')
  if count_tokens is None:
    count_tokens = lambda batch: int(batch['inputs'].size) if 'inputs' in batch else 0
  os.makedirs(workdir, exist_ok=True)
  program = train_program(config, model_factory, loss_fn)
  layout = program.layout
  mesh, rules, graphdef = layout.mesh, layout.rules, layout.graphdef
  abstract_params, param_shardings = layout.abstract_params, layout.shardings
  check_batch_config(tc, mesh, rules)
  seed = int(tc.seed)
  signature = ckpt_lib.param_signature(lora.trainable_split(abstract_params)[0])
  state_shardings = program.state_shardings
  prepare_rng = jax.random.key(seed + 2)

  batch_dim = 0 if accum == 1 else 1
  checkpointer = ckpt_lib.Checkpointer(
    os.path.join(workdir, 'checkpoints'),
    keep=int(tc.keep_checkpoints),
    save_every=int(tc.checkpoint_every),
    async_save=bool(tc.async_checkpoint),
  )
  meta = {'param_signature': signature, 'model': config.model.to_dict()}
  writer = MetricsWriter(workdir)
  data_iter = iter(train_dataset)
  history, last_eval = [], {}
  try:
    with parallel.axis_rules(mesh, rules):
      latest = checkpointer.latest_step()
      if latest is not None:
        checkpointer.check_compatible(latest, signature)
        target = jax.tree.map(
          lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
          _saved(program.abstract_state),
          _saved(state_shardings),
        )
        state = checkpointer.restore(latest, target, data_iter)
        if program.has_adapters:
          initial = initial_params(config, abstract_params, param_shardings, program.init_params)
          state['params'] = lora.join_params(state['params'], lora.split_params(initial)[1])
        logging.info('resumed from %s/%d', checkpointer.directory, latest)
      else:
        state = program.init_state(
          initial_params(config, abstract_params, param_shardings, program.init_params)
        )
      _write_config(workdir, config)
      start = int(state['step'])
      writer.truncate_after(start)

      def next_micro(step, i):
        local = next(data_iter)
        if prepare_batch is None:
          return local
        rng = jax.random.fold_in(jax.random.fold_in(prepare_rng, step), i)
        local = prepare_batch(nnx.merge(graphdef, state['params']), local, rng)
        return jax.tree.map(np.asarray, local)

      def next_batch(step):
        if accum == 1:
          local = next_micro(step, 0)
        else:
          micro = [next_micro(step, i) for i in range(accum)]
          local = {k: np.stack([m[k] for m in micro]) for k in micro[0]}
        return parallel.shard_batch(local, mesh, rules, batch_dim)

      def check_finite():
        bad = int(jax.device_get(state['nonfinite_step']))
        if bad >= 0:
          checkpointer.wait()
          raise FloatingPointError(
            f'non-finite loss or gradient at step {bad + 1} (the update was skipped); last good '
            f'checkpoint: step {checkpointer.latest_step()} in {checkpointer.directory}'
          )

      progress = Progress(start, steps, enabled=bool(tc.progress) and jax.process_index() == 0)
      pending, pending_tokens = [], 0
      for step in range(start, steps):
        batch = next_batch(step)
        pending_tokens += count_tokens(batch)
        state, metrics = program.step(state, batch, frozen)
        pending.append(metrics)
        done = step + 1
        last = done == steps
        if done % int(tc.log_every) == 0 or last:
          check_finite()
          record = _mean_metrics(jax.device_get(pending))
          record['tokens_per_s'] = progress.update(len(pending), pending_tokens, record['loss'])
          history.append(writer.write(done, record))
          pending, pending_tokens = [], 0
        if evaluate is not None and (done % int(tc.eval_every) == 0 or last):
          check_finite()
          last_eval = evaluate(graphdef, state['params'], done)
          writer.write(done, {f'eval/{k}': v for k, v in last_eval.items()})
        if done % int(tc.checkpoint_every) == 0 or last:
          check_finite()
          checkpointer.maybe_save(done, _saved(state), data_iter, meta, force=last)
      progress.close()
  finally:
    checkpointer.close()
    writer.close()
  final_step = int(state['step'])
  if evaluate is not None and not last_eval and final_step == steps:
    with parallel.axis_rules(mesh, rules):
      last_eval = evaluate(graphdef, state['params'], final_step)
  return TrainResult(graphdef, state['params'], final_step, history, last_eval)
