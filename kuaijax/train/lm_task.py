"""Language-model training pieces shared by experiments (lm, topp_moe, pcformer, ...).

`build_lm_data` turns the `data` config section into a tokenizer, a per-process training dataset and
fixed evaluation batches; `lm_loss_fn` is the loss the trainer differentiates (`aux_weights` reads a
pretrain stage's `aux_loss` block); `model_factory` builds the decoder from the `model` section. The
'pretrain' stage type (`kuaijax.stages.pretrain`) puts them together.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import grain
import jax
import jax.numpy as jnp
from flax import nnx

from kuaijax import parallel
from kuaijax.data import pipeline, sources, tokenizers
from kuaijax.evals import registry
from kuaijax.losses.lm import lm_loss
from kuaijax.models import lora
from kuaijax.models.transformer import Transformer, TransformerConfig


@dataclasses.dataclass
class LMData:
  tokenizer: object
  train_dataset: object
  eval_batches: list[dict]
  train_source: Sequence[dict]
  task_names: tuple[str, ...]


def resolve_tokenizer(data_config, workdir: str, train_source, hf_path: str = ''):
  """The configured tokenizer; a SentencePiece model with no path is trained into the workdir.

  `data.tokenizer='hf'` reads tokenizer.json from `hf_path` (the run's `init_from_hf` folder)."""
  if data_config.tokenizer != 'sentencepiece' or data_config.spm_model_path:
    return tokenizers.get_tokenizer(
      data_config.tokenizer,
      spm_model_path=data_config.spm_model_path or None,
      hf_path=hf_path or None,
    )
  prefix = os.path.join(workdir, 'spm')
  limit = data_config.spm_train_examples
  if not os.path.exists(prefix + '.model'):
    if jax.process_index() == 0:
      texts = (train_source[i]['text'] for i in range(min(len(train_source), limit)))
      # Trained under a private name, then moved into place: a killed run leaves no partial model
      # and jobs sharing the folder never read one (training is deterministic).
      tmp = f'{prefix}.tmp{os.getpid()}'
      tokenizers.train_sentencepiece(
        (t.decode() if isinstance(t, bytes) else t for t in texts),
        vocab_size=data_config.spm_vocab_size,
        model_prefix=tmp,
      )
      os.replace(tmp + '.vocab', prefix + '.vocab')
      os.replace(tmp + '.model', prefix + '.model')
    parallel.sync('kuaijax_spm_trained')
  return tokenizers.get_tokenizer('sentencepiece', spm_model_path=prefix + '.model')


def build_lm_data(
  config, workdir: str, *, tokenizer_dir: str = '', model_name: str = 'model'
) -> LMData:
  """Tokenizer, training dataset (per-process micro-batches) and evaluation batches.

  A SentencePiece tokenizer with no `data.spm_model_path` is trained into `tokenizer_dir` (default
  `workdir`) unless it is there already; `model_name` names `config.model` in errors."""
  dc = config.data
  data_dir = dc.data_dir or sources.default_data_dir()
  train_source = sources.get_data_source(dc.name, split=dc.train_split, data_dir=data_dir)
  eval_source = sources.get_data_source(dc.name, split=dc.eval_split, data_dir=data_dir)
  tokenizer = resolve_tokenizer(
    dc, tokenizer_dir or workdir, train_source, config.get('init_from_hf', '')
  )
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
      f'{model_name}.vocab_size={config.model.vocab_size} is smaller than the '
      f'{dc.tokenizer} tokenizer vocabulary ({tokenizer.vocab_size})'
    )
  task_names = tuple(dc.task_names)
  micro = config.train.batch_size // config.train.grad_accum // jax.process_count()
  common = dict(
    tokenizer=tokenizer,
    seq_len=dc.seq_len,
    pack=dc.pack,
    task_names=task_names,
    shard_count=int(dc.get('shards', 1)),
    **parallel.this_process(),
  )
  train_dataset = pipeline.lm_train_dataset_shards(
    train_source, batch_size=micro, seed=dc.seed, **common
  )
  eval_batch = dc.eval_batch_size // jax.process_count()
  # A fixed shuffle (seed 0, independent of the data seed) so that a truncated evaluation set is a
  # sample of every task rather than the split's first examples, identical across runs.
  eval_examples = grain.MapDataset.source(eval_source).shuffle(seed=0)
  eval_batches = pipeline.lm_eval_batches_shards(
    eval_examples, batch_size=eval_batch, num_batches=dc.eval_batches, **common
  )
  return LMData(tokenizer, train_dataset, eval_batches, train_source, task_names)


