"""Published MoE checkpoints in and out of moejax (`moejax.convert.hf`)."""
from moejax.convert.hf import FAMILIES, from_hf, to_hf

__all__ = ['FAMILIES', 'from_hf', 'to_hf']
