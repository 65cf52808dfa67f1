"""Real multi-process runs on CPU through `kuaijax.launch` (JAX CPU collectives, gloo).

The runlocal LM shrunk to a few steps on a (data 2, fsdp 2, tensor 2) mesh with the default data
settings: 2 processes x 4 devices must give the losses, final parameters and results of 1 process
x 8 devices, also when the run is SIGKILLed at a random point and started again, and when it is
resumed on another process count and mesh.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from kuaijax import launch, parallel
from kuaijax.config_lib import load_config
from kuaijax.data import sources
from kuaijax.data.records import read_records
from kuaijax.main import run_experiment
from kuaijax.stages import roles
from kuaijax.train.checkpoint import CheckpointError, load_params
from kuaijax.train.metrics import read_metrics
from tests import sigkill
from tests.conftest import REPO_ROOT

OVERRIDES = {
  'data.seq_len': 128,
  'data.eval_batch_size': 16,
  'data.eval_batches': 2,
  'models.policy.d_model': 32,
  'models.policy.num_layers': 2,
  'models.policy.num_heads': 2,
  'models.policy.num_kv_heads': 1,
  'models.policy.d_ff': 64,
  'train.batch_size': 8,
  'train.steps': 4,
  'train.log_every': 1,
  'train.eval_every': 100,
  'train.checkpoint_every': 2,
  'train.async_checkpoint': False,
  'train.progress': False,
  'eval.unigram_max_examples': 50,
  'parallel.mesh.data': 2,
  'parallel.mesh.fsdp': 2,
  'parallel.mesh.tensor': 2,
}
CONFIG = 'configs/lm/mixture.py:runlocal'
TIMEOUT_S = 240


def _config(config=CONFIG, overrides=OVERRIDES):
  config = load_config(os.path.join(REPO_ROOT, config))
  config.update_from_flattened_dict(overrides)
  return config


def _launch(
  workdir,
  *,
  module='kuaijax.main',
  mode=(),
  env=None,
  processes=2,
  devices=4,
  config=CONFIG,
  overrides=OVERRIDES,
):
  """Runs the launcher as its own process, as a user would; returns its status."""
  cmd = _launch_command(workdir, module, mode, processes, devices, config, overrides)
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env={**os.environ, **(env or {})})
  try:
    return proc.wait(timeout=TIMEOUT_S)
  finally:
    if proc.poll() is None:
      proc.terminate()  # the launcher stops its processes on SIGTERM
      proc.wait(timeout=30)


def _launch_command(
  workdir,
  module='kuaijax.main',
  mode=(),
  processes=2,
  devices=4,
  config=CONFIG,
  overrides=OVERRIDES,
):
  """`python -m kuaijax.launch ... -- <module args>` (see `_launch`)."""
  return [
    *(sys.executable, '-m', 'kuaijax.launch', f'--processes={processes}'),
    *(f'--devices_per_process={devices}', f'--module={module}', '--timeout=60', '--'),
    *mode,
    f'--config={config}',
    f'--workdir={workdir}',
    *(f'--config.{k}={v}' for k, v in overrides.items()),
  ]


def _stage(workdir):
  """The LM pipeline's training stage folder (configs/lm/mixture.py: stage 'lm', seed 0)."""
  return workdir / 'seed_0' / 'lm'


def _final_params(workdir, config=CONFIG, overrides=OVERRIDES, *, stage_dir=None):
  """The latest checkpoint's params on this process's first device, whoever wrote them: of the LM
  pipeline's stage in `workdir`, or of the stage folder `stage_dir`."""
  config = _config(config, overrides)
  config.parallel.num_devices = 1
  config.parallel.mesh.update(data=1, fsdp=1, tensor=1)
  layout = roles.layout(config, 'policy')
  folder = stage_dir if stage_dir is not None else _stage(workdir)
  params, _ = load_params(str(folder), layout.abstract_params, layout.shardings)
  return jax.device_get(params)