def eval_context(config, data: LMData) -> registry.EvalContext:
  """What evaluators are built from: the tokenizer, the mesh and the LM evaluation batches."""
  return registry.EvalContext(
    tokenizer=data.tokenizer,
    mesh=parallel.mesh_from_config(config.parallel),
    rules=parallel.rules_dict(config.parallel.rules),
    data=config.data,
    lm_batches=data.eval_batches,
    task_names=data.task_names,
  )


def build_evaluators(config, data: LMData, evals=None):
  """`evals` (default `config.evals`: evaluators by name, `kuaijax.evals.registry`) on the LM
  evaluation batches."""
  return registry.build_evaluators(
    config.evals if evals is None else evals, eval_context(config, data)
  )


def model_factory(model_config, lora_config=None):
  """A `rngs -> Transformer` factory for the trainer; validates the model config first. A non-empty
  `lora_config` (a role's `lora` section) adds LoRA adapters (`kuaijax.models.lora`)."""
  cfg = TransformerConfig.from_config(model_config)
  adapters = lora.LoRAConfig.from_config(lora_config) if lora_config else None

  def build(rngs):
    model = Transformer(cfg, rngs=rngs)
    if adapters is not None:
      lora.apply(model, adapters, rngs=rngs)
    return model

  return build


AUX_REDUCTIONS = ('mean', 'sum')


def aux_weights(aux_loss) -> dict:
  """`lm_loss_fn`'s aux_weights from an `aux_loss` block (`kuaijax.config_lib.moe_aux_loss`)."""
  return {
    'balance_loss': aux_loss['balance_weight'],
    'entropy_loss': aux_loss['entropy_weight'],
    'router_z_loss': aux_loss['z_loss_weight'],
  }


def aux_loss_total(
  mlp_aux: Sequence[dict], weights, *, reduce: str = 'mean'
) -> tuple[jax.Array, dict]:
  """Weighted auxiliary losses reported by feed-forward layers (e.g. MoE), and their scalar stats.

  Each layer's aux dict maps names to arrays (an empty dict for dense layers); `weights` maps a name
  to its coefficient (names with no weight are reported in the metrics only). A weighted name enters
  the loss as `weight * reduce(values over the layers reporting it)`, `reduce` 'mean' (default) or
  'sum'. Metrics: `aux/{name}` (the mean over layers) and `moe/layer{i}/{name}` per layer, for
  scalar entries only: vectors (k_hist, expert_load) and per-token arrays (experts_per_token) would
  be mangled by the trainer's scalar averaging, so evaluators report them
  (`kuaijax.evals.moe_stats`).
  """
  if reduce not in AUX_REDUCTIONS:
    raise ValueError(f'aux_reduce={reduce!r} is not one of {list(AUX_REDUCTIONS)}')
  total, metrics = 0.0, {}
  per_name = {}
  for i, aux in enumerate(mlp_aux):
    for name, value in aux.items():
      if jnp.ndim(value) == 0:
        per_name.setdefault(name, []).append(value)
        metrics[f'moe/layer{i}/{name}'] = value
  for name in sorted(per_name):
    values = per_name[name]
    summed = sum(values)
    metrics[f'aux/{name}'] = summed / len(values)
    if name in weights:
      total = total + weights[name] * (summed if reduce == 'sum' else summed / len(values))
  return total, metrics


def lm_loss_fn(z_loss: float = 0.0, aux_weights=None, aux_reduce: str = 'mean'):
  """`loss_fn(model, batch, rng, frozen=None)` for the trainer: next-token CE on packed batches (+ aux losses).

  aux_weights: coefficient per auxiliary loss name reported by the layers (e.g. the MoE layer's
  'balance_loss', 'entropy_loss', 'router_z_loss'); aux_reduce: how layers combine ('mean'|'sum').
  """
  aux_weights = dict(aux_weights or {})

  def loss_fn(model: nnx.Module, batch: dict, rng, frozen=None):
    del rng, frozen
    logits, extras = model(
      batch['inputs'], positions=batch['positions'], segment_ids=batch['segment_ids']
    )
    loss, metrics = lm_loss(logits, batch['targets'], batch['loss_mask'], z_loss=z_loss)
    aux, aux_metrics = aux_loss_total(extras['mlp_aux'], aux_weights, reduce=aux_reduce)
    return loss + aux, {**metrics, **aux_metrics}

  return loss_fn
