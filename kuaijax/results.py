"""An experiment's results as files: results.json (the numbers) and results.md (its table)."""

from __future__ import annotations

import json
import os

import jax


def write_results(workdir: str, results: dict, table_markdown: str) -> None:
  """results.json and results.md in the workdir (process 0)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2, sort_keys=True)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table_markdown)
