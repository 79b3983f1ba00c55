"""Shared by the tests: the smoke config (loaded as the CLI loads it), a layer's init and apply,
and the command line in a subprocess stopped by SIGTERM."""
import os
import signal
import subprocess
import time

import jax

from moejax.train.config import config_from_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = os.path.join('experiments', 'configs', 'smoke.py')
CLI_ENV = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
           'JAX_PLATFORMS': 'cpu'}  # a subprocess's: 8 CPU devices


def sigterm_once_logged(command: list[str], metrics, lines: int = 3,
                        timeout: float = 240) -> tuple[int, str, str]:
  """Run `command` (in the repo, with CLI_ENV); SIGTERM it once the file `metrics` has `lines`
  lines (or after `timeout` seconds); its exit status, stdout and stderr."""
  proc = subprocess.Popen(command, cwd=REPO, env=CLI_ENV, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
      if os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= lines:
        break
      time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  return proc.returncode, out, err


def run_cli(capsys, *args, cwd=None) -> tuple[int, str, str]:
  """`moejax ARGS` in this process (from `cwd`): (exit status, stdout, stderr). argparse's exits
  (--help, usage errors) count as the status they give."""
  from moejax import cli
  capsys.readouterr()
  here = os.getcwd()
  try:
    if cwd:
      os.chdir(cwd)
    status = cli.main(['moejax', *map(str, args)])
  except SystemExit as exit_:
    status = exit_.code
  finally:
    os.chdir(here)
  out, err = capsys.readouterr()
  return status, out, err


def smoke_config(data_dir, **train):
  """experiments/configs/smoke.py with its TFDS data_dir in `data_dir` and `train` overrides."""
  config = config_from_file(os.path.join(REPO, SMOKE_CONFIG))
  config.data.source = os.path.join(REPO, config.data.source)
  config.data.data_dir = str(data_dir)
  config.train.update(train)
  return config


def init_layer(layer, x, **kwargs):
  """Variables of a layer initialized on x [B, L, D] (deterministic)."""
  return layer.init(jax.random.key(42), x, True, **kwargs)


def apply_layer(layer, variables, x, deterministic=True, **kwargs):
  """(output, state): the layer applied with its 'intermediates' collected."""
  return layer.apply(variables, x, deterministic, mutable=['intermediates'], **kwargs)
