"""Sparse upcycling on tiny shakespeare (experiments/upcycle.py runs all three models).

The MoE: the switch_tiny decoder (4 blocks of width 128, blocks 2 and 4 sparse, 8 experts of width
512) with top-2 routing and combine weights renormalized to sum to 1, so that an upcycled model
(every expert a copy of the dense FFN) starts out computing exactly what the dense model computed.
Its dense source: the same config with `model.dense_baseline=True, model.num_selected_experts=1`
(FFN width 512). Upcycling: `--config.upcycle.from_workdir=<the dense run>
--config.upcycle.step=300`. 600 steps of 32 x 128 tokens, validation every 50 steps.
"""
from moejax.train.config import default_config


def get_config():
  config = default_config()
  config.model.update(kind='decoder', num_layers=4, model_dim=128, num_heads=4, ffn_dim=512,
                      moe_every=2, num_experts=8, num_selected_experts=2, normalize_weights=True,
                      dtype='bfloat16')
  config.data.update(source='data/tinyshakespeare.txt', length=128)
  config.train.update(batch_size=32, num_steps=600, learning_rate=3e-3, warmup_steps=50)
  config.eval.update(batch_size=64, every_steps=50)
  config.checkpoint.update(every_steps=100, keep=10)
  return config
