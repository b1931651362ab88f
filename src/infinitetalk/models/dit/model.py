"""`InfiniteTalkDiT`: the whole transformer (embeddings, blocks, head) and its per-window conditions."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...errors import InternalError
from ..attention import (
    AttentionFn,
    PreferredSdpa,
    RopeTableFn,
    RoutingMapFn,
    reference_attention_map,
    rope_table_3d,
    sdpa_attention,
)
from ..audio_adapter import AudioProjModel, select_audio_windows
from .blocks import Head, MLPProj, WanAttentionBlock, linear_f32, sinusoidal_embedding
from .config import CLIP_TOKENS, WanDiTConfig


@dataclass
class DiTConditions:
    """Per-window inputs of every block, computed once by `InfiniteTalkDiT.precompute_conditions`.

    context_kv[i]: block i's text/CLIP (k, v, k_img, v_img), each [B, Lc, H, D];
    audio_kv[i]: block i's audio (k, v), each [B*T, speakers*context_tokens, H, D] (keys already
    rotated for two speakers), or None: then `audio_tokens` [B, T, speakers*context_tokens,
    audio_dim] are kept and each forward computes the audio keys and values (compute instead
    of the memory the audio keys and values would hold for the window).
    They depend on the prompt, the CLIP features and the audio only, never on the noisy latent
    or the timestep, so all sampling steps of a window share them.
    """

    batch: int
    speakers: int
    frames: int
    context_kv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    audio_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    audio_tokens: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every cached tensor (keys, values, audio tokens)."""
        tensors = [t for kv in (*self.context_kv, *(self.audio_kv or ())) for t in kv]
        if self.audio_tokens is not None:
            tensors.append(self.audio_tokens)
        return tensors

    def nbytes(self) -> int:
        """Device memory held by the cached tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class InfiniteTalkDiT(nn.Module):
    """Wan2.1-I2V DiT with the InfiniteTalk audio adapter (official parameter names).

    Kernel options (explicit, so faster kernels are chosen without patching; defaults are the
    reference path that matches the official model):
    * `attention` (q, k, v [B, L, H, D] -> out), default `sdpa_attention`;
    * `self_attention`: the video self-attention only (None: `attention`), e.g. the fp8
      `runtime.fp8_attention.CudnnFp8Attention` while the small cross-attentions stay bf16;
    * `rope_table` ((f, h, w), head_dim, device -> table), default the float64 complex
      `rope_table_3d`; `attention.RopeCache()` gives cached float32 (cos, sin) tables;
    * `routing_map` (two speakers), default `reference_attention_map`; `sdpa_attention_map`
      is the fused equivalent;
    * `sdpa_backends` (a `PreferredSdpa` or None): the SDPA backend priority applied around
      the whole forward (outside any compiled region).
    * `ffn_chunks` (int, default 1): run each block's FFN on that many token chunks (exact;
      lowers the peak memory of a forward by the FFN's hidden activations).
    """

    def __init__(
        self,
        config: WanDiTConfig,
        *,
        attention: AttentionFn = sdpa_attention,
        rope_table: RopeTableFn = rope_table_3d,
        routing_map: RoutingMapFn = reference_attention_map,
        sdpa_backends: PreferredSdpa | None = None,
        self_attention: AttentionFn | None = None,
    ):
        super().__init__()
        cfg = config
        self.config = cfg
        self.attention = attention
        self.self_attention = self_attention
        self.ffn_chunks = 1
        self.rope_table = rope_table
        self.routing_map = routing_map
        self.sdpa_backends = sdpa_backends
        dim = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([WanAttentionBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(dim, cfg.out_dim, cfg.patch_size, cfg.eps)
        self.img_emb = MLPProj(cfg.clip_dim, dim)
        self.audio_proj = AudioProjModel(
            audio_window=cfg.audio_window,
            vae_scale=cfg.vae_scale,
            audio_layers=cfg.audio_layers,
            audio_channels=cfg.audio_channels,
            intermediate_dim=cfg.intermediate_dim,
            output_dim=cfg.output_dim,
            context_tokens=cfg.context_tokens,
            norm_output_audio=cfg.norm_output_audio,
        )

    # ---- input preparation -----------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def _time_embedding(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """t [B] -> e [B, dim] and e0 [B, 6, dim], both float32."""
        sin = sinusoidal_embedding(self.config.freq_dim, t.to(self.device)).float()
        l1, l2 = self.time_embedding[0], self.time_embedding[2]
        e = linear_f32(l2, F.silu(linear_f32(l1, sin)))
        e0 = linear_f32(self.time_projection[1], F.silu(e))
        return e, e0.unflatten(1, (6, self.config.dim))

    def _text_context(self, context: torch.Tensor | Sequence[torch.Tensor], batch: int) -> torch.Tensor:
        """Zero-pad each prompt embedding to text_len rows, then embed: [B, text_len, dim]."""
        cfg = self.config
        items = list(context.unbind(0)) if isinstance(context, torch.Tensor) else list(context)
        if len(items) != batch:
            raise InternalError(f"context holds {len(items)} prompt embeddings but the batch has {batch} samples.")
        padded = []
        for u in items:
            if u.dim() != 2 or u.shape[1] != cfg.text_dim:
                raise InternalError(f"Each prompt embedding must be [length, {cfg.text_dim}]; got {tuple(u.shape)}.")
            if u.shape[0] > cfg.text_len:
                raise InternalError(
                    f"A prompt embedding has {u.shape[0]} tokens but the model takes at most {cfg.text_len}."
                )
            u = u.to(device=self.device, dtype=self.dtype)
            padded.append(torch.cat([u, u.new_zeros(cfg.text_len - u.shape[0], u.shape[1])]))
        return self.text_embedding(torch.stack(padded))

    def _audio_tokens(self, audio: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, int]:
        """audio [B, N, 1 + vae_scale (T-1), window, layers, channels] -> ([B, T, N*tokens, width], N)."""
        cfg = self.config
        want = (cfg.audio_window, cfg.audio_layers, cfg.audio_channels)
        video_frames = 1 + cfg.vae_scale * (frames - 1)
        if audio.dim() != 6 or tuple(audio.shape[3:]) != want or audio.shape[2] != video_frames or audio.shape[0] != batch:
            raise InternalError(
                f"audio must be [{batch}, speakers, {video_frames}, {want[0]}, {want[1]}, {want[2]}] for "
                f"{frames} latent frames; got {tuple(audio.shape)}."
            )
        speakers = audio.shape[1]
        if speakers not in (1, 2):
            raise InternalError(f"InfiniteTalk takes one or two speakers; audio has {speakers}.")
        audio = audio.to(device=self.device, dtype=self.dtype).flatten(0, 1)
        first, later = select_audio_windows(audio, cfg.audio_window, cfg.vae_scale)
        tokens = self.audio_proj(first, later)  # [B*N, T, ctx, width]
        tokens = tokens.unflatten(0, (batch, speakers)).transpose(1, 2).flatten(2, 3)
        return tokens.to(self.dtype), speakers

    def _token_masks(self, masks: torch.Tensor, batch: int, rows: int, cols: int) -> torch.Tensor:
        """[3, H, W] or [B, 3, H, W] region masks -> token-level 0/1 masks [B or 1, 3, rows*cols]."""
        if masks.dim() == 3:
            masks = masks.unsqueeze(0)
        if masks.dim() != 4 or masks.shape[0] not in (1, batch):
            raise InternalError(f"ref_target_masks must be [3, H, W] or [{batch}, 3, H, W]; got {tuple(masks.shape)}.")
        small = F.interpolate(masks.to(device=self.device, dtype=torch.float32), size=(rows, cols), mode="nearest")
        return (small > 0).flatten(2).to(self.dtype)

    def _context_tokens(self, context: torch.Tensor | Sequence[torch.Tensor], clip_fea: torch.Tensor, batch: int) -> torch.Tensor:
        """CLIP image tokens then text tokens, embedded: [B, 257 + text_len, dim]."""
        cfg = self.config
        if clip_fea.dim() != 3 or clip_fea.shape[1:] != (CLIP_TOKENS, cfg.clip_dim) or clip_fea.shape[0] not in (1, batch):
            raise InternalError(f"clip_fea must be [{batch}, {CLIP_TOKENS}, {cfg.clip_dim}]; got {tuple(clip_fea.shape)}.")
        img = self.img_emb(clip_fea.to(device=self.device, dtype=self.dtype)).expand(batch, -1, -1)
        return torch.cat([img, self._text_context(context, batch)], dim=1).to(self.dtype)

    def _batch_of(self, context: torch.Tensor | Sequence[torch.Tensor]) -> int:
        return context.shape[0] if isinstance(context, torch.Tensor) else len(context)

    @torch.no_grad()
    def precompute_conditions(
        self,
        context: torch.Tensor | Sequence[torch.Tensor],
        clip_fea: torch.Tensor,
        audio: torch.Tensor,
        *,
        audio_kv: bool = True,
        reuse_context_kv: DiTConditions | None = None,
    ) -> DiTConditions:
        """Every block's text/CLIP and audio keys and values for a batch of B condition sets.

        Inputs as in `forward` (B = len(context)). The result replaces context, clip_fea and
        audio in `forward(x, t, y=y, conditions=...)` for every step of the window. It holds
        (257 + text_len) * 2 * dim values per block and sample for text/CLIP plus, with
        `audio_kv`, T * speakers * context_tokens * 2 * dim for the audio; without `audio_kv` only the audio tokens are kept and
        every forward computes the audio keys and values. `reuse_context_kv`: conditions made
        from the same prompt and CLIP features, whose text/CLIP keys and values are shared
        (not copied) instead of computed again.
        """
        batch = self._batch_of(context)
        if audio.dim() < 3:
            raise InternalError(f"audio must be [B, speakers, frames, ...]; got {tuple(audio.shape)}.")
        frames = (audio.shape[2] - 1) // self.config.vae_scale + 1
        with self._kernel_context():
            if reuse_context_kv is not None:
                if reuse_context_kv.batch != batch:
                    raise InternalError(f"reuse_context_kv holds {reuse_context_kv.batch} samples, not {batch}.")
                context_kv = reuse_context_kv.context_kv
            else:
                context_tokens = self._context_tokens(context, clip_fea, batch)
                context_kv = [block.cross_attn.context_kv(context_tokens) for block in self.blocks]
            audio_tokens, speakers = self._audio_tokens(audio, batch, frames)
            if not audio_kv:
                return DiTConditions(batch, speakers, frames, context_kv, None, audio_tokens)
            kv = [block.audio_cross_attn.audio_kv(audio_tokens, speakers == 2) for block in self.blocks]
        return DiTConditions(batch, speakers, frames, context_kv, kv)

    def _kernel_context(self):
        return self.sdpa_backends.context() if self.sdpa_backends is not None else contextlib.nullcontext()

    # ---- forward ---------------------------------------------------------------------------

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: torch.Tensor | Sequence[torch.Tensor] | None = None,
        clip_fea: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        ref_target_masks: torch.Tensor | None = None,
        *,
        conditions: DiTConditions | None = None,
        block_cache: Any = None,
    ) -> torch.Tensor:
        """Predict the flow for a batch of latent windows; returns float32 [B, out_dim, T, H, W].

        x [B, 16, T, H, W] noisy latents; t [B] or [1] timesteps; context: B prompt embeddings
        [L_i, text_dim] (list) or [B, L, text_dim]; clip_fea [B or 1, 257, clip_dim]; y
        [B, in_dim - 16, T, H, W] mask + image-latent conditioning; audio
        [B, N, 1 + 4(T-1), audio_window, audio_layers, audio_channels] with N = 1 or 2 speakers;
        ref_target_masks [3, H, W] (or [B, 3, H, W]) person-1 / person-2 / background masks,
        needed only when N == 2 (it is ignored for one speaker).
        `conditions` (from `precompute_conditions`) replaces context, clip_fea and audio.
        `block_cache` (TeaCache): an object with attributes `reuse` (bool) and `residual`
        (tensor or None). When `reuse` is true the transformer blocks are skipped and the
        embedded tokens plus `residual` go to the head; otherwise the blocks run and
        `residual` is set to (tokens after the blocks - tokens before them). The caller owns
        the object (one per guidance branch), so no state is kept on the model.
        """
        with self._kernel_context():
            return self._forward(x, t, context, clip_fea, y, audio, ref_target_masks, conditions, block_cache)

    def time_modulation(self, t: torch.Tensor) -> torch.Tensor:
        """e0 [B, 6, dim] float32 for timesteps t: the signal TeaCache compares between steps."""
        return self._time_embedding(torch.as_tensor(t, device=self.device).reshape(-1))[1]

    def _forward(self, x, t, context, clip_fea, y, audio, ref_target_masks, conditions, block_cache=None) -> torch.Tensor:
        cfg = self.config
        if y is None:
            raise InternalError("y (mask + image-latent conditioning) is required.")
        if x.dim() != 5 or y.dim() != 5 or x.shape[0] != y.shape[0] or x.shape[2:] != y.shape[2:]:
            raise InternalError(f"x and y must be [B, C, T, H, W] with equal B, T, H, W; got {tuple(x.shape)} and {tuple(y.shape)}.")
        if x.shape[1] + y.shape[1] != cfg.in_dim:
            raise InternalError(f"x and y together must have {cfg.in_dim} channels; got {x.shape[1]} + {y.shape[1]}.")
        batch, _, frames, height, width = x.shape
        pt, ph, pw = cfg.patch_size
        if frames % pt or height % ph or width % pw:
            raise InternalError(f"Latent size {frames}x{height}x{width} is not divisible by the patch size {cfg.patch_size}.")
        grid = (frames // pt, height // ph, width // pw)

        # embeddings
        inp = torch.cat([x, y], dim=1).to(device=self.device, dtype=self.dtype)
        # [B, L, dim], made contiguous: the transposed view of the convolution output would make
        # every block's residual stream channel-major (element-wise ops keep their input's layout),
        # so each norm and gated residual would read across rows
        tokens = self.patch_embedding(inp).flatten(2).transpose(1, 2).contiguous()

        t = torch.as_tensor(t, device=self.device).reshape(-1)
        if t.numel() not in (1, batch):
            raise InternalError(f"t must hold 1 or {batch} timesteps; got {t.numel()}.")
        e, e0 = self._time_embedding(t)

        if conditions is None:
            if context is None or clip_fea is None or audio is None:
                raise InternalError("forward needs context, clip_fea and audio, or precomputed conditions.")
            context_tokens = self._context_tokens(context, clip_fea, batch)
            audio_tokens, speakers = self._audio_tokens(audio, batch, grid[0])
        else:
            if conditions.batch != batch or conditions.frames != grid[0]:
                raise InternalError(
                    f"The precomputed conditions are for {conditions.batch} samples of {conditions.frames} latent "
                    f"frames; x has {batch} samples of {grid[0]}."
                )
            speakers = conditions.speakers

        # the two-speaker routing map is needed (and computed) only with two speakers
        ref_masks = None
        if speakers == 2:
            if ref_target_masks is None:
                raise InternalError("Two speakers need ref_target_masks [3, H, W] (person 1, person 2, background).")
            ref_masks = self._token_masks(ref_target_masks, batch, grid[1], grid[2])

        if block_cache is not None and block_cache.reuse:
            residual = block_cache.residual
            if residual is None or residual.shape != tokens.shape:
                raise InternalError("TeaCache asked to reuse a residual that was never computed for this input shape.")
            out = self.head(tokens + residual, e)
            return self.unpatchify(out, grid)

        before = tokens if block_cache is not None else None  # only TeaCache needs the block input
        rope = self.rope_table(grid, cfg.head_dim, self.device)
        for i, block in enumerate(self.blocks):
            if conditions is None:  # one block's keys/values at a time, as the reference does
                context_kv = block.cross_attn.context_kv(context_tokens)
                audio_kv = block.audio_cross_attn.audio_kv(audio_tokens, speakers == 2)
            else:
                context_kv = conditions.context_kv[i]
                if conditions.audio_kv is not None:
                    audio_kv = conditions.audio_kv[i]
                else:
                    audio_kv = block.audio_cross_attn.audio_kv(conditions.audio_tokens, speakers == 2)
            tokens = block(
                tokens, e0, rope, context_kv, audio_kv, grid, self.attention, ref_masks, self.routing_map,
                self.self_attention, self.ffn_chunks,
            )

        if block_cache is not None:
            block_cache.residual = tokens - before
        out = self.head(tokens, e)  # [B, L, prod(patch) * out_dim], float32
        return self.unpatchify(out, grid)

    def unpatchify(self, tokens: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, f*h*w, prod(patch)*C] -> [B, C, f*pt, h*ph, w*pw] (channel fastest inside a token)."""
        c = self.config.out_dim
        pt, ph, pw = self.config.patch_size
        f, h, w = grid
        u = tokens.reshape(tokens.shape[0], f, h, w, pt, ph, pw, c)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(tokens.shape[0], c, f * pt, h * ph, w * pw).float()


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())
