"""Fine-tune a decoder LM as a text classifier, text-to-text (as T5 does): the class is the token
that follows the text.

A text x [L] of class c becomes the sequence x + [label_ids[c]], with the loss on that last token
only (`loss_weights`); the train step is the LM's own (`moejax.train.step.train_step`: aux losses,
non-finite guard, balancing biases). The prediction is the class whose label token the model finds
most likely after x.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.train.inputs import Batch
from moejax.train.step import forward


def classification_batch(tokens: np.ndarray, labels: np.ndarray, label_ids: np.ndarray) -> Batch:
  """tokens [B, L], labels [B] (class indices) -> an LM batch of length L + 1 whose only loss
  target is the label token."""
  targets = np.concatenate([tokens, label_ids[labels][:, None]], axis=1)  # Shape: [B, L + 1]
  loss_weights = np.zeros(targets.shape, np.float32)
  loss_weights[:, -1] = 1.0
  return {'targets': targets.astype(np.int32), 'weights': np.ones(targets.shape, np.float32),
          'loss_weights': loss_weights}


def class_logits(params, batch: Batch, balancing_bias_state=None, *, model,
                 label_ids: jax.Array) -> jax.Array:
  """[B, C]: the logits of each class's label token after the text (eval mode)."""
  logits, _, _ = forward(model, params, batch, True, bias_state=balancing_bias_state)
  return logits[:, -1, jnp.asarray(label_ids)]  # Shape: [B, C]


def accuracy_report(predicted: np.ndarray, labels: np.ndarray,
                    names: tuple[str, ...]) -> dict[str, float]:
  """Overall accuracy, accuracy on each class (its recall), and their mean (balanced accuracy)."""
  per_class = {name: float(np.mean(predicted[labels == c] == c)) for c, name in enumerate(names)}
  return {'accuracy': float(np.mean(predicted == labels)), **per_class,
          'balanced_accuracy': float(np.mean(list(per_class.values())))}
