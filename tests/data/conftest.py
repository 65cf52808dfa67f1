"""Builds the embedded data sets once per test session into a temporary data_dir."""

import pytest

from kuaijax.data import sources


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> str:
  path = tmp_path_factory.mktemp('tfds')
  for name in sources.EMBEDDED:
    sources.prepare_embedded(name, path)
  return str(path)
