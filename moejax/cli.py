"""`moejax train | eval | sample`: run an experiment config, evaluate or sample a checkpoint.

  moejax train  --config experiments/configs/switch_tiny.py --workdir runs/x \
                [--config.model.num_experts=16 ...] [--print_config] [--step N] [--restart]
  moejax eval   --workdir runs/x [--step N] [--config.model.eval_capacity_factor=None ...]
  moejax sample --workdir runs/x [--prompt "ROMEO:" --num_tokens 300 --temperature 0.8]
  moejax analyze --workdir runs/x [--text FILE [--text FILE2 ...]] [--out DIR] [--at_init]
  moejax ablate SWEEP [--report] [--scale small|base] [--runs_dir DIR] [--results_dir DIR]
  moejax lower  --config experiments/configs/switch_tiny.py --platform tpu \
                [--config.mesh.expert=8 ...]
  moejax import-hf HUB_DIR --workdir runs/mixtral [--config FILE] [--config.data.source=...]
  moejax export-hf --workdir runs/mixtral --out DIR [--step N] [--max-shard-size 5GB]
                   [--model-type mixtral]

Every config field can be set with --config.<section>.<field>=VALUE (a Python literal, None, or
text). `eval` and `sample` read the run's saved config.json (plus any overrides) unless --config
names a file; so does `train` on a work directory that has one (an imported model's, say). A
bad setting, path or file prints one line naming it (exit 2); a damaged or
missing checkpoint, a locked work directory or a failed metrics write exit 1; --debug (or
MOEJAX_DEBUG=1) shows the traceback. `train --restart` starts afresh where a run exists, keeping
its files in WORKDIR/previous_runs/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from moejax.commandline import (check_directory, debug_requested, reporting_errors,
                                split_overrides)

COMMANDS = {'train': 'train (or resume) a run from an experiment config',
            'eval': "evaluate a run's checkpoint on the validation split, as JSON",
            'sample': "generate text from a run's checkpoint",
            'analyze': "which tokens go to which expert: routing.json and figures of a run's "
                       'checkpoint',
            'import-hf': 'a Hugging Face hub checkpoint (Mixtral, OLMoE, Qwen-MoE, Switch) as a '
                         'run at step 0 that eval, sample, analyze and train use like any other',
            'export-hf': "a run's checkpoint as a Hugging Face hub directory (safetensors "
                         "shards and their index, config.json, the run's tokenizer) that "
                         'transformers loads'}
LOWER_HELP = ("lower a config's train step for a platform and its mesh, on this host, without "
              'running it: its collectives with their bytes per step, its largest arrays')


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='moejax', description='Sparse Mixture-of-Experts Transformers in JAX/Flax.',
      epilog='Set any config field with --config.<section>.<field>=VALUE, e.g. '
             '--config.model.num_experts=16 or --config.model.eval_capacity_factor=None.')
  commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
  commands.add_parser('ablate', add_help=False,
                      help='run an ablation sweep (experiments/ablations/NAME.py) and write its '
                           'csv/md/png; `moejax ablate --help` lists its flags')
  for name, help_text in COMMANDS.items():
    sub = commands.add_parser(name, help=help_text, description=help_text,
                              epilog=parser.epilog)
    if name == 'import-hf':
      sub.add_argument('source', metavar='HUB_DIR',
                       help='a downloaded hub directory: config.json and model.safetensors (or '
                            'its shards)')
    sub.add_argument('--workdir', required=name != 'train',
                     help='run directory (config.json, checkpoints/, metrics.jsonl)')
    sub.add_argument('--config', metavar='FILE',
                     help='experiment file whose get_config() returns the config' + (
                         " (its model section is the checkpoint's)" if name == 'import-hf' else
                         " (default: the run's config.json; a new run needs one)"))
    sub.add_argument('--debug', action='store_true',
                     help='show tracebacks of config errors (also: MOEJAX_DEBUG=1)')
    many = sub.add_argument_group(
        'many processes', 'one of several processes of a job (auto-detected on SLURM, Open MPI '
        'and multi-host TPU slices; else these flags or MOEJAX_COORDINATOR, '
        'MOEJAX_NUM_PROCESSES, MOEJAX_PROCESS_ID)')
    many.add_argument('--coordinator', metavar='HOST:PORT', help="process 0's address")
    many.add_argument('--num_processes', type=int, help='processes in the job')
    many.add_argument('--process_id', type=int, help="this process's index")
    if name == 'train':
      sub.add_argument('--print_config', action='store_true',
                       help='print the resolved config and exit without training')
      sub.add_argument('--restart', action='store_true',
                       help='start afresh in a work directory that holds a run: its files '
                            '(checkpoints, set-aside steps, metrics, config.json) are moved into '
                            'WORKDIR/previous_runs/TIME/ first, never deleted')
    sub.add_argument('--step', type=int,
                     help='checkpoint step (default: the newest complete one)' + (
                         '; training resumes from it and sets later steps aside'
                         if name == 'train' else ''))
    if name == 'analyze':
      sub.add_argument('--text', metavar='FILE', action='append',
                       help='UTF-8 text to route (default: the start of the validation split); '
                            'several: expert usage per text too (usage_by_text.png)')
      sub.add_argument('--out', metavar='DIR', help='output directory (default: WORKDIR/analysis)')
      sub.add_argument('--max_tokens', type=int, default=4096, help='tokens of the text routed')
      sub.add_argument('--at_init', action='store_true',
                       help="route through the run's initial parameters (the untrained baseline)")
    if name == 'export-hf':
      sub.add_argument('--out', metavar='DIR', required=True,
                       help='a new or empty directory for the hub files')
      sub.add_argument('--max-shard-size', metavar='SIZE',
                       help="shards of at most SIZE ('500MB', '5GB': powers of 1000, as the "
                            'hub counts) and model.safetensors.index.json (default: one '
                            'model.safetensors)')
      sub.add_argument('--model-type', metavar='FAMILY',
                       help="a hub model_type moejax exports ('mixtral', 'gpt_oss', ...; "
                            'default: the family the run was imported from)')
    if name == 'sample':
      sub.add_argument('--prompt', help='text to continue (default: config.sample.prompt)')
      sub.add_argument('--num_tokens', type=int, help='tokens to generate')
      sub.add_argument('--temperature', type=float, help='0 is greedy')
      sub.add_argument('--seed', type=int, default=0, help='rng seed')
  lower = commands.add_parser('lower', help=LOWER_HELP, description=LOWER_HELP,
                              epilog=parser.epilog)
  lower.add_argument('--config', metavar='FILE', required=True,
                     help='experiment file whose get_config() returns the config')
  lower.add_argument('--platform', default='tpu',
                     help='the platform to lower for: tpu (default), cuda, rocm or cpu')
  lower.add_argument('--debug', action='store_true',
                     help='show tracebacks of config and lowering errors (also: MOEJAX_DEBUG=1)')
  return parser


def _config(args: argparse.Namespace, overrides: list[tuple[str, str]]):
  """The run's config: the experiment file's (or the saved run's), overrides applied, checked."""
  from moejax.train import config as config_lib
  config = _unchecked_config(args, overrides)
  config_lib.check_config(config)
  return config


def _unchecked_config(args: argparse.Namespace, overrides: list[tuple[str, str]]):
  from moejax.errors import InputError
  from moejax.train import config as config_lib  # imports JAX: after the arguments are checked
  if args.config:
    config = config_lib.config_from_file(args.config)
  elif args.command == 'train' and not (
      args.workdir and os.path.exists(os.path.join(args.workdir, 'config.json'))):
    raise InputError(f'{args.workdir or "no --workdir"}: no run there (no config.json); a new '
                     'run needs --config FILE')
  else:
    config = config_lib.saved_config(args.workdir)
  config = config_lib.apply_overrides(config, overrides)
  if args.command == 'sample':  # its flags are config.sample's fields, checked with the rest
    for field in ('prompt', 'num_tokens', 'temperature'):
      if getattr(args, field) is not None:
        config.sample[field] = getattr(args, field)
  return config


def _run(args: argparse.Namespace, config) -> int:
  import jax

  from moejax.train import loop, resume, sampling  # import JAX and TensorFlow
  from moejax.train.evaluation import evaluate
  from moejax.train.stopping import agreed_stop, stop_requests
  from moejax.train.summary import format_summary
  print_ = print if jax.process_index() == 0 else lambda *_, **__: None  # one report per job
  if args.command == 'train':
    try:
      summary = loop.train(config, args.workdir, step=args.step, restart=args.restart)
    except loop.TrainingDiverged as error:
      print(f'moejax train: {error}', file=sys.stderr)
      return 1
    print_(format_summary(summary))
    if summary['stopped_by']:
      print_(f'stopped by {summary["stopped_by"]}; checkpoint saved at step {summary["step"]}. '
             'Run the same command again to resume.')
      return 0
    run, state, seed = summary['run'], summary['state'], 0
  else:
    run, state = resume.load(config, args.workdir, args.step)
    if args.command == 'eval':
      with stop_requests() as request:
        metrics = evaluate(run, state.params, bias_state=state.balancing_bias_state,
                           stop=request)
      if metrics is None:
        return _stopped('eval', agreed_stop(request).signal)
      print_(json.dumps({k: float(v) if getattr(v, 'ndim', 0) == 0 else list(map(float, v))
                         for k, v in metrics.items()}, indent=1))
      return 0
    seed = args.seed
  s = config.sample
  prompt = s.prompt
  text = sampling.sample_text(run, state.params, prompt, s.num_tokens, s.temperature, seed,
                              state.balancing_bias_state)
  if config.task == 'span_corruption':
    print_(f'--- sample (spans filled in for {sampling.SENTINEL}) ---\n{prompt}\n'
           f'{sampling.SENTINEL} = {text}')
  else:
    print_(f'--- sample (prompt {prompt!r}) ---\n{prompt}{text}')
  return 0


def _stopped(command: str, signal_name: str | None) -> int:
  """Say that a signal stopped `command` before it finished; the shell's status for it."""
  print(f'moejax {command}: stopped by {signal_name} before it finished; nothing was written',
        file=sys.stderr)
  return 130 if signal_name == 'SIGINT' else 143


def _analyze(args: argparse.Namespace, config) -> int:
  """Write routing.json and the figures; print where, and each layer's headline numbers."""
  from moejax.analysis import analyze_run
  from moejax.errors import InputError
  from moejax.train.stopping import agreed_stop, stop_requests
  texts = {}
  for path in args.text or ():
    try:
      with open(path, encoding='utf-8') as f:
        texts[path if os.path.basename(path) in texts else os.path.basename(path)] = f.read()
    except (OSError, UnicodeDecodeError) as error:
      raise InputError(f'cannot read --text {path}: {error}') from None
  text = (next(iter(texts.values())) if len(texts) == 1 else texts) if texts else None
  out = args.out
  with stop_requests() as request:
    report = analyze_run(args.workdir, text, out, args.step, args.max_tokens, config,
                         args.at_init, request)
  if report is None:
    return _stopped('analyze', agreed_stop(request).signal)
  print(f'routed {report["tokens"]} tokens at step {report["step"]} '
        f'(eval capacity factor {report["eval_capacity_factor"]}); wrote {out}/routing.json, '
        'colored_text.png/.html, class_usage.png, agreement.png'
        + (', usage_by_text.png' if 'texts' in report else '')
        + ('' if args.at_init else ', usage_over_training.png'))
  for name, layer in report['layers'].items():
    a, r = layer['agreement'], layer['router']
    print(f'  {name:<24} same first choice {a["same_first"]:.1%} (chance '
          f'{a["same_first_chance"]:.1%}), token purity {layer["token_purity"]:.1%}, '
          f'entropy {r["entropy"]:.2f}/{r["max_entropy"]:.2f} '
          f'nats, dropped {r["fraction_dropped"]:.2%}')
  return 0


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else argv[1:]
  if argv[:1] == ['ablate']:  # its own arguments: moejax.ablate.command
    from moejax.ablate import main as ablate_main
    return ablate_main(argv[1:])
  rest, overrides = split_overrides(argv)
  args = _parser().parse_args(rest)
  if args.command == 'train' and not (args.workdir or args.print_config):
    print('moejax train: --workdir is required (unless --print_config)', file=sys.stderr)
    return 2
  debug = debug_requested(args)
  if args.command == 'lower':  # one process, simulated devices: no job to join
    return reporting_errors('lower', lambda: _lower(args, overrides, debug), debug)
  from moejax import distributed  # before anything touches the devices
  try:
    distributed.initialize_from(args.coordinator, args.num_processes, args.process_id)
  except ValueError as error:
    print(f'moejax {args.command}: {error}', file=sys.stderr)
    return 2
  warnings.formatwarning = lambda message, category, *_, **__: (
      f'moejax {args.command}: warning: {message}\n')
  return reporting_errors(args.command, lambda: _command(args, overrides), debug)


def _command(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
  if args.command == 'analyze':
    args.out = args.out or os.path.join(args.workdir, 'analysis')
  for flag in ('workdir', 'out'):  # where a command writes (or reads) a directory
    if getattr(args, flag, None):
      check_directory(getattr(args, flag), f'--{flag}')
  if args.command == 'import-hf':
    from moejax.convert.workdir import import_hf
    print(json.dumps(import_hf(args.source, args.workdir, args.config, overrides), indent=1))
    return 0
  config = _config(args, overrides)
  if args.command == 'train' and args.print_config:
    print(config.to_json(indent=2))
    return 0
  if args.command == 'analyze':
    return _analyze(args, config)
  if args.command == 'export-hf':
    from moejax.convert.workdir import export_hf
    print(json.dumps(export_hf(args.workdir, args.out, config, args.step, args.max_shard_size,
                               args.model_type), indent=1))
    return 0
  return _run(args, config)


def _lower(args: argparse.Namespace, overrides: list[tuple[str, str]], debug: bool) -> int:
  """Lower the config's train step for --platform on its mesh of simulated CPU devices (asked
  for before JAX touches a device); print its collectives and largest arrays. A program that
  does not lower exits 1 with its cause in one line."""
  from moejax.platforms import PLATFORMS
  from moejax.train import config as config_lib
  from moejax.train import lowering
  if args.platform not in PLATFORMS:
    print(f'moejax lower: --platform {args.platform} is not one of {PLATFORMS}', file=sys.stderr)
    return 2
  config = _unchecked_config(args, overrides)
  lowering.simulate_devices(lowering.mesh_size(config))
  lowering.check_devices(lowering.mesh_size(config))
  config_lib.check_config(config)
  try:
    lowered, run, state = lowering.lower_train_step(config, args.platform)
  except lowering.LoweringError as error:
    if debug:
      raise
    print(f'moejax lower: {error}', file=sys.stderr)
    return 1
  print(lowering.report(lowered, run, state, args.platform))
  return 0


if __name__ == '__main__':
  sys.exit(main())
