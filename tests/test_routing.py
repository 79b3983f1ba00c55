"""Routers on hand-computed cases: positions, weights, dropped sets, aux losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import routing
from moejax.experts import Activation, bias_name, block_expert_ffn
from moejax.dispatch import EinsumDispatcher, IndicesDispatcher, SortedDispatcher

# Top-1, 4 tokens, 2 experts, capacity 2: tokens 0, 1, 2 pick expert 0, so token 2 overflows.
TOP1_PROBS = np.array([[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]]], np.float32)
# Top-2, 3 tokens, 3 experts, capacity 2. Choices: t0 -> (e0, e1), t1 -> (e1, e2), t2 -> (e1, e0).
TOP2_PROBS = np.array([[[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.3, 0.6, 0.1]]], np.float32)


def _all_valid(probs):
  return jnp.ones(probs.shape[:2], jnp.bool_)


def test_top1_hand_case():
  decision = routing.top_k_routing(TOP1_PROBS, _all_valid(TOP1_PROBS), num_selected_experts=1,
                                   capacity=2, causal=True)
  np.testing.assert_array_equal(decision.expert_index[0, :, 0], [0, 0, 0, 1])
  np.testing.assert_array_equal(decision.position[0, :, 0], [0, 1, 2, 0])
  np.testing.assert_array_equal(decision.dispatched[0, :, 0], [True, True, False, True])
  np.testing.assert_allclose(decision.weight[0, :, 0], [0.9, 0.8, 0.0, 0.6], rtol=1e-6)
  np.testing.assert_allclose(routing.fraction_dropped(decision), 0.25)
  # f = [3/4, 1/4], P = [0.7, 0.3]: 2 * (0.75 * 0.7 + 0.25 * 0.3) = 1.2
  np.testing.assert_allclose(
      routing.load_balancing_loss(TOP1_PROBS, decision, _all_valid(TOP1_PROBS)), 1.2, rtol=1e-6)


def test_top2_choice_major_drops_second_choices_first():
  decision = routing.top_k_routing(TOP2_PROBS, _all_valid(TOP2_PROBS), num_selected_experts=2,
                                   capacity=2, causal=False)
  # First choices claim slots first: t0->e0@0, t1->e1@0, t2->e1@1; then t0->e1@2 (dropped),
  # t1->e2@0, t2->e0@1.
  np.testing.assert_array_equal(decision.expert_index[0], [[0, 1], [1, 2], [1, 0]])
  np.testing.assert_array_equal(decision.position[0], [[0, 2], [0, 0], [1, 1]])
  np.testing.assert_array_equal(decision.dispatched[0], [[True, False], [True, True], [True, True]])
  np.testing.assert_allclose(decision.weight[0], [[0.6, 0.0], [0.6, 0.3], [0.6, 0.3]], rtol=1e-6)
  np.testing.assert_allclose(routing.fraction_dropped(decision), 1 / 6, rtol=1e-6)
  # f = [2, 3, 1] / 6, P = [1/3, 1/2, 1/6]: 3 * (2/18 + 3/12 + 1/36) = 7/6
  np.testing.assert_allclose(
      routing.load_balancing_loss(TOP2_PROBS, decision, _all_valid(TOP2_PROBS)), 7 / 6, rtol=1e-6)


def test_top2_causal_order_is_token_by_token():
  decision = routing.top_k_routing(TOP2_PROBS, _all_valid(TOP2_PROBS), num_selected_experts=2,
                                   capacity=2, causal=True)
  # t0->e0@0, e1@0; t1->e1@1, e2@0; t2->e1@2 (dropped), e0@1: no token loses a slot to a later one.
  np.testing.assert_array_equal(decision.position[0], [[0, 0], [1, 0], [2, 1]])
  np.testing.assert_array_equal(decision.dispatched[0], [[True, True], [True, True], [False, True]])


def test_einsum_tensors_hand_case():
  decision = routing.top_k_routing(TOP2_PROBS, _all_valid(TOP2_PROBS), num_selected_experts=2,
                                   capacity=2, causal=False)
  dispatcher = EinsumDispatcher.from_decision(decision, jnp.float32)
  expected = np.zeros((1, 3, 3, 2), np.float32)  # [G, S, E, C]
  for token, expert, slot in [(0, 0, 0), (1, 1, 0), (2, 1, 1), (1, 2, 0), (2, 0, 1)]:
    expected[0, token, expert, slot] = 1.0
  np.testing.assert_array_equal(dispatcher.dispatch_mask, expected)
  expected_weights = expected * TOP2_PROBS[..., None]
  np.testing.assert_allclose(dispatcher.combine_weights, expected_weights, rtol=1e-6)


@pytest.mark.parametrize('dispatcher_cls', [EinsumDispatcher, IndicesDispatcher])
def test_dispatch_and_combine_hand_case(dispatcher_cls):
  decision = routing.top_k_routing(TOP2_PROBS, _all_valid(TOP2_PROBS), num_selected_experts=2,
                                   capacity=2, causal=False)
  dispatcher = dispatcher_cls.from_decision(decision, jnp.float32)
  tokens = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # [G=1, S=3, D=2]
  buffers = dispatcher.dispatch(tokens)  # [E, G, C, D]
  np.testing.assert_array_equal(buffers[0, 0], [[1, 0], [1, 1]])  # e0: t0, t2
  np.testing.assert_array_equal(buffers[1, 0], [[0, 1], [1, 1]])  # e1: t1, t2
  np.testing.assert_array_equal(buffers[2, 0], [[0, 1], [0, 0]])  # e2: t1, one empty slot
  # Identity experts: each token comes back scaled by the weights of its dispatched choices.
  np.testing.assert_allclose(dispatcher.combine(buffers)[0],
                             [[0.6, 0.0], [0.0, 0.9], [0.9, 0.9]], rtol=1e-6)


def test_sorted_dispatch_hand_case():
  """Dispatched choices sorted by expert, each expert's rows padded to a tile of 2; t0's second
  choice (e1) overflowed and gets no row."""
  decision = routing.top_k_routing(TOP2_PROBS, _all_valid(TOP2_PROBS), num_selected_experts=2,
                                   capacity=2, causal=False)
  dispatcher = SortedDispatcher.from_decision(decision, jnp.float32, tile=2)
  np.testing.assert_array_equal(dispatcher.first_row, [0, 2, 4])
  np.testing.assert_array_equal(dispatcher.row_count, [2, 2, 2])
  assert dispatcher.max_group == 2  # G * C = 1 * 2 rows, a whole tile
  tokens = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # [G=1, S=3, D=2]
  rows = dispatcher.dispatch_rows(tokens)  # [R, D]
  assert rows.shape == (10, 2)  # (ceil(6 choices / 2) + 3 experts - 1) tiles of 2
  expected = np.zeros((10, 2), np.float32)
  expected[:5] = [[1, 0], [1, 1],  # e0: t0, t2
                  [0, 1], [1, 1],  # e1: t1, t2
                  [0, 1]]  # e2: t1, then one padding row
  np.testing.assert_array_equal(rows, expected)
  np.testing.assert_allclose(dispatcher.combine_rows(rows)[0],
                             [[0.6, 0.0], [0.0, 0.9], [0.9, 0.9]], rtol=1e-6)


def _clamped_swiglu(pre, gate_pre):
  """gpt-oss's expert activation, written out: limit 0.5 (so it clamps), offset 1."""
  gate = jnp.minimum(pre, 0.5)
  return gate * jax.nn.sigmoid(1.702 * gate) * (jnp.clip(gate_pre, -0.5, 0.5) + 1)


