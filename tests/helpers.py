"""Shared by the tests: the smoke config (loaded as the CLI loads it), a layer's init and apply,
and the command line in a subprocess stopped by SIGTERM."""
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax import collect_decisions, collect_router_probs
from moejax.models import make_model
from moejax.train.config import config_from_file
from xla_flags import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CONFIG = os.path.join('experiments', 'configs', 'smoke.py')
CLI_ENV = {**os.environ, 'XLA_FLAGS': xla_flags(8),
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


def train_args(workdir, data_dir, *overrides) -> list[str]:
  """`moejax train` arguments of the smoke config (run from the repo) in `workdir`, its TFDS
  data_dir in `data_dir`, then `overrides` (--config.<field>=VALUE, flags)."""
  return ['train', '--config', os.path.join(REPO, SMOKE_CONFIG), '--workdir', str(workdir),
          f'--config.data.data_dir={data_dir}', *overrides]


def smoke_config(data_dir, **train):
  """experiments/configs/smoke.py with its TFDS data_dir in `data_dir` and `train` overrides."""
  config = config_from_file(os.path.join(REPO, SMOKE_CONFIG))
  config.data.source = os.path.join(REPO, config.data.source)
  config.data.data_dir = str(data_dir)
  config.train.update(train)
  return config


def apply_imported(config, params, reference, state=None):
  """An imported model on a fixture's reference.npz inputs: (logits [B, L, V], then per MoE
  layer in the reference's order (the encoder's, then the decoder's; each stack's in depth
  order): router probs [B * L, E], chosen experts [B * L, K], dropped choices [B * L, K], and
  their combine weights [B * L, K]). `state`: the collections besides the params an import
  fills (`from_hf_variables`)."""
  ids = jnp.asarray(reference['input_ids'])
  args = (ids, jnp.ones(ids.shape, bool))
  if config.kind == 'encoder_decoder':
    decoder_ids = jnp.asarray(reference['decoder_input_ids'])
    args += (decoder_ids, jnp.ones(decoder_ids.shape, bool))
  model = make_model(config)  # compiled whole: op by op, each op of each shape compiles alone
  logits, state = jax.jit(lambda variables, *args: model.apply(
      variables, *args, True, mutable=['decisions']))({'params': params, **(state or {})}, *args)
  flat = lambda x: np.asarray(x).reshape(-1, x.shape[-1])
  probs, decisions = collect_router_probs(state), collect_decisions(state)
  names = sorted(probs, key=_layer_order)
  return (np.asarray(logits), [flat(probs[n]) for n in names],
          [flat(decisions[n].expert_index) for n in names],
          [~flat(decisions[n].dispatched) for n in names],
          [flat(decisions[n].weight) for n in names])


def reference_weights(config, reference: dict, layer: int) -> np.ndarray:
  """The combine weights [B * L, K] a fixture's reference gives MoE layer `layer`: its own
  `weights` where it has them (the DeepSeek and GLM fixtures), else its probabilities of the
  chosen experts, renormalized where the family does (Mixtral, norm_topk_prob, gpt-oss's
  softmax over the top-K logits)."""
  if 'weights' in reference:
    return reference['weights'][layer]
  top = np.take_along_axis(reference['router_probs'][layer], reference['experts'][layer], -1)
  if config.normalize_weights or config.softmax_after_top_k:
    top = top / top.sum(-1, keepdims=True)
  return top * config.routed_scaling_factor


def _layer_order(name):
  """'encoder/unit_3/block_1' -> (0, 3, 1): the encoder first, then depth (not text) order."""
  stack, unit, block = name.split('/')[:3]
  return stack != 'encoder', int(unit.split('_')[1]), int(block.split('_')[1])


def init_layer(layer, x, **kwargs):
  """Variables of a layer initialized on x [B, L, D] (deterministic)."""
  return layer.init(jax.random.key(42), x, True, **kwargs)


def apply_layer(layer, variables, x, deterministic=True, **kwargs):
  """(output, state): the layer applied with its 'intermediates' collected."""
  return layer.apply(variables, x, deterministic, mutable=['intermediates'], **kwargs)


# Today's routing rules in one layer each: DeepSeek-V3 / GLM-4.5's (sigmoid scores, a correction
# bias that picks, group-limited top-k by top-2 sums, routed scaling) with gpt-oss's experts
# (biases, clamped SwiGLU); gpt-oss's router (softmax after the top-k) with DeepSeek's -inf mask.
ROUTING_OPTIONS = {
    'sigmoid_groups_biased_experts': dict(
        score_function='sigmoid', num_expert_groups=4, num_selected_groups=2,
        group_score='top2_sum', normalize_weights=True, routed_scaling_factor=2.5,
        balancing_bias=True, expert_bias=True, glu=True, activation='quick_gelu',
        activation_limit=0.5, glu_linear_offset=1.0),
    'softmax_after_top_k': dict(softmax_after_top_k=True, router_bias=True, expert_bias=True,
                                num_expert_groups=2, num_selected_groups=1,
                                unselected_group_fill='neg_inf'),
}


def perturbed(variables, seed=0, scale=0.2):
  """`variables` with normal noise added to every leaf: biases and balancing biases that are not
  zero, some negative."""
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return tree.unflatten([leaf + scale * jax.random.normal(key, leaf.shape)
                         for leaf, key in zip(leaves, keys)])


def assert_decoding_matches_the_window(config, length: int = 12):
  """A decoder LM of `config` decoding with its cache (a prompt of 5, then token by token) gives
  the logits of the whole window to 1e-5."""
  ids = jax.random.randint(jax.random.key(1), (2, length), 3, config.vocab_size)
  mask = jnp.ones(ids.shape, jnp.bool_)
  full, decoding = make_model(config), make_model(config, decode_length=length)
  params = jax.jit(lambda: full.init(jax.random.key(0), ids, mask, True)['params'])()
  expected = jax.jit(lambda params: full.apply({'params': params}, ids, mask, True))(params)
  cache = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(
      lambda: decoding.init(jax.random.key(0), ids[:, :1], mask[:, :1], True)['cache']))
  step = jax.jit(lambda cache, *inputs: decoding.apply(
      {'params': params, 'cache': cache}, *inputs, True, mutable=['cache']))
  for begin, end in [(0, 5)] + [(t, t + 1) for t in range(5, length)]:
    logits, state = step(cache, ids[:, begin:end], mask[:, begin:end])
    cache = state['cache']
    np.testing.assert_allclose(logits, expected[:, begin:end], atol=1e-5, err_msg=str(begin))
