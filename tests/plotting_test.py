"""kuaijax.plotting: loss curves from metrics.jsonl and bar charts, as PNG files."""

import struct

from kuaijax import plotting
from kuaijax.train.metrics import MetricsWriter
from tests.colab_test import PNG_MAGIC


def _png_width(path) -> int:
  with open(path, 'rb') as f:
    data = f.read()
  assert data.startswith(PNG_MAGIC)
  return struct.unpack('>I', data[16:20])[0]  # IHDR width


def _log(run_dir, records):
  run_dir.mkdir(exist_ok=True)
  writer = MetricsWriter(str(run_dir), enabled=True, tensorboard=False)
  for step, metrics in records:
    writer.write(step, metrics)


def test_one_panel_without_evaluations_two_with_them(tmp_path):
  train = [(s, {'loss': 3.0 / s, 'lr': 1e-3}) for s in (1, 2, 3)]
  _log(tmp_path / 'a', train)
  _log(tmp_path / 'b', train + [(3, {'eval/loss': 1.5, 'eval/loss/code': 1.2})])
  (one,) = plotting.write_loss_curves(str(tmp_path), ['a'], filename='a.png')
  (two,) = plotting.write_loss_curves(str(tmp_path), ['a', 'b', 'missing'], filename='ab.png')
  assert one == str(tmp_path / 'a.png') and two == str(tmp_path / 'ab.png')
  assert _png_width(one) < 700 < 1000 < _png_width(two)  # 6 inches at 100 dpi per panel


def test_nothing_to_draw_writes_nothing(tmp_path):
  assert plotting.write_loss_curves(str(tmp_path)) == []
  _log(tmp_path, [(1, {'lr': 1e-3})])
  assert plotting.write_loss_curves(str(tmp_path)) == []
  assert not (tmp_path / plotting.LOSS_CURVES).exists()


def test_bar_chart(tmp_path):
  groups = {'top_k': {'auto': 1.2, 'dense': 3.0}, 'top_p': {'auto': 1.4, 'capacity': 1.1}}
  (path,) = plotting.write_bar_chart(str(tmp_path), 'bars.png', groups, title='t', xlabel='x')
  assert _png_width(path) > 300
  assert plotting.write_bar_chart(str(tmp_path), 'none.png', {}, title='t', xlabel='x') == []
