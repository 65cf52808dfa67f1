"""Perplexity and greedy samples of a Hugging Face model folder on a JSONL file of texts.

An evaluation-only pipeline (`kuaijax.stages`): the 'base' stage imports the folder as the model
role 'policy' and the evaluators score it as it is. Every line of the eval file is a JSON object
with a "text" field; each text is tokenized with the folder's tokenizer.json (BOS added when the
tokenizer adds one) and scored in full (up to `max_len` tokens). Writes results.json (mean_nll in
nats per predicted token, perplexity, tokens), results.md (the table and a few greedy generations)
and nll_by_position.png; each stage's numbers are in WD/shared/<stage>/stage.json.

  python -m kuaijax.main --config=configs/hf/eval.py:path=/models/Qwen2.5-0.5B \
    --workdir=/tmp/kj_hf_eval --config.eval_file=texts.jsonl

A PEFT LoRA adapter of the folder (`adapter_config.json` + `adapter_model.safetensors`, e.g. from
`peft`'s `save_pretrained` or `kuaijax.hf.peft_io.save_adapter`) is scored merged into the base with
`--config.lora=ADAPTER_DIR` (every role of the pipeline then carries it).

MoE models: `:path=...,top_p_sweep=0.2+0.4+0.6+0.8+1.0` also imports the model with dynamic Top-P
routing (k_max = all experts) at each p (one model role and 'params' stage each) and reports mean
experts per token and perplexity per p (top_p_sweep.png). Large models: `:dtype=bfloat16` and a mesh
(`--config.parallel.mesh.fsdp=8`) load the weights straight onto the devices, sharded. Options of
the evaluators: `--config.evals.text.max_len=4096`, `--config.evals.generations.max_new_tokens=64`.
Finished stages are kept when the command is run again (their evaluation included): evaluate
another file in a fresh workdir.
Hardware: any; CPU for models up to ~1B parameters. Wall time and numbers: not recorded (they
depend on the model and file; CI runs it on a tiny exported model in seconds).
"""

import ml_collections

from kuaijax.config_lib import data_section, parse_arg, trainer_config

CD = ml_collections.ConfigDict


def top_p_role(p: float) -> str:
  """The model role (and stage) name of Top-P routing at p: 0.2 -> 'top_p_0_2'."""
  return 'top_p_' + format(p, 'g').replace('.', '_')


def get_config(arg=None):
  args = parse_arg(arg, path='', dtype='float32', top_p_sweep='', runlocal=False)
  if not args.path:
    raise ValueError('configs/hf/eval.py needs :path=<Hugging Face model folder>')
  config = trainer_config()
  config.experiment = 'hf_eval'
  config.seeds = (0,)  # nothing is trained or sampled: one pipeline run
  config.data = data_section(tokenizer='hf')  # the policy folder's tokenizer.json
  # parameter and compute dtype: float32 | bfloat16
  config.lora = ''  # a PEFT adapter folder of the model, merged in when set
  policy = dict(hf=args.path, dtype=args.dtype, param_dtype=args.dtype, peft=config.get_ref('lora'))
  config.models = CD(dict(policy=policy))
  config.stage = CD(dict(base=dict(type='params', model='policy')))
  stages = ['base']
  # MoE only: Top-P routing (k_max = all experts) at each p, e.g. top_p_sweep=0.2+0.5+1.0
  ps = list(dict.fromkeys(float(p) for p in args.top_p_sweep.split('+') if p.strip()))
  if ps:
    from kuaijax.hf import model_io

    section = model_io.model_section(args.path)
    num_experts = dict(section.get('mlp_options') or {}).get('num_experts')
    if section.get('mlp') != 'moe' or not num_experts:
      raise ValueError('top_p_sweep needs an MoE model (mixtral, qwen2_moe, qwen3_moe)')
    for p in ps:
      routing = dict(routing='top_p', p=p, k_max=num_experts)
      config.models[top_p_role(p)] = CD({**policy, 'mlp_options': routing})
      config.stage[top_p_role(p)] = CD(dict(type='params', model=top_p_role(p)))
      stages.append(top_p_role(p))
  config.stages = '+'.join(stages)
  config.eval_file = ''  # JSONL, one {"text": ...} per line (required); both evaluators read it
  eval_file = config.get_ref('eval_file')
  config.evals = CD(
    dict(
      text=dict(
        type='text_perplexity',
        eval_file=eval_file,
        batch_size=8,  # texts per scoring batch (a multiple of the batch mesh size)
        max_len=2048,  # longer texts are cut to their first max_len tokens (counted)
        max_texts=0,  # 0: all lines of the file
        moe_stats=True,  # MoE models: experts per token on the same texts
      ),
      generations=dict(
        type='greedy_continuations',
        eval_file=eval_file,
        num_generations=3,  # greedy continuations of the first texts' first halves
        prompt_tokens=32,  # at most this many prompt tokens per generation
        max_new_tokens=32,
      ),
    )
  )
  if args.runlocal:
    config.evals.text.update(batch_size=8, max_len=256, max_texts=64)
    config.evals.generations.update(max_new_tokens=16)
  return config
