"""Grouped dispatch: the exact-size expert groups and the grouped-matmul experts, by hand.

The layer-level equivalences (grouped == sorted == indices == einsum, forward and gradients,
dropless and with capacity, with padding) are in tests/test_layer.py, the 8-device ones in
tests/test_sharding.py.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.dispatch import GroupedDispatcher, RowDispatcher, make_dispatcher
from moejax.experts import Activation, ExpertWeights, bias_name, grouped_expert_ffn

D, F = 4, 6


# gpt-oss's clamped SwiGLU, with a limit (0.5) that clamps here.
CLAMPED_SWIGLU = Activation('quick_gelu', limit=0.5, glu_offset=1.0)


def _weights(num_experts, glu, bias=False):
  """The experts' params (biases drawn at random: they start at zero)."""
  weights = dict(ExpertWeights(num_experts, F, glu=glu, bias=bias).init(jax.random.key(0),
                                                                        D)['params'])
  return {name: w + (jax.random.normal(jax.random.key(2), w.shape) if name[0] == 'b' else 0)
          for name, w in weights.items()}


def _per_expert_ffn(rows, group_sizes, weights, activation):
  """The reference: each expert's slice of rows through its own FFN, zeros past the groups."""
  def project(x, name, e):
    return x @ weights[name][e] + (weights[bias_name(name)][e] if 'bi' in weights else 0)

  out, start = [], 0
  for e, size in enumerate(group_sizes):
    x = rows[start:start + size]
    if activation == CLAMPED_SWIGLU:  # written out: (clip(up) + 1) * g * sigmoid(1.702 g)
      gate = jnp.minimum(project(x, 'wi', e), 0.5)
      hidden = (gate * jax.nn.sigmoid(1.702 * gate)
                * (jnp.clip(project(x, 'wi_gate', e), -0.5, 0.5) + 1))
    else:
      hidden = {'relu': nn.relu, 'gelu': nn.gelu}[activation](project(x, 'wi', e))
      if 'wi_gate' in weights:
        hidden = hidden * project(x, 'wi_gate', e)
    out.append(project(hidden, 'wo', e))
    start += size
  out.append(jnp.zeros((rows.shape[0] - start, D)))
  return jnp.concatenate(out)


@pytest.mark.parametrize('glu,activation,bias', [(False, 'relu', False), (True, 'gelu', False),
                                                (True, CLAMPED_SWIGLU, True)],
                         ids=['relu', 'glu-gelu', 'clamped-swiglu-biases'])
def test_grouped_expert_ffn_equals_each_expert_on_its_rows(glu, activation, bias):
  """Three experts own rows 0-1, none and 2-4 (group sizes [2, 0, 3]); rows 5-6 are no one's
  and get zeros (and no gradient) whatever they hold, expert biases included. Expert 1 is
  empty: zero gradients."""
  group_sizes = [2, 0, 3]
  rows = jax.random.normal(jax.random.key(1), (7, D))
  weights = _weights(3, glu, bias)

  def loss(ffn, rows, weights):
    out = ffn(rows, weights)
    return jnp.sum(out * jnp.cos(out)), out

  def grouped(rows, weights):
    return grouped_expert_ffn(rows, jnp.array(group_sizes, jnp.int32), weights,
                              activation=activation, dtype=jnp.float32)

  def reference(rows, weights):
    return _per_expert_ffn(rows, group_sizes, weights, activation)

  loss_and_grads = jax.jit(jax.value_and_grad(loss, argnums=(1, 2), has_aux=True),
                           static_argnums=0)
  (_, out), grads = loss_and_grads(grouped, rows, weights)
  (_, out_ref), grads_ref = loss_and_grads(reference, rows, weights)
  np.testing.assert_allclose(out, out_ref, atol=1e-5, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
               grads, grads_ref)
  np.testing.assert_array_equal(out[5:], 0.0)
  np.testing.assert_array_equal(grads[0][5:], 0.0)
  for name, grad in grads[1].items():
    np.testing.assert_array_equal(grad[1], 0.0, err_msg=name)


def test_grouped_dispatcher_has_exact_groups():
  """Top-2 over 4 experts with capacity 3 per group: each expert's rows are exactly its
  dispatched choices, back to back from row 0 in expert order, each holding its token."""
  num_groups, group_size = 2, 8
  probs = jax.nn.softmax(4 * jax.random.normal(jax.random.key(2), (num_groups, group_size, 4)))
  valid = jnp.ones((num_groups, group_size), bool).at[1, -2:].set(False)
  decision = routing.top_k_routing(probs, valid, num_selected_experts=2, capacity=3, causal=True)
  dispatcher = make_dispatcher(decision, 'grouped', jnp.float32)
  assert isinstance(dispatcher, GroupedDispatcher) and isinstance(dispatcher, RowDispatcher)
  assert dispatcher.tile == 1 and dispatcher.max_group == num_groups * 3
  tokens = jax.random.normal(jax.random.key(3), (num_groups, group_size, D))
  rows = np.asarray(dispatcher.dispatch_rows(tokens))
  dispatcher, decision, tokens = jax.tree.map(np.asarray, (dispatcher, decision, tokens))
  counts = np.bincount(decision.expert_index[decision.dispatched], minlength=4)
  assert counts.max() == 6 and counts.sum() < 2 * 14  # capacity dropped some choices
  np.testing.assert_array_equal(dispatcher.row_count, counts)
  np.testing.assert_array_equal(dispatcher.first_row, np.cumsum(counts) - counts)
  np.testing.assert_array_equal(rows[counts.sum():], 0.0)
  for g, s, k in zip(*np.nonzero(decision.dispatched)):
    e = decision.expert_index[g, s, k]
    row = dispatcher.choice_row[(g * group_size + s) * 2 + k]
    assert dispatcher.first_row[e] <= row < dispatcher.first_row[e] + counts[e]
    np.testing.assert_array_equal(rows[row], tokens[g, s])
