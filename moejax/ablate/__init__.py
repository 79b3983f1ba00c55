"""Ablation sweeps: the Switch Transformer and ST-MoE ablations as short Python files.

  moejax ablate capacity                      # train every run of experiments/ablations/capacity.py
  moejax ablate capacity --report             # csv/md/png from the finished runs, no training
  moejax ablate capacity --scale base         # its Switch-Base-shaped variant (for TPUs)

  sweep = load_sweep('capacity')              # the file's BASE, RUNS, SEEDS, PLOTS, ...
  specs = run_specs(sweep, 'small')           # every (run, seed) with its checked config
  run_sweep(sweep, specs, 'runs/ablations/capacity')
  write_reports(sweep, specs, [load_result(run_dir(...)) ...], 'experiments/results', 'small')

`sweep` reads sweep files and builds run configs (no training), `records` turns a run's
metrics.jsonl into its numbers (NumPy), `runner` trains (`moejax.train.loop`), `committed` reads
and writes what a sweep commits (csv rows, validation curves, round-robin step times), `report`
rebuilds a sweep's md and png from those, `verdict` judges the papers' claims on them (paired
t-test or TOST, `stats`), `page` corrects over every claim (Holm) and writes the page of
verdicts, `command` is `moejax ablate`.
"""
from moejax.ablate.command import main
from moejax.ablate.records import eval_curve, read_rows, run_record
from moejax.ablate.report import write_reports
from moejax.ablate.runner import load_result, run_dir, run_sweep
from moejax.ablate.sweep import (SCALES, Panel, RunSpec, Sweep, SweepError, load_sweep,
                                 run_specs, sweep_names)
from moejax.ablate.verdict import Claim, Scale, judge

__all__ = ['Claim', 'Panel', 'RunSpec', 'SCALES', 'Scale', 'Sweep', 'SweepError', 'eval_curve',
           'judge', 'load_result', 'load_sweep', 'main', 'read_rows', 'run_dir', 'run_record',
           'run_specs', 'run_sweep', 'sweep_names', 'write_reports']