def _losses(workdir):
  return {r['step']: r['loss'] for r in read_metrics(workdir) if 'loss' in r}


def _assert_same_losses(reference, run, *, steps: int):
  """`run` logged steps 1..steps with the losses of `reference` (within 1e-5)."""
  expected, got = _losses(reference), _losses(run)
  assert sorted(got) == list(range(1, steps + 1))
  np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=0, atol=1e-5)


def _assert_same_run(reference, workdir):
  """The LM run in `workdir` logged the losses of `reference` once per step, ended with its
  parameters (within 1e-5) and reported its evaluation and unigram baseline."""
  _assert_same_losses(_stage(reference), _stage(workdir), steps=OVERRIDES['train.steps'])
  # Workdir files are written once, by process 0: one line per logged step.
  steps = [r['step'] for r in read_metrics(_stage(workdir)) if 'loss' in r]
  assert steps == list(range(1, OVERRIDES['train.steps'] + 1))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5),
    _final_params(reference),
    _final_params(workdir),
  )
  # The evaluation and the unigram baseline cover every process's batches, whatever the count.
  one, two = (json.loads((w / 'results.json').read_text()) for w in (reference, workdir))
  assert two['unigram'] == pytest.approx(one['unigram'], rel=1e-6)  # gathered in float32
  assert two['model']['loss'] == pytest.approx(one['model']['loss'], abs=1e-5)


def _data_files(workdir, step):
  """The data-position files of the LM stage's checkpoint `step`."""
  folder = _stage(workdir) / 'checkpoints' / str(step) / 'data'
  return sorted(f for f in os.listdir(folder) if f.endswith('.json'))


@pytest.fixture(scope='module')
def built_data():
  """Builds the data set once here so that the processes do not race to build it."""
  for split in ('train', 'validation'):
    sources.get_data_source('kj_lm_mixture', split=split)


def _run_helper(mode: str, devices: int, env: dict) -> int:
  """`tests.launch_helper <mode>` on 2 processes sharing `devices` CPU devices; its exit status."""
  cmd = [sys.executable, '-m', 'kuaijax.launch', '--processes=2', f'--devices={devices}']
  cmd += ['--module=tests.launch_helper', '--', mode]
  return subprocess.run(cmd, cwd=REPO_ROOT, env={**os.environ, **env}, timeout=TIMEOUT_S).returncode


def test_two_processes_run_cpu_collectives(tmp_path):
  assert _run_helper('sum', 4, {'KJ_OUT': str(tmp_path)}) == 0
  for p in range(2):  # rows 0..3, two from each process, summed across the processes
    assert json.loads((tmp_path / f'{p}.json').read_text()) == [2, 4, 2, 6.0]


