"""The notebooks run top to bottom in a real Jupyter kernel (nbclient), at tiny settings: the
cell tagged 'parameters' is followed by one that overrides its values, as papermill does."""
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / 'notebooks'


def execute(name: str, **parameters) -> nbformat.NotebookNode:
  """Run notebooks/<name> in a python3 kernel started in notebooks/ (as Jupyter does), with
  `parameters` overriding the parameters cell; raises nbclient's CellExecutionError naming the
  failing cell."""
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  (index,) = [i for i, cell in enumerate(notebook.cells)
              if 'parameters' in cell.metadata.get('tags', [])]
  overrides = '\n'.join(f'{key} = {value!r}' for key, value in parameters.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(overrides))
  NotebookClient(notebook, kernel_name='python3', timeout=600,
                 resources={'metadata': {'path': str(NOTEBOOKS)}}).execute()
  return notebook


def outputs(notebook: nbformat.NotebookNode) -> tuple[str, int]:
  """(all printed text, the number of images shown)."""
  text, images = [], 0
  for cell in notebook.cells:
    for output in cell.get('outputs', []):
      text.append(output.get('text', ''))
      images += 'image/png' in output.get('data', {})
  return ''.join(text), images


@pytest.mark.slow
def test_quickstart_runs_in_a_kernel(tmp_path):
  notebook = execute('quickstart.ipynb', TRAIN_STEPS=8, EVAL_BATCHES=1,
                     WORKDIR=str(tmp_path / 'quickstart'))
  text, images = outputs(notebook)
  assert 'moejax' in text and 'max difference' in text
  difference = float(text.split('max difference')[1].split()[0])
  assert difference < 1e-5  # the sharded layer matches the single-device one
  assert 'validation loss' in text and 'step 8' in text
  assert images == 2  # capacity vs dropped; loss and usage over training
  assert (tmp_path / 'quickstart' / 'metrics.jsonl').exists()


@pytest.mark.slow
def test_routing_analysis_trains_when_no_checkpoint_and_shows_every_figure(tmp_path):
  out = tmp_path / 'analysis'
  notebook = execute('routing_analysis.ipynb', WORKDIR=str(tmp_path / 'none'),
                     FALLBACK_WORKDIR=str(tmp_path / 'small'), FALLBACK_STEPS=6,
                     MAX_TOKENS=300, OUT=str(out))
  text, images = outputs(notebook)
  assert f'analysing {tmp_path / "small"}' in text
  assert '300 tokens, step 6' in text and 'strongest specialization' in text
  assert images == 4  # coloured text, agreement, class usage, usage over training
  for name in ('routing.json', 'colored_text.html', 'colored_text.png', 'class_usage.png',
               'agreement.png', 'usage_over_training.png'):
    assert (out / name).stat().st_size > 0, name
