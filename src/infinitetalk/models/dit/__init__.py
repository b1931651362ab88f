"""The InfiniteTalk DiT: the Wan2.1-I2V-14B transformer with the InfiniteTalk audio adapter.

`InfiniteTalkDiT` has the parameter names and shapes of the official checkpoint (the Wan2.1-I2V
shards plus `infinitetalk.safetensors`), so the official files load strictly. Every size comes
from `WanDiTConfig`: `WanDiTConfig.infinitetalk_14b()` is the released model (18,882,046,784
parameters), `WanDiTConfig.tiny()` a small model of the same code for tests.

Numerics follow the official `WanModel` (wan/modules/multitalk_model.py): float32 is the parity
contract; in bfloat16 the time embedding, modulation, gated residuals, LayerNorms and the output
head run in float32 as the official autocast regions do, and the output is float32.

Faster kernels are explicit options of the model (constructor keywords, or the same attributes
set by `infinitetalk.runtime.fast.make_fast`): `attention`, `rope_table`, `routing_map` and
`sdpa_backends`. What stays fixed within a window (text/CLIP keys and values, audio keys and
values of every block) can be computed once with `precompute_conditions` and passed to
`forward(..., conditions=...)` at every step.
"""
from .blocks import (
    Head,
    MLPProj,
    WanAttentionBlock,
    WanI2VCrossAttention,
    WanLayerNorm,
    WanRMSNorm,
    WanSelfAttention,
    sinusoidal_embedding,
)
from .config import CLIP_TOKENS, WanDiTConfig
from .model import DiTConditions, InfiniteTalkDiT, count_parameters

__all__ = [
    "CLIP_TOKENS",
    "DiTConditions",
    "Head",
    "InfiniteTalkDiT",
    "MLPProj",
    "WanAttentionBlock",
    "WanDiTConfig",
    "WanI2VCrossAttention",
    "WanLayerNorm",
    "WanRMSNorm",
    "WanSelfAttention",
    "count_parameters",
    "sinusoidal_embedding",
]
