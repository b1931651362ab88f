"""CLIP ViT-H/14 image encoder: the visual tower of the official XLM-RoBERTa CLIP, as the
InfiniteTalk pipeline uses it (preprocessing + the first 31 of 32 transformer blocks).

What it computes (official `CLIPModel.visual` + `VisionTransformer(use_31_block=True)`):
  image [B, 3, H, W] (or a batch of videos [B, 3, F, H, W]) in [-1, 1]
  -> bicubic resize to image_size x image_size (align_corners=False, no antialias, no clamp)
  -> x * 0.5 + 0.5 -> (x - CLIP mean) / CLIP std
  -> 14x14 patch convolution without bias, class token first, learned positions added
  -> pre LayerNorm -> the first `num_used_layers` pre-norm blocks -> [B, 257, 1280].
There is no post norm, pooling or projection in that path.

Why our own module and not transformers' `CLIPVisionModel`: the official file stores the
attention as one fused `to_qkv` tensor (HF wants separate q/k/v, so loading would have to split
tensors on the fly instead of copying them one by one), calls the embedding norm `pre_norm`,
keeps the class token as [1, 1, dim] and the positions as a raw parameter, and the pipeline
stops one block before the end. A small module with the official key names loads the file
strictly, tensor by tensor, with no conversion table, and builds only the blocks it runs.
Parameter names are the official ones without the `visual.` prefix; the loader
(`infinitetalk.weights.clip_loader`) strips it and skips the unused last block, `post_norm`
and `head` of the file.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    """Sizes of the vision transformer. Defaults: the ViT-H/14 of the official release.

    `num_layers` is how many blocks the file holds (32); `num_used_layers` how many run
    (the pipeline's `use_31_block=True`: all but the last). Only the used blocks are built.
    """

    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    mlp_ratio: float = 4.0
    num_heads: int = 16
    num_layers: int = 32
    num_used_layers: int = 31
    norm_eps: float = 1e-5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.dim % self.num_heads:
            raise ValueError(f"CLIP dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"CLIP image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if not 0 < self.num_used_layers <= self.num_layers:
            raise ValueError(f"CLIP num_used_layers must be in 1..{self.num_layers}, got {self.num_used_layers}")

    @property
    def num_tokens(self) -> int:
        """Class token + patches (257 for ViT-H/14 at 224)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def mlp_dim(self) -> int:
        return round(self.dim * self.mlp_ratio)

    @classmethod
    def vit_h_14(cls) -> "CLIPVisionConfig":
        """The visual tower of open-clip-xlm-roberta-large-vit-huge-14 (632M parameters)."""
        return cls()

    @classmethod
    def tiny(cls) -> "CLIPVisionConfig":
        """A few-kB model with the same structure, for tests and `--model tiny`."""
        return cls(image_size=28, patch_size=14, dim=64, num_heads=4, num_layers=3, num_used_layers=2)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], num_heads: Optional[int] = None, **overrides) -> "CLIPVisionConfig":
        """Read the sizes from the tensor shapes of an official `visual.*` state dict.

        `shapes` maps keys (with or without the `visual.` prefix) to shapes. The head count is
        not visible in the shapes: pass it, or it defaults to dim // 80 (the ViT-H/14 head width).
        The used block count defaults to all blocks but the last, as in the pipeline.
        """
        s = {k[len("visual."):] if k.startswith("visual.") else k: tuple(v) for k, v in shapes.items()}
        try:
            dim = s["pos_embedding"][-1]
            num_tokens = s["pos_embedding"][1]
            patch = s["patch_embedding.weight"][-1]
            mlp = s["transformer.0.mlp.0.weight"][0]
        except KeyError as exc:
            raise ValueError(f"not a CLIP visual state dict: key {exc} is absent") from exc
        layers = 1 + max(int(k.split(".")[1]) for k in s if k.startswith("transformer."))
        grid = math.isqrt(num_tokens - 1)
        values = dict(
            image_size=grid * patch,
            patch_size=patch,
            dim=dim,
            mlp_ratio=mlp / dim,
            num_heads=num_heads or max(1, dim // 80),
            num_layers=layers,
            num_used_layers=max(1, layers - 1),
        )
        values.update(overrides)
        return cls(**values)


class FloatLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (the official CLIP LayerNorm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).type_as(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection read as [3, heads, head_dim]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.to_qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, c = x.shape
        qkv = self.to_qkv(x).view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [b, heads, s, head_dim]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, s, c))


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)) with exact GELU."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.norm1 = FloatLayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg.dim, cfg.num_heads)
        self.norm2 = FloatLayerNorm(cfg.dim, eps=cfg.norm_eps)
        # indices 0 and 2 are the official `mlp.0` / `mlp.2` keys
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, cfg.mlp_dim), nn.GELU(), nn.Linear(cfg.mlp_dim, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionEncoder(nn.Module):
    """The CLIP visual tower as the pipeline runs it; `forward(image) -> [B*F, tokens, dim]`.

    Parameter names: `patch_embedding.weight`, `cls_embedding`, `pos_embedding`,
    `pre_norm.*`, `transformer.N.{norm1,attn.to_qkv,attn.proj,norm2,mlp.0,mlp.2}.*` for
    N < num_used_layers (official names minus `visual.`).
    """

    def __init__(self, cfg: CLIPVisionConfig = CLIPVisionConfig()):
        super().__init__()
        self.config = cfg
        self.patch_embedding = nn.Conv2d(3, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.cls_embedding = nn.Parameter(torch.empty(1, 1, cfg.dim))
        self.pos_embedding = nn.Parameter(torch.empty(1, cfg.num_tokens, cfg.dim))
        self.pre_norm = FloatLayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.transformer = nn.ModuleList(AttentionBlock(cfg) for _ in range(cfg.num_used_layers))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] or [B, 3, F, H, W] in [-1, 1] -> normalised [B*F, 3, S, S] float32.

        Bicubic resize (align_corners=False, no antialias, overshoot kept), x*0.5+0.5, CLIP
        mean/std: exactly the official `CLIPModel.visual` preprocessing. Frames of a video
        become separate images, in (batch, frame) order.
        """
        if images.ndim == 5:
            images = images.transpose(1, 2).flatten(0, 1)  # [B, 3, F, H, W] -> [B*F, 3, H, W]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP expects images [B, 3, H, W] or [B, 3, F, H, W], got {tuple(images.shape)}")
        size = (self.config.image_size, self.config.image_size)
        x = F.interpolate(images.float(), size=size, mode="bicubic", align_corners=False)
        x = x * 0.5 + 0.5
        mean = torch.tensor(self.config.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed [N, 3, S, S] -> output of the used blocks [N, tokens, dim]."""
        x = pixels.to(self.patch_embedding.weight.dtype)
        x = self.patch_embedding(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.pre_norm(x + self.pos_embedding.to(x.dtype))
        for block in self.transformer:
            x = block(x)
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_pixels(self.preprocess(images))
