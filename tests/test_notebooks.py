"""The notebooks run top to bottom on CPU (shell lines such as `!pip ...` are skipped)."""
import json
from pathlib import Path

import matplotlib

NOTEBOOKS = Path(__file__).parents[1] / 'notebooks'


def _run(path: Path) -> dict:
  namespace = {}
  for cell in json.loads(path.read_text())['cells']:
    if cell['cell_type'] == 'code':
      lines = [line for line in cell['source'] if not line.lstrip().startswith(('!', '%'))]
      exec(compile(''.join(lines), path.name, 'exec'), namespace)
  return namespace


def test_quickstart_runs_and_sharded_layer_matches():
  matplotlib.use('Agg')
  namespace = _run(NOTEBOOKS / 'quickstart.ipynb')
  assert namespace['y'].shape == (8, 128, 64)
  assert namespace['dropped'][1][0] > namespace['dropped'][1][-1]  # more capacity, fewer drops
  assert float(abs(namespace['y_sharded'] - namespace['y_single']).max()) < 1e-5
