"""The default `make run`: a Switch decoder on tiny shakespeare, characters (bytes), 2-core CPU.

4 blocks of width 128, 4 heads, every other FFN sparse with 8 top-1 experts of width 512
(capacity factor 1.25 in training, 2.0 in evaluation), bfloat16 compute (float32 params and
router), AdamW with a cosine schedule,
600 steps of 32 x 128 tokens. Its FLOP-matched dense twin:
  moejax train --config experiments/configs/switch_tiny.py --config.model.dense_baseline=True
"""
from moejax.train.config import default_config


def get_config():
  config = default_config()
  config.model.update(kind='decoder', num_layers=4, model_dim=128, num_heads=4, ffn_dim=512,
                      moe_every=2, num_experts=8, num_selected_experts=1, dtype='bfloat16')
  config.data.update(source='data/tinyshakespeare.txt', length=128)
  config.train.update(batch_size=32, num_steps=600, learning_rate=3e-3, warmup_steps=50)
  config.eval.update(batch_size=64, every_steps=200)
  config.checkpoint.update(every_steps=200, keep=2)
  return config