# make test-fast keeps 3 of the 6: each (glu, bias) once, both block layouts.
FAST_BLOCK_CASES = {(False, False, 4), (True, False, 8), (True, True, 4)}


@pytest.mark.parametrize('glu,bias,block_size,max_expert_rows', [
    pytest.param(glu, bias, size, rows,
                 marks=() if (glu, bias, size) in FAST_BLOCK_CASES else pytest.mark.slow)
    for glu, bias in [(False, False), (True, False), (True, True)]
    for size, rows in [(4, None), (8, 7)]])
def test_block_expert_ffn_equals_each_rows_own_expert(glu, bias, block_size, max_expert_rows):
  """Blocks of 4 rows, then one of the rest (expert 0: 5 rows = 4 + 1, expert 1: none, expert 2:
  7 = 4 + 3), or, with at most 7 rows an expert, one block each (no 8-row block compiled): every
  row gets its own expert's FFN, rows of no expert get zeros; gradients equal plain autodiff's.
  With `bias`: expert biases and gpt-oss's clamped SwiGLU."""
  num_experts, model_dim, ffn_dim, num_rows = 3, 4, 6, 16
  keys = jax.random.split(jax.random.key(0), 7)
  rows = jax.random.normal(keys[0], (num_rows, model_dim))
  names = ('wi', 'wo', 'wi_gate') if glu else ('wi', 'wo')
  names += ('bi', 'bo', 'bi_gate') if bias else ()
  shapes = {'wi': (num_experts, model_dim, ffn_dim), 'wo': (num_experts, ffn_dim, model_dim),
            'wi_gate': (num_experts, model_dim, ffn_dim), 'bi': (num_experts, ffn_dim),
            'bo': (num_experts, model_dim), 'bi_gate': (num_experts, ffn_dim)}
  weights = {name: jax.random.normal(key, shapes[name]) for name, key in zip(names, keys[1:])}
  first_row, row_count = jnp.array([0, 5, 5]), jnp.array([5, 0, 7])
  row_expert = jnp.array([0] * 5 + [2] * 7 + [0] * 4)
  owned = (jnp.arange(num_rows) < 12)[:, None]
  activation = Activation('quick_gelu', limit=0.5, glu_offset=1.0) if bias else 'gelu'

  def blocks(weights, rows):
    return block_expert_ffn(rows, first_row, row_count, weights, block_size=block_size, tile=1,
                            activation=activation, dtype=jnp.float32,
                            max_expert_rows=max_expert_rows)

  def reference(weights, rows):
    w = {name: value[row_expert] for name, value in weights.items()}  # per row: [R, ...]
    project = lambda x, name, spec: (  # noqa: E731
        jnp.einsum(spec, x, w[name]) + w.get(bias_name(name), 0.0))
    pre = project(rows, 'wi', 'rd,rdf->rf')
    if bias:
      hidden = _clamped_swiglu(pre, project(rows, 'wi_gate', 'rd,rdf->rf'))
    else:
      hidden = jax.nn.gelu(pre)
      if glu:
        hidden = hidden * project(rows, 'wi_gate', 'rd,rdf->rf')
    return jnp.where(owned, project(hidden, 'wo', 'rf,rfd->rd'), 0.0)

  np.testing.assert_allclose(blocks(weights, rows), reference(weights, rows), atol=1e-5,
                             rtol=1e-5)
  loss = lambda fn: lambda w, r: jnp.sum(jnp.cos(fn(w, r)))  # noqa: E731
  grads = jax.grad(loss(blocks), argnums=(0, 1))(weights, rows)
  expected = jax.grad(loss(reference), argnums=(0, 1))(weights, rows)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), grads,
               expected)


