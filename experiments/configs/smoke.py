"""A 5-step smoke test of the whole pipeline (data, train, eval, checkpoint, sample) in seconds.

A 2-block Switch decoder of width 32 on The Time Machine (data/timemachine.txt), 32-byte examples.
"""
from moejax.train.config import default_config


def get_config():
  config = default_config()
  config.model.update(num_layers=2, model_dim=32, num_heads=2, ffn_dim=64, moe_every=2,
                      num_experts=4)
  config.data.update(source='data/timemachine.txt', length=32)
  # T5's rsqrt schedule does not depend on num_steps: a run can be extended by resuming.
  config.train.update(batch_size=8, num_steps=5, warmup_steps=2, schedule='rsqrt')
  config.eval.update(batch_size=16, every_steps=1000, max_batches=4)
  config.checkpoint.update(every_steps=2, keep=3)
  config.sample.update(num_tokens=40)
  return config
