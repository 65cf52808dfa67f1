"""Strict parsing of the `:arg` suffix of `--config=configs/<paper>/<exp>.py:arg`.

Every config's `get_config(arg=None)` calls `parse_arg(arg, runlocal=False, variant='base', ...)`.
The suffix is a comma-separated list of `key=value` items or bare flags (`runlocal` means
`runlocal=True`). Unknown keys and values that do not parse as the default's type are errors, so a
typo never silently runs the wrong experiment.
"""

from __future__ import annotations

import dataclasses

import ml_collections


def _parse_value(key: str, text: str, default):
  if isinstance(default, bool):
    if text.lower() in ('1', 'true', 'yes'):
      return True
    if text.lower() in ('0', 'false', 'no'):
      return False
    raise ValueError(f'config arg {key!r}: expected a boolean, got {text!r}')
  if isinstance(default, int):
    try:
      return int(text)
    except ValueError:
      raise ValueError(f'config arg {key!r}: expected an int, got {text!r}') from None
  if isinstance(default, float):
    try:
      return float(text)
    except ValueError:
      raise ValueError(f'config arg {key!r}: expected a float, got {text!r}') from None
  return text


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'runlocal,variant=wide' against `defaults`; returns a locked ConfigDict."""
  values = dict(defaults)
  for item in (arg or '').split(','):
    item = item.strip()
    if not item:
      continue
    key, sep, text = item.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config arg {key!r}; allowed: {sorted(defaults)}')
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f'config arg {key!r} needs a value: {key}=...')
      values[key] = True
    else:
      values[key] = _parse_value(key, text.strip(), defaults[key])
  return ml_collections.ConfigDict(values, type_safe=True).lock()


def parse_ints(text: str, arg: str) -> tuple[int, ...]:
  """'0+1+2' (or '0,1,2') -> (0, 1, 2): distinct ints of the config arg named `arg`."""
  try:
    values = tuple(int(s) for s in text.replace(',', '+').split('+') if s.strip())
  except ValueError:
    raise ValueError(f'config arg {arg}={text!r}: expected ints joined by +, e.g. 0+1+2') from None
  if not values or len(set(values)) != len(values):
    raise ValueError(f'config arg {arg}={text!r}: expected distinct ints, at least one')
  return values


def parse_seeds(text: str) -> tuple[int, ...]:
  """'0+1+2' (or '0,1,2') -> (0, 1, 2): the `config.seeds` of a pipeline config."""
  return parse_ints(text, 'seeds')


def dataclass_from_section(cls, section, what: str):
  """`cls(**section)` for a dataclass and a ConfigDict / mapping, naming every key that is not one
  of its fields (`what` names the section in the error)."""
  values = dict(section.to_dict() if hasattr(section, 'to_dict') else section)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - fields)
  if unknown:
    raise ValueError(f'unknown {what} keys {unknown}; known: {sorted(fields)}')
  return cls(**values)


def check_choice(name: str, value, allowed) -> None:
  """Raises a ValueError naming the config field when `value` is not one of `allowed`."""
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not one of {sorted(allowed)}')


def trainer_config(**train_overrides) -> ml_collections.ConfigDict:
  """The sections every training experiment shares: train, optimizer, parallel.

  Pipeline configs start from this and set their own `experiment`, `seeds`, `data`, `models`,
  `stages` and `stage` sections; initial parameters are a stage's `init_from` or a model role's
  Hugging Face folder, never a top-level field.
  """
  from kuaijax.parallel import DEFAULT_RULES

  config = ml_collections.ConfigDict()
  config.train = ml_collections.ConfigDict(
    dict(
      steps=1000,
      batch_size=32,  # global sequences per optimizer step
      grad_accum=1,
      seed=0,
      z_loss=0.0,
      log_every=50,
      eval_every=500,
      checkpoint_every=500,
      keep_checkpoints=3,
      async_checkpoint=True,
      progress=True,
    )
  )
  config.train.update(train_overrides)
  config.optimizer = ml_collections.ConfigDict(
    dict(
      lr=3e-4,
      min_lr_ratio=0.1,
      warmup_steps=100,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,
    )
  )
  config.parallel = ml_collections.ConfigDict(
    dict(
      num_devices=0,  # use the first N devices (0: all of them)
      mesh=ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1)),
      rules=ml_collections.ConfigDict(dict(DEFAULT_RULES)),
    )
  )
  return config


def lm_model(
  *,
  vocab_size: int,
  d_model: int,
  num_layers: int,
  num_heads: int,
  num_kv_heads: int,
  d_ff: int,
  **overrides,
) -> ml_collections.ConfigDict:
  """The `model` section of a kuaijax Transformer of this size: by default SwiGLU, RoPE (base 1e4),
  tied embeddings, bfloat16 compute on float32 parameters, no rematerialisation; `overrides` set
  any other field (remat='dots', tie_embeddings=False, ...)."""
  defaults = dict(
    mlp='swiglu',
    tie_embeddings=True,
    init_std=0.02,
    rope_base=10000.0,
    dtype='bfloat16',
    param_dtype='float32',
    remat='none',
  )
  size = dict(
    vocab_size=vocab_size,
    d_model=d_model,
    num_layers=num_layers,
    num_heads=num_heads,
    num_kv_heads=num_kv_heads,
    d_ff=d_ff,
  )
  return ml_collections.ConfigDict({**size, **defaults, **overrides})


def stage_steps(steps: int, batch_size: int, *, logs: int = 20, checkpoints: int = 4) -> dict:
  """A training stage's `train` overrides: `steps`, `batch_size`, about `logs` log lines and
  `checkpoints` checkpoints over the run, one evaluation at the end."""
  return dict(
    steps=steps,
    batch_size=batch_size,
    log_every=max(1, steps // logs),
    checkpoint_every=max(1, steps // checkpoints),
    eval_every=steps,
  )


def train_stage(
  method: str,
  label: str,
  *,
  data: str,
  steps: int,
  batch_size: int,
  optimizer: dict,
  options: dict | None = None,
  loss: dict | None = None,
  init_from: str = '',
  reference: str = '',
  model: str = 'policy',
  logs: int = 20,
  checkpoints: int = 4,
  **extra,
) -> ml_collections.ConfigDict:
  """A 'train' stage block of the pipeline (`kuaijax.stages`) training the model role `model`;
  `label` names its row in the experiment's table, `extra` adds fields (e.g. evaluate=False)."""
  CD = ml_collections.ConfigDict
  return CD(
    dict(
      type='train',
      label=label,
      method=method,
      model=model,
      data=data,
      init_from=init_from,
      reference=reference,
      options=CD(options or {}),
      loss=CD(loss or {}),
      train=CD(stage_steps(steps, batch_size, logs=logs, checkpoints=checkpoints)),
      optimizer=CD(optimizer),
      **extra,
    )
  )


