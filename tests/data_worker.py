"""One process of the data pipeline alone; prints what it read as JSON.

  python tests/data_worker.py --workdir W --data-dir D                       # the reference
  python tests/data_worker.py --workdir W --data-dir D --num-processes 2 --process-id I --port P

Each process trains (process 0) or reads (the others) the SentencePiece vocabulary and the
split's tokens in the shared work directory, then reads its rows of training batches 0..4 twice:
uninterrupted, and resumed at batch 3 from the iterator state saved there.
"""
import argparse
import hashlib
import itertools
import json
import os
import sys

RESUME_AT, BATCHES, BATCH_SIZE = 3, 5, 8


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--data-dir', required=True)
  parser.add_argument('--num-processes', type=int, default=1)
  parser.add_argument('--process-id', type=int, default=0)
  parser.add_argument('--port', type=int, default=0)
  args = parser.parse_args()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from xla_flags import xla_flags
  os.environ['XLA_FLAGS'] = xla_flags(1)
  os.environ['JAX_PLATFORMS'] = 'cpu'

  from helpers import smoke_config
  from moejax import data, distributed, sharding

  if args.num_processes > 1:
    distributed.initialize(f'127.0.0.1:{args.port}', args.num_processes, args.process_id)
  os.makedirs(args.workdir, exist_ok=True)
  config = smoke_config(args.data_dir)
  config.data.update(tokenizer='sentencepiece', spm_vocab_size=300)
  tokenizer = data.tokenizer_for(config.data, args.workdir)
  tokens = data.split_tokens(config.data, 'train', tokenizer,
                             os.path.join(args.workdir, 'tokens')).tokens
  rows = sharding.process_rows(sharding.make_mesh(data=args.num_processes), BATCH_SIZE)

  def batches(state=None):
    return data.train_batches(tokens, config.data, 'lm', tokenizer, BATCH_SIZE,
                              config.seed, rows, state)

  uninterrupted = [b['targets'].tolist() for b in itertools.islice(batches(), BATCHES)]
  first = batches()
  for _ in range(RESUME_AT):
    next(first)
  state = first.get_state()
  resumed = [b['targets'].tolist() for b in itertools.islice(batches(state), BATCHES - RESUME_AT)]
  print(json.dumps({'rows': [rows.start, rows.stop], 'state': state,
                    'vocabulary': hashlib.sha256(tokenizer.model_proto).hexdigest(),
                    'uninterrupted': uninterrupted, 'resumed': resumed}))


if __name__ == '__main__':
  main()
