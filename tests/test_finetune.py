"""The book-classification task and text-to-text fine-tuning: splits, balanced batches, a loss on
the label token only, and a tiny MoE that learns the task."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import REPO
from moejax.data.books import BOOKS, SPLITS, balanced_batches, book_passages
from moejax.models import ModelConfig, make_model
from moejax.train import default_config, eval_step, init_state, make_optimizer, make_train_step
from moejax.train.finetune import accuracy_report, class_logits, classification_batch

PATHS = [os.path.join(REPO, path) for path in BOOKS]
LABEL_IDS = np.array([10, 20], np.int32)


def test_passages_split_each_book_by_bytes():
  sizes = [os.path.getsize(p) for p in PATHS]
  for split, (start, stop) in SPLITS.items():
    tokens, labels = book_passages(PATHS, split, length=256)
    assert tokens.shape == (len(labels), 256) and tokens.dtype == np.int32
    expected = [(int(size * stop) - int(size * start)) // 256 for size in sizes]
    assert [int(np.sum(labels == c)) for c in range(2)] == expected
  # The test passages of tiny shakespeare are its last 10%: the LM's validation text.
  tokens, labels = book_passages(PATHS, 'test', length=256)
  with open(PATHS[0], 'rb') as f:
    text = f.read()
  first = bytes((tokens[labels == 0][0] - 3).astype(np.uint8))
  assert text.index(first) == int(len(text) * 0.9)


def test_balanced_batches_have_equal_classes_and_repeat_by_seed():
  tokens = np.arange(10)[:, None]
  labels = np.array([0] * 8 + [1] * 2)
  batches = balanced_batches(tokens, labels, 4, seed=3)
  again = balanced_batches(tokens, labels, 4, seed=3)
  seen = []
  for _ in range(5):
    (rows, y), (rows2, _) = next(batches), next(again)
    assert np.sum(y == 0) == 2 and np.sum(y == 1) == 2
    np.testing.assert_array_equal(rows, rows2)
    seen.extend(rows[y == 1, 0])
  assert sorted(set(seen)) == [8, 9]
  with pytest.raises(ValueError, match='multiple'):
    next(balanced_batches(tokens, labels, 3, seed=0))


def test_accuracy_report_by_hand():
  report = accuracy_report(np.array([0, 0, 1, 0]), np.array([0, 0, 1, 1]), ('a', 'b'))
  assert report == {'accuracy': 0.75, 'a': 1.0, 'b': 0.5, 'balanced_accuracy': 0.75}


TINY = ModelConfig(vocab_size=259, num_layers=2, model_dim=32, num_heads=2, ffn_dim=64,
                   moe_every=2, num_experts=4, expert_dropout=0.4)


@pytest.fixture(scope='module')
def tiny_state():
  batch = classification_batch(np.zeros((2, 64), np.int32), np.zeros(2, np.int32), LABEL_IDS)
  train = default_config().train
  train.update(schedule='constant', learning_rate=3e-3)
  tx = make_optimizer(train)
  model = make_model(TINY)
  return model, tx, jax.jit(lambda: init_state(model, tx, batch, seed=0))()


@pytest.mark.slow
def test_the_loss_counts_the_label_token_only(tiny_state):
  model, _, state = tiny_state
  tokens, labels = book_passages(PATHS, 'validation', length=64)
  batch = classification_batch(tokens[::100], labels[::100], LABEL_IDS)
  metrics = jax.jit(functools.partial(eval_step, model=model))(state.params, batch)
  assert float(metrics['tokens']) == len(labels[::100])
  last_logits = jax.jit(functools.partial(class_logits, model=model, label_ids=np.arange(259)))(
      state.params, batch)
  expected = optax.softmax_cross_entropy_with_integer_labels(
      last_logits, LABEL_IDS[labels[::100]]).sum()
  np.testing.assert_allclose(metrics['nll_sum'], expected, rtol=1e-5)


@pytest.mark.slow
def test_a_tiny_moe_learns_which_book(tiny_state):
  model, tx, state = tiny_state
  state = jax.tree.map(jnp.copy, state)  # the step donates its input; the fixture's stays intact
  step = make_train_step(model, tx, 1e-2, 1e-3)
  batches = balanced_batches(*book_passages(PATHS, 'train', length=64), 16, seed=0)
  for _ in range(120):
    tokens, labels = next(batches)
    state, metrics = step(state, classification_batch(tokens, labels, LABEL_IDS))
  tokens, labels = book_passages(PATHS, 'validation', length=64)
  tokens, labels = tokens[::4], labels[::4]
  logits = jax.jit(functools.partial(class_logits, model=model, label_ids=LABEL_IDS))(
      state.params, classification_batch(tokens, labels, LABEL_IDS))
  report = accuracy_report(np.argmax(logits, -1), labels, ('shakespeare', 'time_machine'))
  assert report['balanced_accuracy'] > 0.8, report
