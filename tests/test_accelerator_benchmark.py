"""benchmarks/accelerator.py --small: every dispatch path's layer and train step, timed on CPU
(the script a GPU or TPU runs at full size)."""
import json
import subprocess
import sys

import pytest

from helpers import CLI_ENV, REPO


@pytest.mark.slow
def test_accelerator_benchmark_small_runs_every_path(tmp_path):
  out = tmp_path / 'accelerator.json'
  subprocess.run([sys.executable, 'benchmarks/accelerator.py', '--small', '--repeats', '3',
                  '--out', str(out)], cwd=REPO, env=CLI_ENV, check=True, capture_output=True,
                 timeout=120)
  result = json.loads(out.read_text())
  assert result['backend'] == 'cpu'
  dispatches = ['einsum', 'indices', 'sorted', 'grouped']
  layers, steps = result['rows'][:2], result['rows'][2:]
  assert [row['size']['capacity_factor'] for row in layers] == [1.25, None]  # and dropless
  assert len(steps) == 1 and steps[0]['what'].startswith('train step')
  for row in result['rows']:
    assert list(row['median_ms']) == dispatches
    assert all(ms > 0 for ms in row['median_ms'].values())
    assert row['fastest'] in dispatches
  table = out.with_suffix('.md').read_text()
  assert '| what | einsum | indices | sorted | grouped | fastest |' in table
