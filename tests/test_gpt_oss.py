"""gpt-oss's MXFP4 expert weights: the dequantization by hand, and the published fixture's
(tools/make_published_fixtures.py quantizes its experts) read exactly as transformers 4.57.6's
`convert_moe_packed_tensors` dequantized them for the reference outputs."""
import os

import numpy as np

from helpers import REPO
from moejax.convert import from_hf
from moejax.convert.gpt_oss import Mxfp4Checkpoint, dequantize_mxfp4

PUBLISHED = os.path.join(REPO, 'tests', 'fixtures', 'hf', 'published', 'openai__gpt-oss-20b')


def test_a_block_is_its_codes_times_its_power_of_two():
  blocks = np.zeros((1, 1, 1, 16), np.uint8)  # one expert, one output, one block of 32 inputs
  blocks[..., :2] = [0x21, 0x0F]  # codes 1, 2 (0.5, 1.0), then 15, 0 (-6.0, 0.0)
  weight = dequantize_mxfp4(blocks, np.full((1, 1, 1), 128, np.uint8))  # times 2^(128 - 127)
  assert weight.shape == (1, 32, 1)  # [E, IN, OUT]
  np.testing.assert_array_equal(weight[0, :4, 0], [1.0, 2.0, -12.0, 0.0])
  assert not weight[0, 4:].any()


def test_the_published_experts_read_as_the_references_dequantization():
  stored = Mxfp4Checkpoint(PUBLISHED)
  assert 'model.layers.0.mlp.experts.gate_up_proj_blocks' in stored.files  # MXFP4 on disk
  _, params = from_hf(PUBLISHED)
  reference = np.load(os.path.join(PUBLISHED, 'reference.npz'))
  for layer in range(2):
    experts = params['decoder'][f'unit_{layer}']['block_0']['moe']['experts']
    hub = f'dequantized/model.layers.{layer}.mlp.experts.'
    gate_up = reference[hub + 'gate_up_proj']  # [E, D, 2F], gate and linear interleaved
    np.testing.assert_array_equal(experts['wi'], gate_up[..., 0::2])
    np.testing.assert_array_equal(experts['wi_gate'], gate_up[..., 1::2])
    np.testing.assert_array_equal(experts['wo'], reference[hub + 'down_proj'])
