"""A sweep over learning rate and width of the kj_lm_mixture decoder (configs/lm/mixture.py).

`get_config` is the mixture config (same `:arg`s, built by `configs.lm.mixture`);
`get_hyper` declares 3 learning rates x 2 widths.
runlocal (2 CPU cores; 6 runs of the runlocal LM, roughly 6 x its 3 min 30 s on a quiet machine;
not recorded):
  python -m kuaijax.sweep --config=configs/lm/lr_sweep.py:runlocal --workdir=/tmp/kj_lr_sweep
  python -m kuaijax.sweep --config=configs/lm/lr_sweep.py:runlocal --workdir=/tmp/kj_lr_sweep \\
    --collect --metrics=model.loss,model.loss/code,model.loss/arith
commands for a cluster scheduler (full scale; not run):
  python -m kuaijax.sweep --config=configs/lm/lr_sweep.py --workdir=gs://.../lr_sweep --print
"""

from configs.lm import mixture


def get_config(arg=None):
  return mixture.get_config(arg)


def get_hyper(hyper, arg=None):
  runlocal = 'runlocal' in (arg or '')
  return hyper.product(
    [
      hyper.sweep('optimizer.lr', [1e-3, 2e-3, 4e-3] if runlocal else [3e-4, 6e-4, 1.2e-3]),
      hyper.sweep('models.policy.d_model', [96, 128] if runlocal else [512, 768]),
    ]
  )