def test_z_loss_formula():
  logits = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])
  expected = np.mean([np.log(np.exp([1, 2, 3]).sum())**2, np.log(3.0)**2])
  np.testing.assert_allclose(routing.router_z_loss(logits, jnp.ones((1, 2), bool)), expected,
                             rtol=1e-6)
  # Padded tokens count in no statistic.
  np.testing.assert_allclose(routing.router_z_loss(logits, jnp.array([[True, False]])),
                             np.log(np.exp([1, 2, 3]).sum())**2, rtol=1e-6)


@pytest.mark.parametrize('k', [1, 2, 3, 4])
def test_load_balancing_loss_is_one_when_uniform(k):
  num_experts, group_size = 4, 8
  probs = jnp.full((2, group_size, num_experts), 1 / num_experts)
  valid = jnp.ones((2, group_size), bool)
  decision = routing.top_k_routing(probs, valid, num_selected_experts=k, capacity=group_size,
                                   causal=True)
  np.testing.assert_allclose(routing.load_balancing_loss(probs, decision, valid), 1.0, rtol=1e-6)
  # Perfectly balanced one-hot-ish routing: token s prefers expert s % E.
  peaked = jax.nn.softmax(5 * jax.nn.one_hot(jnp.arange(group_size) % num_experts, num_experts))
  peaked = jnp.broadcast_to(peaked, probs.shape)
  decision = routing.top_k_routing(peaked, valid, num_selected_experts=1, capacity=group_size,
                                   causal=True)
  np.testing.assert_allclose(routing.expert_usage(decision), 1 / num_experts)
  np.testing.assert_allclose(routing.load_balancing_loss(peaked, decision, valid), 1.0, rtol=1e-6)


