"""Per-window audio features for the generator: `[speakers, frame_num, 5, layers, C]` slices.

Official rule (wan/multitalk.py, `generate_infinitetalk` loop), reproduced exactly:
  * a window starting at audio frame s takes frames s .. s+frame_num-1, each with its
    neighbours -2..+2, indices clamped to [0, F-1]  -> E[indices];
  * chunk starts: s = 0, then s += frame_num - motion_frame after every chunk (the official CLI
    default motion_frame is 9; the parity fixture uses 25);
  * a chunk is the last when s + frame_num >= min(max_frames_num, F); if then s + frame_num >= F,
    each speaker's features are first extended by `miss = s + frame_num - F + 3` frames taken
    from the end in reverse order: E = cat([E, flip(E[-miss:])]) (end reflection);
  * with max_frames_num <= frame_num only one chunk is made (official "clip" mode).
The schedule itself is `generation.windows.plan_windows`; `audio_for_window` slices one
planned window.

Beyond the official code: audio shorter than one window (F <= frame_num, which the official
code refuses) gives a single chunk whose features are extended the same way; when the
extension would need more frames than exist, the reflection repeats back and forth
(ping-pong), which equals the official rule whenever that rule is defined. The video is cut to
the audio length afterwards (`WindowPlan.total_frames`).
"""
from __future__ import annotations

from typing import Sequence, Union

import torch

from .windows import Window

FRAME_NUM = 81
CONTEXT = 2  # neighbours on each side: window of 5 frames
EXTRA_REFLECTED = 3  # the official "+ 3"

Embeddings = Union[torch.Tensor, Sequence[torch.Tensor]]


def window_indices(start: int, length: int, frame_num: int = FRAME_NUM, context: int = CONTEXT) -> torch.Tensor:
    """int64 [frame_num, 2*context+1]: arange(start, start+frame_num)[:, None] + (-context..context), clamped to [0, length-1]."""
    centre = torch.arange(start, start + frame_num, dtype=torch.int64)[:, None]
    offsets = torch.arange(-context, context + 1, dtype=torch.int64)[None, :]
    return torch.clamp(centre + offsets, min=0, max=length - 1)


def audio_window(
    embeddings: Embeddings,
    start: int,
    frame_num: int = FRAME_NUM,
    context: int = CONTEXT,
) -> torch.Tensor:
    """Slice one window: per-speaker [F_i, ...] features -> [speakers, frame_num, 2*context+1, ...].

    `embeddings` is a list with one tensor per speaker, or a single [F, ...] tensor (one speaker).
    Each speaker is clamped to its own length, as in the official code.
    """
    if isinstance(embeddings, torch.Tensor):
        embeddings = [embeddings]
    windows = [emb[window_indices(start, emb.shape[0], frame_num, context)] for emb in embeddings]
    return torch.stack(windows, dim=0)


def extend_by_reflection(embedding: torch.Tensor, end: int, extra: int = EXTRA_REFLECTED) -> tuple[torch.Tensor, int]:
    """Official end padding: if end >= F, append flip(E[-miss:]) with miss = end - F + extra.

    Returns (extended tensor, miss) (miss 0: unchanged). When miss > F the reflection is applied
    repeatedly (E, reversed E, E, ...) until `miss` frames were added.
    """
    length = embedding.shape[0]
    if end < length:
        return embedding, 0
    miss = end - length + extra
    out = embedding
    remaining = miss
    while remaining > 0:
        take = min(remaining, out.shape[0])
        out = torch.cat([out, torch.flip(out[-take:], dims=[0])], dim=0)
        remaining -= take
    return out, miss


def audio_for_window(features: Sequence[torch.Tensor], window: Window) -> torch.Tensor:
    """The audio of one planned window (`generation.windows.plan_windows`): [speakers, frame_num, 5, ...].

    As in the official loop, the features are extended by end reflection just before the last
    window, each speaker when the window end reaches its own length.
    """
    embs = list(features)
    if window.is_last:
        embs = [extend_by_reflection(e, window.end)[0] for e in embs]
    return audio_window(embs, window.start, window.end - window.start)