def data_section(**overrides) -> ml_collections.ConfigDict:
  """The one `data` layout of every pipeline config; `overrides` set the fields an experiment uses.

  An LM corpus for 'pretrain' stages (`name`, splits, sentencepiece training, packing, data
  order `seed` + training seed, `shards`, per-task evaluation batches) and a task for post-training
  stages (`task`, read as 'task:<split>': `levels`, `limit`; generation widths `prompt_len`,
  `max_new_tokens`) share the tokenizer and `seq_len` fields.
  """
  defaults = dict(
    name='',  # LM corpus: a prepared tfds name, or 'jsonl:/path/{split}.jsonl' ('text' field)
    task='',  # post-training task by name (kuaijax.data.tasks), e.g. 'kj_arith'
    data_dir='',  # '' -> $KUAIJAX_DATA_DIR or ~/tensorflow_datasets
    train_split='train',
    eval_split='validation',
    tokenizer='byte',  # 'sentencepiece' (trained once per pipeline when spm_model_path is '') | 'hf'
    spm_model_path='',
    spm_vocab_size=8192,
    spm_train_examples=20000,  # examples of the train split the tokenizer is trained on
    seq_len=1024,  # training rows
    pack=True,
    seed=1,  # the LM data order of training seed s is data.seed + s
    # LM data shards S (shard s: examples s, s + S, ...; S a multiple or divisor of the process
    # count). The global batches depend on S only, never on the process count; 1: every process
    # reads the one stream and keeps its rows; S = process count reads no example twice.
    shards=1,
    task_names=(),  # the LM corpus' tasks, reported separately by the LM evaluators
    eval_batch_size=64,
    eval_batches=16,
    levels=(),  # task records of these groups only (kj_arith: difficulty levels); () = all
    limit=0,  # task training records (0: the whole split)
    prompt_len=256,  # generation prompt width
    max_new_tokens=128,  # generation budget
  )
  unknown = sorted(set(overrides) - set(defaults))
  if unknown:
    raise ValueError(f'data fields {unknown} are not in the data layout ({sorted(defaults)})')
  return ml_collections.ConfigDict({**defaults, **overrides})