def test_padding_is_never_dispatched_and_counts_in_no_statistic():
  probs = jnp.asarray(TOP1_PROBS)
  valid = jnp.array([[True, False, True, True]])
  decision = routing.top_k_routing(probs, valid, num_selected_experts=1, capacity=2, causal=True)
  np.testing.assert_array_equal(decision.dispatched[0, :, 0], [True, False, True, True])
  np.testing.assert_array_equal(decision.position[0, :, 0], [0, 0, 1, 0])  # t1 takes no slot
  np.testing.assert_allclose(routing.fraction_dropped(decision), 0.0)
  # Tokens 0, 2, 3 alone: f = [2/3, 1/3], P = [2/3, 1/3].
  np.testing.assert_allclose(routing.load_balancing_loss(probs, decision, valid),
                             2 * (4 / 9 + 1 / 9), rtol=1e-6)
  np.testing.assert_allclose(routing.router_confidence(probs, decision, valid),
                             (0.9 + 0.7 + 0.6) / 3, rtol=1e-6)


def test_experts_choose_fills_every_expert():
  probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (3, 16, 4)))
  valid = jnp.ones((3, 16), bool).at[:, -3:].set(False)
  decision = routing.experts_choose_routing(probs, valid, capacity=5, causal=False)
  per_expert = decision.dispatched.sum(axis=1)  # [G, E]
  np.testing.assert_array_equal(per_expert, 5)
  assert not decision.dispatched[:, -3:].any()
  # Each expert took its 5 most probable real tokens.
  for g in range(3):
    for e in range(4):
      best = set(np.argsort(-np.where(valid[g], probs[g, :, e], -1))[:5].tolist())
      assert set(np.flatnonzero(decision.dispatched[g, :, e]).tolist()) == best
  # Slots are 0..C-1, each used once per expert.
  slots = np.where(decision.dispatched, decision.position, -1)
  for g in range(3):
    for e in range(4):
      assert sorted(s for s in slots[g, :, e] if s >= 0) == list(range(5))


def test_experts_choose_rejects_causal():
  with pytest.raises(ValueError, match='encoders only'):
    routing.experts_choose_routing(jnp.ones((1, 4, 2)) / 2, jnp.ones((1, 4), bool), capacity=2,
                                   causal=True)


def test_batch_prioritized_gives_slots_to_the_most_confident():
  # All 4 tokens pick expert 0, capacity 2: the two most confident (t3, t1) keep their slot.
  probs = jnp.array([[[0.6, 0.4], [0.8, 0.2], [0.55, 0.45], [0.9, 0.1]]])
  decision = routing.top_k_routing(probs, _all_valid(probs), num_selected_experts=1, capacity=2,
                                   causal=False, batch_prioritized=True)
  np.testing.assert_array_equal(decision.dispatched[0, :, 0], [False, True, False, True])
  np.testing.assert_array_equal(decision.position[0, [1, 3], 0], [1, 0])
  with pytest.raises(ValueError, match='encoders only'):
    routing.top_k_routing(probs, _all_valid(probs), num_selected_experts=1, capacity=2,
                          causal=True, batch_prioritized=True)


def test_normalized_weights_sum_to_one():
  decision = routing.top_k_routing(TOP2_PROBS, _all_valid(TOP2_PROBS), num_selected_experts=2,
                                   capacity=3, causal=True, normalize_weights=True)
  np.testing.assert_allclose(decision.weight[0], [[2 / 3, 1 / 3], [2 / 3, 1 / 3], [2 / 3, 1 / 3]],
                             rtol=1e-6)


