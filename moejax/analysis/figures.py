"""Figures of routing (matplotlib, written to files): text coloured by expert (PNG and HTML),
usage by token class, consecutive-token agreement, expert usage by text and over training."""
from __future__ import annotations

import html

import numpy as np

from moejax.train.metrics import read_metrics

TEXT_COLUMNS = 80  # characters per line of the coloured text


def _pyplot():
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def expert_colors(num_experts: int) -> np.ndarray:
  """[E, 4] RGBA: distinct light colours (text stays readable on them)."""
  plt = _pyplot()
  cmap = plt.get_cmap('tab20' if num_experts > 10 else 'tab10')
  rgba = np.array([cmap(e % cmap.N) for e in range(num_experts)])
  rgba[:, :3] = 0.45 * rgba[:, :3] + 0.55  # towards white
  return rgba


def text_cells(pieces: list[str], columns: int = TEXT_COLUMNS) -> list[tuple[int, int, str]]:
  """(row, column, shown text) of each token piece laid out in lines of `columns` characters; a
  newline shows as '⏎' and ends its line."""
  cells, row, col = [], 0, 0
  for piece in pieces:
    shown = piece.replace('\n', '⏎').replace('\t', ' ') or '∅'
    if col + len(shown) > columns and col:
      row, col = row + 1, 0
    cells.append((row, col, shown))
    col += len(shown)
    if '\n' in piece:
      row, col = row + 1, 0
  return cells


