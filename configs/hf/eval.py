"""Perplexity and greedy samples of a Hugging Face model folder on a JSONL file of texts.

Every line of the eval file is a JSON object with a "text" field; each text is tokenized with the
folder's tokenizer.json (BOS added when the tokenizer adds one) and scored in full (up to
`max_len` tokens). Writes results.json (mean_nll in nats per predicted token, perplexity, tokens),
results.md (the table and a few greedy generations) and nll_by_position.png.

  python -m kuaijax.main --config=configs/hf/eval.py:path=/models/Qwen2.5-0.5B \
    --workdir=/tmp/kj_hf_eval --config.eval_file=texts.jsonl

MoE models: `--config.top_p_sweep=0.2,0.4,0.6,0.8,1.0` also scores the model with dynamic Top-P
routing (k_max = all experts) at each p and reports mean experts per token and perplexity per p
(top_p_sweep.png). Large models: `:dtype=bfloat16` and a mesh (`--config.parallel.mesh.fsdp=8`)
load the weights straight onto the devices, sharded.
Hardware: any; CPU for models up to ~1B parameters. Wall time and numbers: not recorded (they
depend on the model and file; CI runs it on a tiny exported model in seconds).
"""

import ml_collections

from kuaijax.config_lib import parse_arg, trainer_config


def get_config(arg=None):
  args = parse_arg(arg, path='', dtype='float32', runlocal=False)
  if not args.path:
    raise ValueError('configs/hf/eval.py needs :path=<Hugging Face model folder>')
  config = ml_collections.ConfigDict()
  config.experiment = 'hf_eval'
  config.hf_path = args.path
  config.dtype = args.dtype  # parameter and compute dtype: float32 | bfloat16
  config.eval_file = ''  # JSONL, one {"text": ...} per line (required)
  config.batch_size = 8  # texts per scoring batch (a multiple of the batch mesh size)
  config.max_len = 2048  # longer texts are cut to their first max_len tokens (counted)
  config.max_texts = 0  # 0: all lines of the file
  config.num_generations = 3  # greedy continuations of the first texts' first halves
  config.prompt_tokens = 32  # at most this many prompt tokens per generation
  config.max_new_tokens = 32
  config.top_p_sweep = ''  # MoE only: comma-separated p values, e.g. '0.2,0.5,1.0'
  config.parallel = trainer_config().parallel
  if args.runlocal:
    config.update(batch_size=8, max_len=256, max_texts=64, max_new_tokens=16)
  return config