def test_random_routing_keeps_second_choice_with_probability_2_w2():
  # Normalized top-2 weights (0.7, 0.3): the second choice survives with probability 0.6.
  probs = jnp.broadcast_to(jnp.array([0.7, 0.3, 0.0]), (4, 1000, 3))
  valid = jnp.ones((4, 1000), bool)
  decision = routing.top_k_routing(probs, valid, num_selected_experts=2, capacity=1000,
                                   causal=True,
                                   random_routing_draws=jax.random.uniform(jax.random.key(0),
                                                                           (4, 1000, 2)))
  assert decision.chosen[..., 0].all()
  np.testing.assert_allclose(decision.chosen[..., 1].mean(), 0.6, atol=0.02)
  np.testing.assert_array_equal(decision.weight[..., 1] > 0, decision.chosen[..., 1])
  # At uniform probabilities every choice is kept.
  uniform = jnp.full((1, 50, 4), 0.25)
  decision = routing.top_k_routing(uniform, jnp.ones((1, 50), bool), num_selected_experts=2,
                                   capacity=50, causal=True,
                                   random_routing_draws=jax.random.uniform(jax.random.key(1),
                                                                           (1, 50, 2)))
  assert decision.chosen.all()


def test_expert_capacity_formula():
  assert routing.expert_capacity(512, 8, 1, 1.25, 4) == 80
  assert routing.expert_capacity(512, 8, 2, 1.25, 4) == 160
  assert routing.expert_capacity(10, 4, 1, 1.0, 1) == 3  # ceil(2.5)
  assert routing.expert_capacity(16, 64, 1, 1.0, 4) == 4  # the minimum
  assert routing.expert_capacity(8, 1, 1, 1.25, 4) == 8  # never more than S


def test_load_balancing_loss_scales_per_choice_and_per_token_by_hand():
  # E = 4, top-2: tokens take experts (0, 1), (2, 3), (1, 0), (3, 2), each expert 2 of the 8
  # choices, and every expert's mean probability is 0.25: 1 per choice, K = 2 per token.
  probs = jnp.array([[[.4, .3, .2, .1], [.1, .2, .4, .3], [.3, .4, .1, .2], [.2, .1, .3, .4]]])
  valid = jnp.ones((1, 4), bool)
  decision = routing.top_k_routing(probs, valid, num_selected_experts=2, capacity=4, causal=True)
  np.testing.assert_allclose(routing.expert_usage(decision), [[0.25] * 4])
  assert float(routing.load_balancing_loss(probs, decision, valid)) == pytest.approx(1.0)
  assert float(routing.load_balancing_loss(probs, decision, valid, 'per_token')) == (
      pytest.approx(2.0))
  # Top-p = 0.75 with K = 2: token 0 (0.6, 0.4) takes both experts, token 1 (0.9, 0.1) only
  # expert 0. Counts (2, 1) over 3 choices and 2 tokens; mean probabilities P = (0.75, 0.25).
  probs = jnp.array([[[0.6, 0.4], [0.9, 0.1]]])
  valid = jnp.ones((1, 2), bool)
  decision = routing.top_k_routing(probs, valid, num_selected_experts=2, capacity=2, causal=True,
                                   top_p=0.75)
  per_choice = 2 * (2 / 3 * 0.75 + 1 / 3 * 0.25)  # f = counts / choices
  per_token = 2 * (2 / 2 * 0.75 + 1 / 2 * 0.25)   # f = counts / tokens (flaxformer's top-K f)
  assert float(routing.load_balancing_loss(probs, decision, valid)) == pytest.approx(per_choice)
  assert float(routing.load_balancing_loss(probs, decision, valid, 'per_token')) == (
      pytest.approx(per_token))
  with pytest.raises(ValueError, match='load_balancing_loss_scale'):
    routing.load_balancing_loss(probs, decision, valid, 'per_group')


def _top2_experts(selection):
  """The two experts that top-2 routing of one token picks by `selection` [E], as a set."""
  selection = jnp.asarray(selection, jnp.float32)[None, None]  # Shape: [1, 1, E]
  decision = routing.top_k_routing(jnp.zeros_like(selection), jnp.ones((1, 1), bool),
                                   num_selected_experts=2, capacity=1, causal=True,
                                   selection_scores=selection)
  return set(np.asarray(decision.expert_index).ravel().tolist())


