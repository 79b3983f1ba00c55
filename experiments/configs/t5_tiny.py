"""A Switch-style T5 encoder-decoder trained with span corruption on tiny shakespeare (bytes).

2 + 2 blocks of width 128, every other FFN sparse (8 top-1 experts; the encoder routes
non-causally, the decoder causally), T5 relative position bias, Adafactor with T5's inverse square
root schedule. Span corruption: 15% noise in spans of mean length 3, sentinels at the top ids.
"""
from moejax.train.config import default_config


def get_config():
  config = default_config()
  config.task = 'span_corruption'
  config.model.update(kind='encoder_decoder', num_layers=2, model_dim=128, num_heads=4,
                      ffn_dim=512, moe_every=2, num_experts=8, dtype='bfloat16')
  config.data.update(source='data/tinyshakespeare.txt', length=128)
  config.train.update(batch_size=32, num_steps=400, optimizer='adafactor', schedule='rsqrt',
                      learning_rate=1e-2, warmup_steps=100, weight_decay=0.0)
  config.eval.update(batch_size=64, every_steps=200, max_batches=8)
  config.checkpoint.update(every_steps=200, keep=2)
  config.sample.update(prompt='ROMEO:\nBut soft, what light through <X> window breaks?',
                       num_tokens=40, temperature=0.0)
  return config