@pytest.fixture(scope='module')
def uninterrupted(built_data, tmp_path_factory):
  """The LM trained without interruption on 1 process x 8 devices, mesh (data 2, fsdp 2, tensor 2)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  run_experiment(_config(), str(workdir))
  return workdir


def test_two_processes_match_one_process_with_the_default_data(uninterrupted, tmp_path):
  """data.shards left at its default: every process reads the one data stream and keeps its rows
  of each global batch, so 2 processes x 4 devices train on the batches of 1 process x 8 and log
  the same losses; the data position is one file, written by process 0."""
  workdir = tmp_path / 'two_processes'
  assert _launch(workdir) == 0
  _assert_same_run(uninterrupted, workdir)
  assert _data_files(workdir, OVERRIDES['train.steps']) == ['shard_0-of-1.json']


def test_two_processes_sigkilled_at_a_random_point_resume_like_one_process(uninterrupted, tmp_path):
  """`kuaijax.launch --processes 2` SIGKILLed at a random point (mid-step, or while a checkpoint
  is being written, also the final one) with a random target (the launcher and its processes, the
  launcher alone: its processes die with it, or one process's group: the launcher then stops the
  other), then the same command again: the run
  ends with the losses, parameters and results of 1 process x 8 devices uninterrupted."""
  workdir = tmp_path / 'run'
  point = sigkill.draw_kill_point(
    logged=[1, 2, 3],
    checkpointing=[2, 4],
    max_delay=0.2,
    targets=('all', 'launcher', 'process 0', 'process 1'),
  )
  kill = sigkill.kill_at(point, _launch_command(workdir), _stage(workdir), env=dict(os.environ))
  assert kill.killed and not (_stage(workdir) / 'stage.json').exists(), kill
  assert _launch(workdir) == 0
  _assert_same_run(uninterrupted, workdir)


MESHES = {
  'd2f2t2': {'parallel.mesh.data': 2, 'parallel.mesh.fsdp': 2, 'parallel.mesh.tensor': 2},
  'f4e2': {
    'parallel.mesh.data': 1,
    'parallel.mesh.fsdp': 4,
    'parallel.mesh.tensor': 1,
    'parallel.mesh.expert': 2,
  },
}


@pytest.mark.parametrize(
  'first, then',
  [((2, 'd2f2t2'), (1, 'f4e2')), ((1, 'd2f2t2'), (2, 'f4e2'))],
  ids=['2proc_to_1proc', '1proc_to_2proc'],
)
def test_full_state_resumes_on_another_process_count_and_mesh(uninterrupted, tmp_path, first, then):
  """SIGKILLed once the step-2 checkpoint is written, resumed with a different process count and
  mesh: the optimizer state, step and data position (one file, whatever the process count)
  carry over."""
  workdir = tmp_path / 'run'
  (p1, mesh1), (p2, mesh2) = first, then
  overrides = {**OVERRIDES, **MESHES[mesh1]}
  command = _launch_command(workdir, processes=p1, devices=8 // p1, overrides=overrides)
  kill = sigkill.kill_after_checkpoints(command, _stage(workdir), count=1, env=dict(os.environ))
  assert kill.killed and kill.checkpoints == [2], kill
  assert _data_files(workdir, 2) == ['shard_0-of-1.json']
  resumed = _launch(
    workdir, processes=p2, devices=8 // p2, overrides={**OVERRIDES, **MESHES[mesh2]}
  )
  assert resumed == 0
  _assert_same_run(uninterrupted, workdir)


def test_resume_with_other_data_shards_is_a_clear_error(uninterrupted, tmp_path):
  """The data position is per shard: a different data.shards cannot continue it (named)."""
  workdir = tmp_path / 'run'
  shutil.copytree(uninterrupted, workdir)
  shutil.rmtree(_stage(workdir) / 'checkpoints' / '4')
  (_stage(workdir) / 'stage.json').unlink()  # the stage is unfinished again
  config = _config(overrides={**OVERRIDES, 'data.shards': 4})
  with pytest.raises(CheckpointError, match='shard_0-of-4.json') as error:
    run_experiment(config, str(workdir))
  assert 'data.shards' in str(error.value)
  assert sorted(os.listdir(_stage(workdir) / 'checkpoints')) == ['2']  # nothing lost


def test_params_restore_onto_two_processes_and_another_mesh(uninterrupted, tmp_path):
  """The (data 2, fsdp 2, tensor 2) checkpoint loaded by 2 processes onto (fsdp 4, expert 2)."""
  env = {
    'KJ_WORKDIR': str(_stage(uninterrupted)),
    'KJ_MESH': 'fsdp=4,expert=2',
    'KJ_OUT': str(tmp_path),
  }
  assert _run_helper('params', 8, env) == 0
  params = jax.tree_util.tree_flatten_with_path(_final_params(uninterrupted))[0]
  expected = {jax.tree_util.keystr(k): float(np.sum(np.square(v))) for k, v in params}
  for p in range(2):
    got = json.loads((tmp_path / f'{p}.json').read_text())
    assert got == pytest.approx(expected, rel=1e-6)


MOE_CONFIG = 'configs/topp_moe/compare.py:runlocal'
MOE_OVERRIDES = {
  **{
    k.replace('models.policy.', 'models.top2.'): v
    for k, v in OVERRIDES.items()
    if k.split('.')[0] in ('models', 'train')
  },
  'data.seq_len': 64,
  'data.eval_batch_size': 8,
  'data.eval_batches': 1,
  'models.top2.num_kv_heads': 2,
  'models.top2.mlp_options.num_experts': 4,
  'models.top2.mlp_options.expert_d_ff': 32,
  'stages': 'top2',
  'parallel.mesh.data': 1,
  'parallel.mesh.expert': 4,
}


@pytest.mark.slow
def test_moe_with_experts_across_two_processes_matches_one_process(built_data, tmp_path):
  """Top-2 MoE with its 4 experts on 4 devices of 2 processes (all-to-all over gloo)."""
  config = load_config(os.path.join(REPO_ROOT, MOE_CONFIG))
  config.update_from_flattened_dict({**MOE_OVERRIDES, 'parallel.num_devices': 4})
  reference = tmp_path / 'one_process'
  run_experiment(config, str(reference))
  workdir = tmp_path / 'two_processes'
  assert _launch(workdir, devices=2, config=MOE_CONFIG, overrides=MOE_OVERRIDES) == 0
  _assert_same_losses(reference / 'seed_0' / 'top2', workdir / 'seed_0' / 'top2', steps=4)
  one = json.loads((reference / 'results.json').read_text())['variants']['top2']['eval']
  two = json.loads((workdir / 'results.json').read_text())['variants']['top2']['eval']
  assert abs(one['loss'] - two['loss']) < 1e-5


def test_moe_layer_with_experts_across_two_processes_matches_one_device(tmp_path):
  """The tiny version of the test above: a Top-P MoE layer (4 experts, 1 or 2 per token) on
  2 processes x 2 devices, one expert per device, tokens exchanged by all-to-all over gloo; y and
  every gradient equal the all-experts layer on one device of this process."""
  from tests.launch_helper import moe_grads

  assert _run_helper('moe', 4, {'KJ_OUT': str(tmp_path)}) == 0
  got = np.load(tmp_path / 'moe.npz')
  assert bool(got['all_to_all'])  # the program exchanges tokens between devices
  y, grads, _ = moe_grads()
  # float32, the same sums in another order (|y| <= 1.4, gradients <= 6): a few ulps.
  np.testing.assert_allclose(got['y'], y, rtol=1e-5, atol=1e-5)
  for i, g in enumerate(grads):
    np.testing.assert_allclose(got[f'd{i}'], g, rtol=1e-5, atol=1e-5, err_msg=f'gradient {i}')


def test_a_failing_process_stops_the_others(tmp_path):
  env = {**os.environ, 'KJ_PID_DIR': str(tmp_path)}
  cmd = [sys.executable, '-m', 'kuaijax.launch', '--processes=3', '--module=tests.launch_helper']
  out = subprocess.run([*cmd, '--', 'fail'], cwd=REPO_ROOT, env=env, timeout=TIMEOUT_S)
  assert out.returncode == 7
  for name in os.listdir(tmp_path):
    assert not sigkill.running(int(name.removesuffix('.pid')))


def test_killing_the_launcher_stops_its_processes(tmp_path):
  env = {**os.environ, 'KJ_PID_DIR': str(tmp_path)}
  cmd = [sys.executable, '-m', 'kuaijax.launch', '--processes=1', '--module=tests.launch_helper']
  launcher = subprocess.Popen([*cmd, '--', 'fail'], cwd=REPO_ROOT, env=env)
  try:
    deadline = time.monotonic() + TIMEOUT_S
    while not os.listdir(tmp_path) and time.monotonic() < deadline:
      time.sleep(0.1)
    (name,) = os.listdir(tmp_path)
    child = int(name.removesuffix('.pid'))
    launcher.kill()  # SIGKILL: the launcher cannot clean up; the child's parent-death signal does
    launcher.wait(timeout=30)
    while time.monotonic() < deadline and sigkill.running(child):
      time.sleep(0.1)
    assert not sigkill.running(child)
  finally:
    if launcher.poll() is None:
      launcher.kill()


def test_unreachable_coordinator_is_a_clear_error_in_bounded_time(monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', f'127.0.0.1:{launch.free_port()}')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.setenv('JAX_PROCESS_ID', '1')
  monkeypatch.setenv(parallel.INIT_TIMEOUT_ENV, '1')
  with pytest.raises(
    TimeoutError, match='JAX coordinator 127.0.0.1:[0-9]+ was unreachable for 1 s'
  ):
    parallel.maybe_initialize_distributed()
  monkeypatch.delenv('JAX_PROCESS_ID')
  with pytest.raises(ValueError, match='set both JAX_NUM_PROCESSES and JAX_PROCESS_ID'):
    parallel.maybe_initialize_distributed()


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--processes=2', '--devices=7', '--', 'x'], '--devices=7 is not divisible by --processes=2'),
    (['--processes=0', '--', 'x'], '--processes=0 must be >= 1'),
    (['--processes=2', 'x'], 'usage'),
  ],
)
def test_bad_launcher_arguments_are_named(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    launch.parse_args(argv)
  assert message in str(e.value) + capsys.readouterr().err


def test_process_env_sets_the_coordinator_contract():
  env = launch.process_env(
    {'XLA_FLAGS': '--xla_force_host_platform_device_count=8 --foo'},
    index=1,
    processes=2,
    devices=4,
    address='127.0.0.1:1234',
    timeout_s=9,
  )
  assert env['XLA_FLAGS'] == '--foo --xla_force_host_platform_device_count=4'
  assert (env['JAX_NUM_PROCESSES'], env['JAX_PROCESS_ID']) == ('2', '1')
  assert env['JAX_COORDINATOR_ADDRESS'] == '127.0.0.1:1234'
  assert env['JAX_CPU_COLLECTIVES_IMPLEMENTATION'] == 'gloo'


@pytest.mark.parametrize('name', ['tpu_pod.sh', 'slurm_gpu.sbatch', 'multi_gpu.sh'])
def test_launch_recipes_are_valid_executable_scripts(name):
  path = os.path.join(REPO_ROOT, 'configs', 'launch', name)
  assert os.access(path, os.X_OK)
  subprocess.run(['bash', '-n', path], check=True)
  with open(path) as f:
    assert 'python -m kuaijax.main --config=' in f.read()


POSTTRAIN_CONFIG = 'configs/arith/posttrain.py:runlocal,stages=sft+dpo+rft+grpo'
POSTTRAINED = ('sft', 'dpo', 'rft', 'grpo')
POSTTRAIN_OVERRIDES = {
  'models.policy.d_model': 32,
  'models.policy.num_layers': 1,
  'models.policy.num_heads': 2,
  'models.policy.num_kv_heads': 1,
  'models.policy.d_ff': 64,
  'data.limit': 64,
  'train.async_checkpoint': False,
  'train.progress': False,
  'parallel.mesh.data': 8,
  'stage.sft.optimizer.lr': 1e-2,
  'stage.sft.optimizer.warmup_steps': 1,
  'stage.samples.limit': 8,
  'stage.samples.batch_size': 8,
  'stage.pairs.gold_fallback': True,
  'stage.grpo.optimizer.lr': 1e-3,
  'stage.grpo.optimizer.warmup_steps': 1,
  'stage.grpo.options.group_size': 2,
  'stage.grpo.options.offline_injection': True,
  'stage.grpo.options.advantage_scale': 'batch',
  'evals.arith.groups': (1,),
  'evals.arith.per_group': 8,
  'evals.arith.seeds': (0,),
  'evals.arith.batch_size': 8,
  **{
    f'stage.{name}.train.{key}': value
    for name in POSTTRAINED
    for key, value in dict(
      steps=3, batch_size=8, log_every=1, checkpoint_every=3, eval_every=3
    ).items()
  },
}


def _assert_same_records(one, two):
  """The data sets two stage folders wrote are equal (log-probs and probabilities within 1e-5:
  another reduction order on another layout)."""
  rows = [read_records(str(w / 'data.jsonl')) for w in (one, two)]
  assert len(rows[0]) == len(rows[1]) > 0
  for a, b in zip(*rows):
    assert a.keys() == b.keys()
    for key in a:
      if 'logp' in key or 'prob' in key or 'reward' in key:
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5)
      else:
        assert a[key] == b[key], (one, key)


def _stage_results(workdir):
  """Per stage: logged training metrics by step, the evaluation, and the final params."""
  out = {}
  for name in POSTTRAINED:
    info = json.loads((workdir / name / 'stage.json').read_text())
    metrics = {r['step']: r for r in read_metrics(str(workdir / name)) if 'loss' in r}
    params = _final_params(None, POSTTRAIN_CONFIG, POSTTRAIN_OVERRIDES, stage_dir=workdir / name)
    out[name] = metrics, info['eval'], params
  return out


def test_posttraining_on_two_processes_matches_one_process(tmp_path):
  """SFT -> samples -> pairs -> DPO (reference log-probs precomputed) and RFT, and online GRPO
  (offline injection and batch-scaled advantages, which need every process's groups), as
  2 processes x 4 devices and as 1 process x 8 devices."""
  one, two = tmp_path / 'one_process', tmp_path / 'two_processes'
  common = dict(config=POSTTRAIN_CONFIG, overrides=POSTTRAIN_OVERRIDES)
  assert _launch(one, processes=1, devices=8, **common) == 0
  assert _launch(two, processes=2, devices=4, **common) == 0
  one, two = one / 'seed_0', two / 'seed_0'
  for stage in ('samples', 'pairs'):  # written once, by process 0: the same samples and pairs
    _assert_same_records(one / stage, two / stage)
  expected, got = _stage_results(one), _stage_results(two)
  for name in POSTTRAINED:
    (m1, e1, p1), (m2, e2, p2) = expected[name], got[name]
    assert sorted(m2) == [1, 2, 3]
    for step in m1:
      for key in ('loss', 'accuracy', 'reward', 'injected', 'zero_advantage_fraction'):
        if key in m1[step]:
          assert abs(m1[step][key] - m2[step][key]) < 1e-5, (name, step, key)
    assert e1 == pytest.approx(e2, abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-5), p1, p2)
  grpo = expected['grpo'][0].values()  # gold answers injected, so the update is not a no-op
  assert any(r['injected'] > 0 for r in grpo) and all(r['grad_norm'] > 0 for r in grpo)


RLMEC_CONFIG = 'configs/rlmec/arith.py:runlocal'
RLMEC_OVERRIDES = {
  'seeds': (0,),
  **{
    f'models.grm.{k}': v
    for k, v in dict(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, d_ff=64).items()
  },
  'stages': 'sft,grm_rewrite,rlmec_prog,rlmec',
  'stage.rewards.data': 'teacher',  # an untrained GRM's rewrites reach no gold answer
  'train.progress': False,
  'train.async_checkpoint': False,
  'models.policy.d_model': 32,
  'models.policy.num_layers': 1,
  'models.policy.num_heads': 2,
  'models.policy.num_kv_heads': 1,
  'models.policy.d_ff': 64,
  'data.limit': 16,
  'data.max_new_tokens': 24,
  'stage.samples.limit': 4,
  'stage.samples.num_samples': 2,
  'stage.samples.batch_size': 4,
  'stage.grm_samples.limit': 4,
  'stage.grm_samples.offset': 4,
  'stage.grm_samples.num_samples': 2,
  'stage.grm_samples.batch_size': 4,
  'stage.grm_rewrite.batch_size': 8,
  'stage.rewards.batch_size': 8,
  'evals.arith.groups': (1, 3),
  'evals.arith.per_group': 2,
  'evals.arith.seeds': (0,),
  'evals.arith.batch_size': 4,
  **{
    f'stage.{name}.train.{key}': value
    for name in ('sft', 'grm', 'rlmec', 'rlmec_prog')
    for key, value in dict(
      steps=2, batch_size=2, log_every=1, checkpoint_every=2, eval_every=2
    ).items()
  },
}


def test_rlmec_grm_pipeline_on_two_processes_matches_one_process(tmp_path):
  """RLMEC with its generative reward model (program teacher, GRM data and training, GRM
  rewriting, GRM token rewards, RLMEC training) as 2 processes x 1 device vs 1 process x 2."""
  one, two = tmp_path / 'one_process', tmp_path / 'two_processes'
  common = dict(config=RLMEC_CONFIG, overrides=RLMEC_OVERRIDES)
  assert _launch(one, processes=1, devices=2, **common) == 0
  assert _launch(two, processes=2, devices=1, **common) == 0
  one, two = one / 'seed_0', two / 'seed_0'
  judged = (
    'samples',
    'teacher',
    'grm_samples',
    'grm_teacher',
    'grm_data',
    'grm_rewrite',
    'rewards',
  )
  for stage in judged:
    _assert_same_records(one / stage, two / stage)
  for stage in ('sft', 'grm', 'rlmec_prog', 'rlmec'):
    _assert_same_losses(one / stage, two / stage, steps=2)


CAPO_CONFIG = 'configs/capo/parrot.py:runlocal,seeds=0,kinds=all'
CAPO_TRAIN = dict(steps=2, batch_size=2, log_every=1, checkpoint_every=2, eval_every=2)
CAPO_OVERRIDES = {
  'train.progress': False,
  'train.async_checkpoint': False,
  **{
    f'models.policy.{k}': v for k, v in dict(d_model=32, num_layers=1, num_heads=2, d_ff=64).items()
  },
  'models.policy.num_kv_heads': 1,
  **{f'data.{k}': v for k, v in dict(limit=16, seq_len=256, prompt_len=240).items()},
  'data.max_new_tokens': 16,
  **{
    f'stage.{name}.train.{k}': v
    for name in ('ask', 'sft_short', 'sft_long', 'capo_all')
    for k, v in CAPO_TRAIN.items()
  },
  **{f'stage.{n}.optimizer.warmup_steps': 1 for n in ('ask', 'sft_short', 'sft_long', 'capo_all')},
  'stage.pairs_all.data': 'task:train',  # a 2-step ask model writes no usable query yet
  'stage.pairs_all.limit': 4,
  **{f'stage.sessions.{k}': v for k, v in dict(num_sessions=4, num_turns=3, batch_size=4).items()},
  'stage.sessions.max_new_tokens': 16,
  **{f'evals.kj_dialog8.{k}': v for k, v in dict(sessions=2, num_turns=2, batch_size=2).items()},
  **{f'evals.kj_dialog_pairs.{k}': v for k, v in dict(sessions=2, batch_size=4).items()},
}


@pytest.mark.slow
def test_capo_pipeline_on_two_processes_matches_one_process(tmp_path):
  """Parrot-Ask sessions (multi-turn generation), SFT, CaPO pairs and CaPO, with the multi-turn
  evaluator, as 2 processes x 1 device vs 1 process x 2 devices."""
  one, two = tmp_path / 'one_process', tmp_path / 'two_processes'
  common = dict(config=CAPO_CONFIG, overrides=CAPO_OVERRIDES)
  assert _launch(one, processes=1, devices=2, **common) == 0
  assert _launch(two, processes=2, devices=1, **common) == 0
  one, two = one / 'seed_0', two / 'seed_0'
  for stage in ('sessions', 'pairs_all'):
    _assert_same_records(one / stage, two / stage)
  for stage in ('ask', 'sft_short', 'sft_long', 'capo_all'):
    _assert_same_losses(one / stage, two / stage, steps=2)
    evals = [json.loads((w / stage / 'stage.json').read_text()).get('eval') for w in (one, two)]
    assert evals[0] == pytest.approx(evals[1], abs=1e-6)
