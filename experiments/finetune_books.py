"""Fine-tune a trained LM to tell which book a 256-character passage is from (tiny shakespeare vs
The Time Machine), with expert dropout; report held-out accuracy.

  python experiments/finetune_books.py --init runs/upcycle/upcycled [--expert_dropout 0.4]

Data: `moejax.data.books` (train / validation / test = 80 / 10 / 10% of each book, by bytes;
balanced training batches). The classifier is the LM itself, text-to-text: the passage followed
by the label token 'S' or 'T' (`moejax.train.finetune`). Starts from the latest checkpoint of
--init with a fresh AdamW (warmup, cosine decay); Switch's fine-tuning recipe sets expert dropout
(0.4) above the dropout elsewhere (0.1). Writes <out>/results.json.
"""
import argparse
import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from moejax.data.books import BOOKS, balanced_batches, book_passages
from moejax.data.tokenizers import ByteTokenizer
from moejax.models import make_model
from moejax.train import make_optimizer, make_train_step, saved_config
from moejax.train.resume import load
from moejax.train.finetune import accuracy_report, class_logits, classification_batch

NAMES = ('shakespeare', 'time_machine')
LABEL_IDS = ByteTokenizer().encode('ST')  # the label tokens, one per book


def predict(logits_fn, params, bias_state, tokens, batch_size=64) -> np.ndarray:
  """Predicted class [N] of every passage."""
  out = []
  for i in range(0, len(tokens), batch_size):
    rows = tokens[i:i + batch_size]
    batch = classification_batch(rows, np.zeros(len(rows), np.int32), LABEL_IDS)
    out.append(np.argmax(logits_fn(params, batch, bias_state), axis=-1))
  return np.concatenate(out)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--init', required=True, help='a trained run directory')
  parser.add_argument('--expert_dropout', type=float, default=0.4)
  parser.add_argument('--dropout', type=float, default=0.1, help='dropout outside the experts')
  parser.add_argument('--steps', type=int, default=200)
  parser.add_argument('--batch_size', type=int, default=32)
  parser.add_argument('--learning_rate', type=float, default=1e-3)
  parser.add_argument('--length', type=int, default=256, help='passage length in characters')
  parser.add_argument('--eval_every', type=int, default=50)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default='runs/finetune_books')
  args = parser.parse_args()

  config = saved_config(args.init)
  if config.data.tokenizer != 'bytes':
    raise SystemExit(f'{args.init} uses the {config.data.tokenizer!r} tokenizer; the passages and '
                     'the label tokens here are bytes')
  run, state = load(config, args.init)
  model_config = dataclasses.replace(run.model_config, expert_dropout=args.expert_dropout,
                                     dropout_rate=args.dropout)
  model = make_model(model_config)
  train = config.train.copy_and_resolve_references()
  train.update(learning_rate=args.learning_rate, num_steps=args.steps,
               warmup_steps=args.steps // 10, schedule='cosine')
  tx = make_optimizer(train)
  zero = lambda: jnp.zeros((), jnp.int32)  # a buffer each: the train step donates the state
  state = state.replace(step=zero(), opt_state=tx.init(state.params), nonfinite_in_a_row=zero(),
                        nonfinite_total=zero())
  train_step = make_train_step(model, tx, train.load_balancing_loss_coef,
                               train.router_z_loss_coef)
  logits_fn = jax.jit(functools.partial(class_logits, model=model, label_ids=LABEL_IDS))

  splits = {split: book_passages(BOOKS, split, args.length)
            for split in ('train', 'validation', 'test')}
  for split, (tokens, labels) in splits.items():
    print(f'{split}: ' + ', '.join(f'{np.sum(labels == c)} {name}'
                                   for c, name in enumerate(NAMES)) + ' passages')

  def evaluate(split):
    tokens, labels = splits[split]
    return accuracy_report(predict(logits_fn, state.params, state.balancing_bias_state, tokens),
                           labels, NAMES)

  history = [{'step': 0, 'validation': evaluate('validation')}]
  batches = balanced_batches(*splits['train'], args.batch_size, args.seed)
  progress = tqdm(range(args.steps), desc='finetune')
  for step in progress:
    tokens, labels = next(batches)
    state, metrics = train_step(state, classification_batch(tokens, labels, LABEL_IDS))
    progress.set_postfix(loss=f'{float(metrics["loss"]):.4f}')
    if (step + 1) % args.eval_every == 0:
      history.append({'step': step + 1, 'train_loss': float(metrics['loss']),
                      'validation': evaluate('validation')})
      progress.write(f'step {step + 1}: validation balanced accuracy '
                     f'{history[-1]["validation"]["balanced_accuracy"]:.4f}')
  test = evaluate('test')
  print(f'test ({len(splits["test"][1])} passages): ' + ', '.join(
      f'{name} {value:.4f}' for name, value in test.items()))
  os.makedirs(args.out, exist_ok=True)
  results = {'settings': vars(args), 'history': history, 'test': test,
             'nonfinite_total': int(state.nonfinite_total)}
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