LM_MIXTURE_TASKS = ('code', 'arith', 'copy', 'recall')


def moe_aux_loss(**overrides) -> dict:
  """A 'pretrain' stage's `aux_loss`: weights of the MoE layers' auxiliary losses (load balance,
  router entropy, router z-loss), combined over layers by `aux_reduce` ('mean' or 'sum'). The
  defaults are Top-P MoE's (arXiv 2403.07652); a dense model reports none, so they do nothing."""
  defaults = dict(balance_weight=1e-2, entropy_weight=1e-4, z_loss_weight=0.0, aux_reduce='mean')
  return {**defaults, **overrides}


NO_AUX_LOSS = dict(balance_weight=0.0, entropy_weight=0.0, z_loss_weight=0.0, aux_reduce='mean')


def moe_routings(p: float = 0.4) -> dict[str, dict]:
  """The routing variants of an MoE comparison, as overrides of a model section: 'dense' (SwiGLU),
  'top1' (raw gate, Switch), 'top2' (renormalised over its two experts, GShard / Mixtral) and
  'topp' (dynamic Top-P with threshold p, raw weights, arXiv 2403.07652)."""
  return {
    'dense': dict(mlp='swiglu'),
    'top1': dict(mlp='moe', mlp_options=dict(routing='top_k', k=1)),
    'top2': dict(mlp='moe', mlp_options=dict(routing='top_k', k=2, renormalize=True)),
    'topp': dict(mlp='moe', mlp_options=dict(routing='top_p', p=p)),
  }


def moe_model(model, variant: dict, moe_layer: dict, *, name: str = 'variant'):
  """A model role of an MoE comparison: the model section `model` with `variant`'s overrides; an
  MoE variant (mlp='moe') gets `mlp_options` = `moe_layer` (the options every MoE variant shares:
  num_experts, expert_d_ff, dispatch, k_max) updated by its own `mlp_options`."""
  out = dict(model.to_dict() if hasattr(model, 'to_dict') else model)
  variant = dict(variant)
  layer_options = dict(variant.pop('mlp_options', {}))
  out.update(variant)
  if out['mlp'] == 'moe':
    out['mlp_options'] = {**dict(moe_layer), **layer_options}
  elif layer_options:
    raise ValueError(f'{name}: mlp_options {layer_options} are set but mlp is not "moe"')
  return ml_collections.ConfigDict(out)


def pretrain_stage(
  model: str = 'policy',
  *,
  init_from: str = '',
  train: dict | None = None,
  optimizer: dict | None = None,
  aux_loss: dict | None = None,
  final_evals: dict | None = None,
  **extra,
) -> ml_collections.ConfigDict:
  """A 'pretrain' stage block (`kuaijax.stages.pretrain`): the model role `model` trained on the LM
  corpus of `config.data`; `train` / `optimizer` override the shared sections for this stage,
  `aux_loss` weighs the MoE auxiliary losses (`moe_aux_loss()`; default none), `final_evals` are
  evaluators run once on the final parameters; `extra` adds fields (e.g. a table label)."""
  CD = ml_collections.ConfigDict
  return CD(
    dict(
      type='pretrain',
      model=model,
      init_from=init_from,
      train=CD(train or {}),
      optimizer=CD(optimizer or {}),
      aux_loss=CD(aux_loss or NO_AUX_LOSS),
      final_evals=CD(final_evals or {}),
      **extra,
    )
  )


def load_config_module(path: str):
  """Imports a config file as a module (its get_config, and get_hyper when it declares a sweep)."""
  import importlib.util
  import os

  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location(f'_kuaijax_config_{abs(hash(path))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads 'configs/<paper>/<exp>.py[:arg]' like `--config=` does (for notebooks and tests).

  The result is locked, as on the command line: assigning a key that does not exist is an error.
  """
  path, _, arg = spec.partition(':')
  config = load_config_module(path).get_config(arg or None)
  config.lock()
  return config
