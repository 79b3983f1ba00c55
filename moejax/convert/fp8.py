"""FP8 checkpoints with a scale per block (DeepSeek-V3, -R1, Kimi-K2): each quantized Linear
weight W [out, in] is float8 e4m3 with a float32 `<name>_scale_inv` [ceil(out / b0), ceil(in / b1)]
beside it, config.json's `quantization_config.weight_block_size` [b0, b1] (128 x 128); the real
weight is W * scale_inv, each scale over its block (the last blocks of a row or column may be
partial). The import dequantizes into float32: exact, since an e4m3 value times a float32 scale
rounds once, the same in NumPy as in torch."""
from __future__ import annotations

import json
import os

import numpy as np

from moejax.convert.safetensors import Checkpoint
from moejax.errors import InputError

SCALE_SUFFIX = '_scale_inv'


def block_size(hf: dict) -> tuple[int, int] | None:
  """[b0, b1] of a config.json's FP8 `quantization_config`; None when its weights are not FP8.
  InputError for another quantization than block-scaled e4m3."""
  quantization = hf.get('quantization_config')
  if quantization is None:
    return None
  if quantization.get('quant_method') != 'fp8' or quantization.get('fmt', 'e4m3') != 'e4m3':
    raise InputError(f'{hf["model_type"]} checkpoint: quantization_config={quantization!r} is not '
                     "supported (only quant_method 'fp8' with fmt 'e4m3')")
  rows, columns = quantization.get('weight_block_size', (128, 128))
  return int(rows), int(columns)


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
  """weight [out, in] (float8 e4m3) times its block scales scale_inv [ceil(out / b0),
  ceil(in / b1)] -> float32 [out, in]."""
  rows, columns = weight.shape
  if scale_inv.shape != (-(-rows // block[0]), -(-columns // block[1])):
    raise InputError(f'an FP8 weight [{rows}, {columns}] has scales {list(scale_inv.shape)}, not '
                     f'one per {block[0]} x {block[1]} block')
  scales = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)
  return weight.astype(np.float32) * scales[:rows, :columns]  # Shape: [out, in]


class Fp8Checkpoint:
  """A hub directory's tensors (`Checkpoint`) with its FP8 weights dequantized when read: what
  a family whose checkpoints may be FP8 opens (`Family.open`)."""

  def __init__(self, directory: str):
    with open(os.path.join(directory, 'config.json')) as f:
      self.block = block_size(json.load(f))
    self.checkpoint = Checkpoint(directory)

  def __contains__(self, name: str) -> bool:
    return name in self.checkpoint

  def names(self) -> list[str]:
    """The tensors' names, the scales' left out (each dequantizes its weight)."""
    return [name for name in self.checkpoint.names() if not name.endswith(SCALE_SUFFIX)]

  def tensor(self, name: str) -> np.ndarray:
    tensor = self.checkpoint.tensor(name)
    if self.block is None or name + SCALE_SUFFIX not in self.checkpoint:
      return tensor
    return dequantize(tensor, self.checkpoint.tensor(name + SCALE_SUFFIX), self.block)
