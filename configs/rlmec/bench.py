"""Speed of RLMEC's offline stages: sampling, GRM rewriting, reward scoring (and scoring vs forward).

experiments/bench_rlmec.py times the five sides (sampling, GRM rewriting, reward scoring, and the
same padded batches scored vs a plain forward pass) through `kuaijax.benchmarking`: wall clock,
`bench.warmup` untimed calls of each first (compilation), then `bench.rounds` interleaved rounds;
results.md starts with the command and thread count and gives medians with min-max, the scoring /
forward tokens/s ratio as the median (min-max) of per-round ratios.

CPU (0.84M parameters, 32 samples; 2 quiet CPU cores, 2026-12-07, 37 s wall): scoring / plain
forward tokens/s 0.98x (0.95-1.00) per round; stage figures in experiments/rlmec/README.md
  python -m kuaijax.main --config=configs/rlmec/bench.py:runlocal --workdir=/tmp/kj_bench_rlmec
GPU (a ~25M-parameter model, bf16): not recorded (on an H200 the Pallas token_logprobs kernel
failed for this shape and the run did not finish in its slot; see the README)
  python -m kuaijax.main --config=configs/rlmec/bench.py --workdir=/tmp/kj_bench_rlmec
A trained GRM instead of a random model: add --config.init_from=<workdir>/seed_0/grm.
"""

import ml_collections

from kuaijax.config_lib import lm_model, parse_arg, trainer_config


def get_config(arg=None):
  args = parse_arg(arg, runlocal=False)
  config = trainer_config()
  config.experiment = 'bench_rlmec'
  config.init_from = ''  # a workdir (or its checkpoints folder) whose params are timed
  config.data = ml_collections.ConfigDict(
    dict(
      data_dir='',  # '' -> $KUAIJAX_DATA_DIR or ~/tensorflow_datasets
      tokenizer='byte',
      spm_model_path='',
      levels=(1, 2, 3, 4),
      prompt_len=288,
      max_new_tokens=128,
    )
  )
  config.model = lm_model(
    vocab_size=384, d_model=512, num_layers=8, num_heads=8, num_kv_heads=4, d_ff=1536
  )
  config.bench = ml_collections.ConfigDict(
    dict(
      problems=256,
      num_samples=4,
      temperature=0.7,
      top_p=0.95,
      batch_size=128,
      grm_prompt_len=896,  # GRM prompts: instruction + problem + gold + prediction
      rounds=5,  # timed rounds, each side once per round, in turn
      warmup=1,  # untimed calls of each side first (compilation)
    )
  )
  if args.runlocal:
    config.data.update(levels=(1, 2), prompt_len=224, max_new_tokens=96)
    config.model.update(
      d_model=128, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=384, dtype='float32'
    )
    config.bench.update(problems=16, num_samples=2, batch_size=16, grm_prompt_len=640)
  return config
