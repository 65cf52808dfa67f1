"""The kernel benchmarks run end to end at tiny sizes through the one harness: every program timed
over the requested rounds, ratios given as median (min-max) of per-round ratios, the report headed
by the command and thread counts (timings themselves are not tested). CPU only: on a GPU,
pallas_kernels/gpu_check.sh runs the benchmarks itself."""

import json

import jax
import pytest

from pallas_kernels.gmm import bench as gmm_bench
from pallas_kernels.token_logprobs import bench as token_logprobs_bench
from pallas_kernels.topp_router import bench as topp_router_bench

pytestmark = pytest.mark.skipif(jax.default_backend() != 'cpu', reason='gpu_check.sh runs them')

ROUNDS = ['--rounds', '5', '--warmup', '1']


def _report(out, name):
  text = (out / f'{name}.md').read_text()
  assert 'median (min-max) of 5 interleaved rounds after 1 warm-up' in text
  assert 'Command: `' in text and 'xla_cpu_threads' in text
  return json.loads((out / f'{name}.json').read_text()), text


def _check_ratio(summary, text):
  assert summary['min'] <= summary['median'] <= summary['max']
  assert text == f'{summary["median"]:.2f}x ({summary["min"]:.2f}-{summary["max"]:.2f})'


def test_gmm(tmp_path):
  gmm_bench.main(['--out', str(tmp_path), '--shapes', 'tiny', *ROUNDS])
  payload, text = _report(tmp_path, 'gmm_bench')
  assert [r['impl'] for r in payload['rows']] == ['dense', 'ragged_dot', 'gmm[xla]']
  for row in payload['rows']:
    assert len(row['timings']['fwd']['rounds']) == len(row['timings']['fwd_bwd']['rounds']) == 5
    _check_ratio(row['ratios_to_dense']['fwd_bwd'], row['fwd_bwd_vs_dense'])
    assert row['fwd_bwd_vs_dense'] in text


def test_topp_router(tmp_path):
  argv = ['--out', str(tmp_path), '--tokens', '64', '--d', '16', '--experts', '8', *ROUNDS]
  topp_router_bench.main(argv)
  payload, _ = _report(tmp_path, 'topp_router')
  assert [r['implementation'] for r in payload['rows']] == ['reference', 'xla']
  for row in payload['rows']:
    assert len(row['timings']['fwd']['rounds']) == 5
    _check_ratio(row['ratios_to_reference']['fwd'], row['fwd_vs_reference'])


def test_token_logprobs(tmp_path):
  argv = ['--out', str(tmp_path), '--tokens', '32', '--d', '8', '--vocab', '256', *ROUNDS]
  token_logprobs_bench.main(argv)
  payload, _ = _report(tmp_path, 'token_logprobs')
  naive, xla = payload['rows']
  assert len(naive['timing']['rounds']) == len(xla['timing']['rounds']) == 5
  _check_ratio(xla['time_ratio_summary'], xla['time_ratio'])
