"""`moejax train | eval | sample`: run an experiment config, evaluate or sample a checkpoint.

  moejax train  --config experiments/configs/switch_tiny.py --workdir runs/x \
                [--config.model.num_experts=16 ...]
  moejax eval   --workdir runs/x [--step N]
  moejax sample --workdir runs/x [--prompt "ROMEO:" --num_tokens 300 --temperature 0.8]

`eval` and `sample` read the run's saved config.json unless --config is given.
"""
from __future__ import annotations

import json
import sys

from absl import flags
from ml_collections import config_dict, config_flags

COMMANDS = ('train', 'eval', 'sample')


def _flags() -> flags.FlagValues:
  values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'experiment config file (get_config())',
                                  flag_values=values, lock_config=True)
  flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics)', flag_values=values)
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)', flag_values=values)
  flags.DEFINE_string('prompt', None, 'sample: text to continue (default: config.sample.prompt)',
                      flag_values=values)
  flags.DEFINE_integer('num_tokens', None, 'sample: tokens to generate', flag_values=values)
  flags.DEFINE_float('temperature', None, 'sample: 0 is greedy', flag_values=values)
  flags.DEFINE_integer('seed', 0, 'sample: rng seed', flag_values=values)
  return values


def _config(values: flags.FlagValues, command: str) -> config_dict.ConfigDict:
  if values.config is not None:
    return values.config
  if command == 'train':
    raise SystemExit('moejax train: give --config')
  from moejax.train.config import saved_config  # imports JAX: after the arguments are checked
  try:
    return saved_config(values.workdir)
  except FileNotFoundError as error:
    raise SystemExit(f'moejax {command}: give --config ({error})') from None


def main(argv: list[str] | None = None) -> int:
  argv = sys.argv if argv is None else argv
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print(__doc__, file=sys.stderr)
    return 2
  command, values = argv[1], _flags()
  values([argv[0], *argv[2:]])
  if not values.workdir:
    raise SystemExit(f'moejax {command}: --workdir is required')
  config = _config(values, command)

  from moejax.train import loop  # imports JAX and TensorFlow: after the arguments are checked
  if command == 'train':
    try:
      summary = loop.train(config, values.workdir)
    except loop.TrainingDiverged as error:
      print(f'moejax train: {error}', file=sys.stderr)
      return 1
    print(loop.format_summary(summary))
    if summary['stopped_by']:
      print(f'stopped by {summary["stopped_by"]}; checkpoint saved at step {summary["step"]}. '
            'Run the same command again to resume.')
      return 0
    run, state = summary['run'], summary['state']
  else:
    run, state = loop.load(config, values.workdir, values.step)
    if command == 'eval':
      metrics = loop.evaluate(run, state.params, bias_state=state.router_bias_state)
      print(json.dumps({k: float(v) if getattr(v, 'ndim', 0) == 0 else list(map(float, v))
                        for k, v in metrics.items()}, indent=1))
      return 0
  s = config.sample
  prompt = s.prompt if values.prompt is None else values.prompt
  text = loop.sample_text(run, state.params, prompt,
                          s.num_tokens if values.num_tokens is None else values.num_tokens,
                          s.temperature if values.temperature is None else values.temperature,
                          values.seed, state.router_bias_state)
  if config.task == 'span_corruption':
    print(f'--- sample (spans filled in for {loop.SENTINEL}) ---\n{prompt}\n{loop.SENTINEL} = {text}')
  else:
    print(f'--- sample (prompt {prompt!r}) ---\n{prompt}{text}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