def colored_text_png(path: str, pieces: list[str], first_choice: dict[str, np.ndarray],
                     num_experts: int, columns: int = TEXT_COLUMNS):
  """The text with each token on its first-choice expert's colour, one panel per MoE layer."""
  plt = _pyplot()
  from matplotlib.patches import Patch, Rectangle
  cells = text_cells(pieces, columns)
  rows = cells[-1][0] + 1 if cells else 1
  colors = expert_colors(num_experts)
  fig, axes = plt.subplots(len(first_choice), 1, squeeze=False,
                           figsize=(columns * 0.11, 0.6 + len(first_choice) * (rows * 0.2 + 0.5)))
  for ax, (layer, experts) in zip(axes[:, 0], first_choice.items()):
    for (row, col, shown), expert in zip(cells, experts):
      ax.add_patch(Rectangle((col, -row - 1), len(shown), 1, color=colors[expert], lw=0))
      for i, char in enumerate(shown):
        ax.text(col + i + 0.5, -row - 0.5, char, ha='center', va='center', family='monospace',
                fontsize=8)
    ax.set_xlim(0, columns)
    ax.set_ylim(-rows, 0)
    ax.set_axis_off()
    ax.set_title(f'{layer}: each token coloured by its first-choice expert', fontsize=9,
                 loc='left')
  handles = [Patch(color=colors[e], label=f'expert {e}') for e in range(num_experts)]
  fig.legend(handles=handles, loc='lower center', ncol=min(num_experts, 8), fontsize=8,
             frameon=False)
  fig.tight_layout(rect=(0, 0.06, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def colored_text_html(path: str, pieces: list[str], first_choice: dict[str, np.ndarray],
                      weights: dict[str, np.ndarray], num_experts: int):
  """The same as `colored_text_png` as HTML; hovering a token shows its expert and weight."""
  colors = (expert_colors(num_experts)[:, :3] * 255).astype(int)
  css = ''.join(f'.e{e}{{background:rgb({r},{g},{b})}}' for e, (r, g, b) in enumerate(colors))
  parts = [f'<!doctype html><meta charset="utf-8"><title>moejax routing</title>'
           f'<style>body{{font-family:sans-serif}}pre{{white-space:pre-wrap;line-height:1.5}}'
           f'{css}</style>']
  parts.append('<p>' + ' '.join(f'<span class="e{e}">&nbsp;expert {e}&nbsp;</span>'
                                for e in range(num_experts)) + '</p>')
  for layer, experts in first_choice.items():
    spans = ''.join(f'<span class="e{e}" title="expert {e}, weight {w:.2f}">'
                    f'{html.escape(piece)}</span>'
                    for piece, e, w in zip(pieces, experts, weights[layer]))
    parts.append(f'<h3>{html.escape(layer)}</h3><pre>{spans}</pre>')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(parts))


def class_usage_png(path: str, class_usage: dict[str, dict]):
  """Heatmap per layer of P(first-choice expert | token class), each cell annotated with its
  share above chance (P(expert | class) - P(expert), percentage points)."""
  plt = _pyplot()
  layers = list(class_usage)
  fig, axes = plt.subplots(1, len(layers), squeeze=False,
                           figsize=(4.8 * len(layers), 0.5 + 0.45 * len(
                               class_usage[layers[0]]['classes']) + 1.2))
  for ax, layer in zip(axes[0], layers):
    u = class_usage[layer]
    share, above = np.array(u['usage']), np.array(u['above_chance'])
    image = ax.imshow(share, cmap='viridis', vmin=0, vmax=max(share.max(), 1e-9), aspect='auto')
    for (c, e), value in np.ndenumerate(above):
      ax.text(e, c, f'{100 * value:+.0f}', ha='center', va='center', fontsize=7,
              color='white' if share[c, e] < 0.6 * share.max() else 'black')
    ax.set_xticks(range(share.shape[1]))
    ax.set_yticks(range(len(u['classes'])),
                  [f'{n} ({int(t)})' for n, t in zip(u['classes'], u['tokens'])])
    ax.set_xlabel('first-choice expert')
    ax.set_title(layer, fontsize=9)
    fig.colorbar(image, ax=ax, label='P(expert | class)')
  fig.suptitle('Expert usage by token class (numbers: percentage points above the expert\'s '
               'overall share)', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def agreement_png(path: str, agreement: dict[str, dict], reference: dict | None = None):
  """Bars per layer: consecutive tokens with the same first choice, and first choice among the
  previous token's choices, each beside its chance rate; `reference` {label: (low, high)} draws
  published ranges as horizontal bands."""
  plt = _pyplot()
  layers = list(agreement)
  x = np.arange(len(layers))
  fig, ax = plt.subplots(figsize=(3.6 + 1.6 * len(layers), 3.6))
  bars = [('same_first', 'same first choice'), ('same_first_chance', 'chance (same first)'),
          ('first_in_top_k', 'first among previous choices'),
          ('first_in_top_k_chance', 'chance (among choices)')]
  width = 0.8 / len(bars)
  for i, (key, label) in enumerate(bars):
    values = [100 * agreement[layer][key] for layer in layers]
    ax.bar(x + (i - 1.5) * width, values, width, label=label,
           hatch='//' if 'chance' in key else None, alpha=0.6 if 'chance' in key else 1.0)
  for label, (low, high) in (reference or {}).items():
    ax.axhspan(100 * low, 100 * high, color='grey', alpha=0.15)
    ax.text(x[-1] + 0.45, 100 * high, label, ha='right', va='bottom', fontsize=7)
  ax.set_xticks(x, [layer.replace('/', '/\n', 1) for layer in layers], fontsize=8)
  ax.set_ylabel('% of consecutive token pairs')
  ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def usage_by_text_png(path: str, usage: dict[str, dict[str, list[float]]], most_layers: int = 4):
  """Mixtral Fig. 7: per layer (the first, the last and evenly spaced ones between, at most
  `most_layers`), each expert's share of first choices in each text, one colour per text, beside
  the uniform share 1 / E. `usage`: {text: {layer: [E] shares}}."""
  plt = _pyplot()
  texts = list(usage)
  layers = list(usage[texts[0]])
  picked = sorted({layers[round(i)] for i in np.linspace(0, len(layers) - 1,
                                                         min(most_layers, len(layers)))},
                  key=layers.index)
  num_experts = len(usage[texts[0]][layers[0]])
  fig, axes = plt.subplots(len(picked), 1, figsize=(max(6, 0.35 * num_experts * len(texts)),
                                                   1.9 * len(picked) + 0.6), squeeze=False)
  width = 0.8 / len(texts)
  x = np.arange(num_experts)
  for ax, layer in zip(axes[:, 0], picked):
    for i, text in enumerate(texts):
      ax.bar(x + (i - (len(texts) - 1) / 2) * width, 100 * np.asarray(usage[text][layer]), width,
             label=text)
    ax.axhline(100 / num_experts, color='grey', lw=0.8, ls='--')
    ax.set_title(layer, fontsize=8, loc='left')
    ax.set_ylabel('% first choices', fontsize=7)
    ax.set_xticks(x, [str(e) for e in x], fontsize=6)
  axes[-1, 0].set_xlabel('expert (dashed: uniform 1/E)')
  axes[0, 0].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1, 1))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def usage_over_training(metrics_path: str, split: str = 'train') -> dict[str, tuple]:
  """{layer: (steps [N], usage [N, E])} from a run's metrics.jsonl."""
  series: dict[str, tuple[list, list]] = {}
  for row in read_metrics(metrics_path):
    if row.get('split') != split:
      continue
    for name, value in row.items():
      if name.startswith('expert_usage/'):
        steps, values = series.setdefault(name[len('expert_usage/'):], ([], []))
        steps.append(row['step'])
        values.append(value)
  return {layer: (np.array(steps), np.array(values)) for layer, (steps, values) in series.items()}


def usage_over_training_png(path: str, series: dict[str, tuple], smooth: int = 10):
  """Stacked expert usage per layer (the logged share of chosen choices) against the training
  step, as a `smooth`-step running mean."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(series), squeeze=False, figsize=(4.8 * len(series), 3.4),
                           sharey=True)
  for ax, (layer, (steps, values)) in zip(axes[0], series.items()):
    kernel = np.ones(min(smooth, len(steps))) / min(smooth, len(steps))
    smoothed = np.stack([np.convolve(v, kernel, mode='valid') for v in values.T])
    colors = expert_colors(values.shape[1])
    ax.stackplot(steps[len(steps) - smoothed.shape[1]:], smoothed, colors=colors,
                 labels=[f'expert {e}' for e in range(values.shape[1])])
    ax.set_xlabel('training step')
    ax.set_title(layer, fontsize=9)
    ax.set_ylim(0, 1)
  axes[0, 0].set_ylabel('share of chosen choices (stacked)')
  axes[0, -1].legend(fontsize=7, loc='center left', bbox_to_anchor=(1, 0.5))
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