def test_group_limited_top_k_hand_cases():
  # E = 4 in 2 groups ({0, 1}, {2, 3}), one kept, top-2.
  limit = lambda scores, group_score, fill: routing.limit_to_groups(  # noqa: E731
      jnp.asarray(scores, jnp.float32)[None, None], 2, 1, group_score, fill)[0, 0]
  # Group scores: max [0.4, 0.3] keeps group 0 (DeepSeek-V2); top-2 sums [0.45, 0.55] keep 1.
  scores = [0.05, 0.4, 0.3, 0.25]
  np.testing.assert_array_equal(limit(scores, 'max', 'zero'),
                                np.float32([0.05, 0.4, 0, 0]))
  assert _top2_experts(limit(scores, 'max', 'zero')) == {0, 1}
  assert _top2_experts(limit(scores, 'top2_sum', 'zero')) == {2, 3}
  # Bias-corrected scores below 0: top-2 sums [-0.3, -1.1] keep group 0. transformers 4.57.6's 0
  # then outranks the kept experts, so the top-2 is the masked group's; DeepSeek's -inf is not.
  scores = [-0.1, -0.2, -0.5, -0.6]
  np.testing.assert_array_equal(limit(scores, 'top2_sum', 'zero'),
                                np.float32([-0.1, -0.2, 0, 0]))
  np.testing.assert_array_equal(limit(scores, 'top2_sum', 'neg_inf'),
                                np.float32([-0.1, -0.2, -np.inf, -np.inf]))
  assert _top2_experts(limit(scores, 'top2_sum', 'zero')) == {2, 3}
  assert _top2_experts(limit(scores, 'top2_sum', 'neg_inf')) == {0, 1}


def test_sigmoid_scores_bias_picks_and_unbiased_scores_weigh():
  # DeepSeek-V3: sigmoid scores s, the correction bias only picks, weights s / (sum + 1e-20).
  logits = jnp.array([[[0.0, 1.0, 2.0, -1.0], [-200.0, -200.0, -200.0, -200.0]]])
  scores = routing.router_scores(logits, 'sigmoid')
  s = 1 / (1 + np.exp(-np.array([0.0, 1.0, 2.0, -1.0])))
  np.testing.assert_allclose(scores[0, 0], s, rtol=1e-6)
  selection = scores + jnp.array([2.0, 0.0, 0.0, 0.0])
  decision = routing.top_k_routing(scores, jnp.ones((1, 2), bool), num_selected_experts=2,
                                   capacity=2, causal=True, normalize_weights=True,
                                   selection_scores=selection)
  np.testing.assert_array_equal(decision.expert_index[0, 0], [0, 2])  # 0 by its bias
  np.testing.assert_allclose(decision.weight[0, 0], [s[0], s[2]] / (s[0] + s[2]), rtol=1e-6)
  np.testing.assert_array_equal(decision.weight[0, 1], [0.0, 0.0])  # scores 0: 0, not NaN
  # What the aux losses read: the scores over their sum (+ 1e-20: zeros stay zeros, not NaN).
  distribution = routing.score_distribution(scores, 'sigmoid')
  np.testing.assert_allclose(distribution[0, 0], s / s.sum(), rtol=1e-6)
  np.testing.assert_array_equal(distribution[0, 1], [0.0] * 4)


def test_softmax_after_top_k_hand_case_and_equals_normalized_softmax():
  # gpt-oss: top-2 of the logits [1, 3, 2, 0] is experts (1, 2), weighted softmax([3, 2]).
  logits = jnp.array([[[1.0, 3.0, 2.0, 0.0]]])
  valid = jnp.ones((1, 1), bool)
  decision = routing.top_k_routing(jax.nn.softmax(logits), valid, num_selected_experts=2,
                                   capacity=1, causal=True, top_k_logits=logits)
  np.testing.assert_array_equal(decision.expert_index[0, 0], [1, 2])
  np.testing.assert_allclose(decision.weight[0, 0], [np.e / (1 + np.e), 1 / (1 + np.e)],
                             rtol=1e-6)
  logits = 3.0 * jax.random.normal(jax.random.key(0), (2, 16, 8))
  valid = jnp.ones((2, 16), bool)
  after = routing.top_k_routing(jax.nn.softmax(logits), valid, num_selected_experts=3,
                                capacity=4, causal=True, top_k_logits=logits)
  before = routing.top_k_routing(jax.nn.softmax(logits), valid, num_selected_experts=3,
                                 capacity=4, causal=True, normalize_weights=True)
  np.testing.assert_array_equal(after.expert_index, before.expert_index)
  np.testing.assert_array_equal(after.dispatched, before.dispatched)
  np.testing.assert_allclose(after.weight, before.weight, atol=1e-6)
