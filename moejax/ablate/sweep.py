"""A sweep file and the run configs it expands to, at the CPU scale or the Switch-Base scale.

A sweep is a Python file (experiments/ablations/<name>.py) with module-level values:

  BASE   an experiment config file (a path, relative to the working directory or the repo root)
         or a `get_config` function
  RUNS   {run name: {'section.field': value}}: the named overrides (Python values), one run each
  SEEDS  the seeds every run is trained with (config.seed: params, noise streams, data order),
         or {run name: seeds} when they differ
  PLOTS  Panels: what <name>.png draws (and which relative columns <name>.md adds)
and optionally
  SCALE  {'small' | 'base': overrides}: this sweep's own settings at one scale
  EVALS  {variant name: overrides}: evaluate every finished run again under each (eval-only
         fields, e.g. 'model.eval_capacity_factor'); the rows are then one per variant
  TRAIN  train(config, workdir, quiet) -> summary, in place of `moejax.train.loop.train`
  TABLE  the numbers in <name>.md's table (default: `moejax.ablate.report.TABLE`)
  CLAIMS the papers' claims as tests on the committed numbers (`moejax.ablate.verdict.Claim`),
         each declared before its runs: the direction, an equivalence margin ('costs
         nothing'), a target loss (time to quality) and `needs`, the smallest scale at which
         it can show; <name>.md ends with each one's numbers and verdict

A run's config: BASE, then SCALES[scale], then SCALE[scale], then its RUNS overrides, then its
seed, then the command line's --config.* overrides.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from moejax.errors import InputError
from moejax.train.config import (apply_overrides, check_config, config_from_file,
                                 load_python_file)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SWEEPS_DIR = os.path.join('experiments', 'ablations')

# The CPU scale: `make run`'s model (experiments/configs/switch_tiny.py: 4 blocks, 8 top-1 experts
# in every other one, AdamW 3e-3 with a cosine decay) at half its width (D 64, 2 heads, F 256), in
# float32 with index dispatch (the fastest here at that width; like einsum dispatch, and unlike
# sorted, its expert FLOPs follow the capacity, as the papers' do), 200 steps of 16 x 128 bytes
# of tiny shakespeare (0.4M tokens), evaluated at the end on the whole validation split. About
# 25 s a run on the 2-core CPU (0.08 s a step; the rest is set-up, compilation and evaluation;
# `moejax ablate` caches compiled steps across runs). The ten sweeps of experiments/ablations
# hold 392 runs at 8 seeds (and 1 pretraining and 20 fine-tunings), 336 distinct: a run with the
# config of a finished run of another sweep is copied (`runner`). Each sweep's docstring has its
# own time; experiments/RESULTS.md says how much of the suite is done.
SMALL_SCALE = {'model.model_dim': 64, 'model.num_heads': 2, 'model.ffn_dim': 256,
               'model.dtype': 'float32', 'model.dispatch': 'indices',
               'train.batch_size': 16, 'train.num_steps': 200, 'train.warmup_steps': 20,
               'eval.every_steps': 200, 'checkpoint.every_steps': 100, 'checkpoint.keep': 1}

# Switch-Base (Switch Transformer section 2.3, Table 9): T5-Base shapes (T5 v1.0: ReLU FFNs, not
# gated), experts in every other FFN of both stacks, C4 span corruption, 2^20 tokens a batch
# (2048 x 512), 100k steps, Adafactor at 1e-2 with an inverse square root decay. A vocabulary of
# 32,000 pieces (+ 100 sentinels; T5 pads its 32,100 to 32,128): give a local copy of T5's
# (gs://t5-data/vocabs/cc_all.32000/sentencepiece.model) as --config.data.spm_model, or one is
# trained on the training split. For TPU pods (--config.mesh.*): not run here.
BASE_SCALE = {
    'task': 'span_corruption',
    'model.kind': 'encoder_decoder', 'model.num_layers': 12, 'model.model_dim': 768,
    'model.num_heads': 12, 'model.head_dim': 64, 'model.ffn_dim': 3072,
    'model.activation': 'relu', 'model.glu': False, 'model.moe_every': 2,
    'model.num_experts': 128, 'model.dtype': 'bfloat16', 'model.dispatch': 'auto',
    'data.source': 'c4/en', 'data.data_dir': 'gs://tfds-data/datasets',
    'data.tokenizer': 'sentencepiece', 'data.spm_vocab_size': 32_000, 'data.length': 512,
    'train.batch_size': 2048, 'train.num_steps': 100_000, 'train.optimizer': 'adafactor',
    'train.schedule': 'rsqrt', 'train.learning_rate': 1e-2, 'train.warmup_steps': 10_000,
    'train.weight_decay': 0.0,
    'eval.batch_size': 256, 'eval.every_steps': 10_000, 'eval.max_batches': 100,
    'checkpoint.every_steps': 5_000, 'checkpoint.keep': 2,
}
SCALES = {'small': SMALL_SCALE, 'base': BASE_SCALE}


class SweepError(ValueError):
  """A sweep that cannot run as asked: a bad sweep file, or a finished run trained with another
  config."""


@dataclasses.dataclass(frozen=True)
class Panel:
  """One plot of <name>.png: metric `y` against `x` (a config field of the runs, or 'run'), one
  line per value of `series` (a field), mean +- std over seeds.

  relative_to: {field: value}: plot y relative to the row with that value that shares the seed
    and every other field ('ratio' or 'difference', `relative`); the md table gets the column too.
  paper: {label: [(x, y), ...]}: the papers' numbers, drawn dashed, where they are comparable.
  curve: plot each run's validation curve (`y` of its evaluations against x = 'step' or
    'seconds', training time as steps x median step time) instead of one point per run.
  note: text under the plot (the papers' claim when no number of theirs is comparable).
  ylabel: the y axis label, for a `y` that `moejax.ablate.report.LABELS` does not name.
  """
  y: str
  x: str = 'run'
  series: str | None = None
  relative_to: Mapping[str, Any] | None = None
  relative: str = 'difference'
  paper: Mapping[str, list] | None = None
  curve: bool = False
  log_x: bool = False
  note: str = ''
  title: str = ''
  ylabel: str = ''

  @property
  def column(self) -> str:
    """The md/plot column: `y`, or the relative one ('step_time / (train_capacity_factor=1.0)')."""
    if not self.relative_to:
      return self.y
    ref = ', '.join(f'{field.rsplit(".", 1)[-1]}={value}'
                    for field, value in self.relative_to.items())
    return f'{self.y} {"/" if self.relative == "ratio" else "-"} ({ref})'


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A loaded sweep file (the module docstring); `name` is the file's, `doc` its docstring."""
  name: str
  path: str
  doc: str
  base: str | Callable[[], ml_collections.ConfigDict]
  runs: Mapping[str, Mapping[str, Any]]
  seeds: Mapping[str, tuple[int, ...]]  # of each run
  plots: tuple[Panel, ...] = ()
  scale: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  evals: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  train: Callable | None = None
  table: tuple[str, ...] = ()
  claims: tuple = ()  # of moejax.ablate.verdict.Claim

  @property
  def fields(self) -> list[str]:
    """Every overridden field, in order of first appearance (RUNS, then EVALS)."""
    fields = {}
    for overrides in (*self.runs.values(), *self.evals.values()):
      fields.update(dict.fromkeys(overrides))
    return list(fields)


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run of a sweep: a name, a seed, its overrides and its config."""
  name: str
  seed: int
  overrides: Mapping[str, Any]
  config: ml_collections.ConfigDict

  @property
  def key(self) -> str:
    return f'{self.name}/seed{self.seed}'


def sweep_path(sweep: str) -> str:
  """The file of a sweep given by name ('capacity') or path."""
  if os.path.isfile(sweep) or os.path.isdir(sweep):
    return sweep  # load_python_file refuses a directory
  for root in ('.', REPO):
    path = os.path.join(root, SWEEPS_DIR, f'{sweep}.py')
    if os.path.isfile(path):
      return path
  raise InputError(f'no sweep {sweep!r}: neither a file nor {SWEEPS_DIR}/{sweep}.py '
                          f'(sweeps there: {", ".join(sweep_names()) or "none"})')


def sweep_names() -> list[str]:
  """The sweeps in the repository's experiments/ablations/."""
  folder = os.path.join(REPO, SWEEPS_DIR)
  return sorted(f[:-3] for f in os.listdir(folder)
                if f.endswith('.py') and not f.startswith('_')) if os.path.isdir(folder) else []


def load_sweep(sweep: str) -> Sweep:
  """The sweep in a file given by name or path, its fields checked."""
  path = sweep_path(sweep)
  module = load_python_file(path, f'moejax_sweep_{os.path.basename(path)[:-3]}', 'a sweep file')
  missing = [name for name in ('BASE', 'RUNS', 'SEEDS') if not hasattr(module, name)]
  if missing:
    raise SweepError(f'{path}: a sweep file needs BASE, RUNS and SEEDS; it lacks '
                     f'{", ".join(missing)}')
  bad = [name for name in module.RUNS if not name or '/' in name or name.startswith('.')]
  if bad:
    raise SweepError(f'{path}: run name {bad[0]!r} is invalid: it names a directory')
  seeds = module.SEEDS if isinstance(module.SEEDS, Mapping) else dict.fromkeys(module.RUNS,
                                                                               module.SEEDS)
  if set(seeds) != set(module.RUNS):
    raise SweepError(f'{path}: SEEDS names runs {sorted(seeds)}, RUNS {sorted(module.RUNS)}')
  return Sweep(name=os.path.basename(path)[:-3], path=path, doc=module.__doc__ or '',
               base=module.BASE, runs=dict(module.RUNS),
               seeds={name: tuple(s) for name, s in seeds.items()},
               plots=tuple(getattr(module, 'PLOTS', ())), scale=getattr(module, 'SCALE', {}),
               evals=dict(getattr(module, 'EVALS', {})), train=getattr(module, 'TRAIN', None),
               table=tuple(getattr(module, 'TABLE', ())),
               claims=tuple(getattr(module, 'CLAIMS', ())))


def base_config(sweep: Sweep) -> ml_collections.ConfigDict:
  if callable(sweep.base):
    return sweep.base()
  path = sweep.base if os.path.isfile(sweep.base) else os.path.join(REPO, sweep.base)
  return config_from_file(path)


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """`config` with {'section.field': Python value} set, checked as command-line overrides are."""
  return apply_overrides(config, [(path, repr(value)) for path, value in overrides.items()])


def run_specs(sweep: Sweep, scale: str = 'small',
              overrides: list[tuple[str, str]] = ()) -> list[RunSpec]:
  """Every (run, seed) of the sweep with its config, each checked by `check_config`.
  overrides: (field, value text) pairs from the command line, applied to every run last."""
  if scale not in SCALES:
    raise SweepError(f'scale={scale!r} is invalid: it must be one of {tuple(SCALES)}')
  specs, base = [], base_config(sweep)
  for name, run_overrides in sweep.runs.items():
    for seed in sweep.seeds[name]:
      config = copy.deepcopy(base)  # overrides set fields in place
      for step in (SCALES[scale], sweep.scale.get(scale, {}), run_overrides, {'seed': seed}):
        config = with_overrides(config, step)
      config = apply_overrides(config, list(overrides))
      check_config(config)
      specs.append(RunSpec(name, seed, dict(run_overrides), config))
  return specs
