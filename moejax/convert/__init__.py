"""Published MoE checkpoints in and out of moejax (`moejax.convert.hf`). The families defined in
modules of their own are registered here, so whoever imports any of this package sees them all."""
from moejax.convert import deepseek, glm, gpt_oss, qwen3
from moejax.convert.hf import FAMILIES, from_hf, from_hf_variables, register, to_hf

register(qwen3.QWEN3_MOE)
register(gpt_oss.GPT_OSS)
register(deepseek.DEEPSEEK_V2)
register(deepseek.DEEPSEEK_V3)
register(glm.GLM4_MOE)

__all__ = ['FAMILIES', 'from_hf', 'from_hf_variables', 'to_hf']
