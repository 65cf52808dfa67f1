"""Many-shot in-context learning by gradient matching: demonstrations chosen by matching the mean
fine-tuning gradient of the whole training pool (under a small proxy model) against random,
best-of-n random, BM25 and embedding k-means selection, evaluated on a larger target model.

Stages (the stage pipeline; training seed s in `<workdir>/seed_<s>/`):
`icl_tasks` (seed-free: the evaluation sets, a training pool, dev and test split each) and
`icl_meta_data` (seed-free: rows of many fresh tasks) -> `proxy` (model role `proxy`, trained once,
`shared_seed` 0) and `target` (role `policy`, one per training seed), both taught to read a table
in context -> `features` (the proxy's projected per-example gradients and mean hidden states of the
pool) -> `select` (every method's demonstrations, once per set, reused across k) -> `icl_eval`
(the target's greedy accuracy on the test split per method and k; best-of-n by dev accuracy).

The toy sets (`kuaijax.data.icl_toy`): hidden lookup tables key -> label with Zipf-distributed keys
('colors' 5 labels, 'yes_no' 2, 'digits' 10); a model answers a query from demonstrations with the
same key, so accuracy follows the share of the test distribution the demonstrations cover.

runlocal (2 CPU cores; no table yet: at this size the target had not learned to copy a label from
its context after 500-1000 steps, see experiments/icl/README.md):
  python -m kuaijax.main --config=configs/icl/gradient_matching.py:runlocal --workdir=workdirs/icl_gm
gpu (one GPU, ~10 minutes; not run on a device yet): a larger target, more sets examples and seeds
  python -m kuaijax.main --config=configs/icl/gradient_matching.py:gpu --workdir=workdirs/icl_gm_gpu
Imported models and task files (Hugging Face folders; jsonl files of prompt / completion records
per set and split, e.g. /data/icl/sst2/train.jsonl): no training, the proxy and target as they are
  python -m kuaijax.main --config=configs/icl/gradient_matching.py:proxy_hf=/models/Qwen2.5-0.5B,\
target_hf=/models/Qwen2.5-3B,files=/data/icl/{set}/{split}.jsonl,sets=sst2+agnews --workdir=...
Args: `seeds=0+1+2` (target training seeds), `ks=4+8+16+32+64+128`, `sets=` (toy set names or the
file sets), `files=`, `proxy_hf=`, `target_hf=`.
"""

import ml_collections

from kuaijax.config_lib import (
  data_section,
  lm_model,
  parse_arg,
  parse_ints,
  parse_seeds,
  stage_steps,
  train_stage,
  trainer_config,
)
from kuaijax.stages.icl import METHODS

CD = ml_collections.ConfigDict


def _model(d_model: int, num_layers: int) -> CD:
  return lm_model(
    vocab_size=259,
    d_model=d_model,
    num_layers=num_layers,
    num_heads=4,
    num_kv_heads=2,
    d_ff=3 * d_model,
    dtype='float32',
  )


def _meta_train(label: str, model: str, steps: int, batch_size: int, lr: float) -> CD:
  return train_stage(
    'sft',
    label,
    data='meta_data',
    model=model,
    steps=steps,
    batch_size=batch_size,
    optimizer=dict(lr=lr, warmup_steps=max(1, steps // 20)),
    logs=20,
    checkpoints=2,
    evaluate=False,
  )


def get_config(arg=None):
  args = parse_arg(
    arg,
    runlocal=False,
    gpu=False,
    seeds='0+1+2',
    ks='4+8+16+32+64+128',
    sets='colors+yes_no+digits',
    files='',
    proxy_hf='',
    target_hf='',
  )
  if args.runlocal and args.gpu:
    raise ValueError(f'config arg {arg!r}: runlocal and gpu are alternatives; pick one')
  if bool(args.proxy_hf) != bool(args.target_hf):
    raise ValueError(f'config arg {arg!r}: give both proxy_hf and target_hf, or neither')
  imported = bool(args.proxy_hf)
  config = trainer_config()
  config.experiment = 'icl'
  config.seeds = parse_seeds('0' if imported else args.seeds)
  config.data = data_section(
    task='',  # the sets come from the icl_tasks stage
    tokenizer='hf' if imported else 'byte',
    seq_len=1024,  # meta-training rows (120 lines of at most 8 bytes)
    prompt_len=1024,  # the target's context for k-shot prompts (longer: earliest demos dropped)
    max_new_tokens=8,
  )
  ks = parse_ints(args.ks, 'ks')
  sets = tuple(s for s in args.sets.replace(',', '+').split('+') if s)
  stage = CD()
  stage.tasks = CD(
    dict(
      type='icl_tasks', sets=sets, train=400, dev=50, test=100, noise=0.0, seed=0, files=args.files
    )
  )
  if imported:
    config.models = CD(
      dict(
        policy=CD(dict(hf=args.target_hf, dtype='float32')),
        proxy=CD(dict(hf=args.proxy_hf, dtype='float32')),
      )
    )
    stage.proxy = CD(dict(type='params', label='proxy (imported)', model='proxy'))
    stage.target = CD(dict(type='params', label='target (imported)', model='policy'))
  else:
    config.models = CD(dict(policy=_model(128, 4), proxy=_model(64, 2)))
    stage.meta_data = CD(
      dict(type='icl_meta_data', rows=20_000, lines=120, repeat_share=0.5, seed=1)
    )
    stage.proxy = _meta_train('proxy', 'proxy', steps=2000, batch_size=16, lr=2e-3)
    stage.proxy.shared_seed = 0  # one selector; the training seeds vary the target
    stage.target = _meta_train('target', 'policy', steps=4000, batch_size=16, lr=1e-3)
  stage.features = CD(
    dict(
      type='grad_features',
      model='proxy',
      data='tasks',
      select='',
      projection_dim=2048,
      batch_size=32,
    )
  )
  stage.select = CD(
    dict(
      type='icl_select',
      data='tasks',
      features='features',
      methods=METHODS,
      ks=ks,
      draws=3,  # random selections per k (the random row's spread)
      best_of_n=4,  # candidates of best-of-n per k, judged on dev
      bm25_unit='word',
      bm25_n=1,
    )
  )
  stage.icl_eval = CD(
    dict(
      type='icl_eval',
      policy='target',
      data='tasks',
      selection='select',
      batch_size=50,
      max_new_tokens=8,
    )
  )
  config.stage = stage
  config.evals = CD()  # the icl_eval stage is the evaluation
  config.stages = 'icl_eval'
  config.train.update(progress=False)
  if args.runlocal:
    # A 512-token context: k=128 prompts of colors keep their last ~70 demonstrations (the others all).
    config.data.update(seq_len=512, prompt_len=512)
    stage.meta_data.update(rows=6000, lines=60)
    stage.proxy.train.update(stage_steps(400, 8, logs=20, checkpoints=2))
    stage.target.train.update(stage_steps(1500, 8, logs=30, checkpoints=3))
    stage.proxy.optimizer.update(lr=3e-3, warmup_steps=20)
    stage.target.optimizer.update(lr=3e-3, warmup_steps=50)
  if args.gpu:
    config.models.policy = _model(256, 6)
    stage.tasks.update(train=1000, dev=100, test=300)
    stage.select.update(draws=5, best_of_n=8)
  return config
