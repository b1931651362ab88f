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

Beyond the official code: audio shorter than one window (F <= frame_num, which the official
code refuses) gives a single chunk whose features are extended the same way; when the
extension would need more frames than exist, the reflection repeats back and forth
(ping-pong), which equals the official rule whenever that rule is defined. The video is cut to
the audio length afterwards (`AudioChunk.keep_frames` / `total_frames`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

FRAME_NUM = 81
MOTION_FRAME = 9
CONTEXT = 2  # neighbours on each side: window of 5 frames
EXTRA_REFLECTED = 3  # the official "+ 3"

Embeddings = Union[torch.Tensor, Sequence[torch.Tensor]]


def window_indices(start: int, length: int, frame_num: int = FRAME_NUM, context: int = CONTEXT) -> torch.Tensor:
    """int64 [frame_num, 2*context+1]: arange(start, start+frame_num)[:, None] + (-context..context), clamped to [0, length-1]."""
    centre = torch.arange(start, start + frame_num, dtype=torch.int64)[:, None]
    offsets = torch.arange(-context, context + 1, dtype=torch.int64)[None, :]
    return torch.clamp(centre + offsets, min=0, max=length - 1)


def _as_list(embeddings: Embeddings) -> list[torch.Tensor]:
    if isinstance(embeddings, torch.Tensor):
        raise TypeError("pass a list with one [F, layers, C] tensor per speaker")
    return list(embeddings)


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


@dataclass(frozen=True)
class AudioChunk:
    """One generation window of the official streaming loop.

    `start`/`end`: audio frames [start, end) this window covers; `is_last`; `miss`: frames of end
    reflection added to the features before this window (0 if none); `keep_from`: frames of the
    decoded window that repeat the previous one (motion frames) and are dropped; `keep_frames`:
    how many decoded frames of this window end up in the video after the final cut.
    """

    index: int
    start: int
    end: int
    is_last: bool
    miss: int
    keep_from: int
    keep_frames: int


def plan_audio_chunks(
    num_audio_frames: int,
    frame_num: int = FRAME_NUM,
    motion_frame: int = MOTION_FRAME,
    max_frames_num: Optional[int] = None,
) -> list[AudioChunk]:
    """The chunk schedule of the official loop for `num_audio_frames` feature frames.

    `max_frames_num` caps the video length (official default 1000; None: no cap). The video is
    `total_frames(...)` frames long: min(num_audio_frames, max_frames_num).
    """
    if num_audio_frames < 1:
        raise ValueError("no audio frames to plan for")
    if not 0 < motion_frame < frame_num:
        raise ValueError(f"motion_frame must be in 1..{frame_num - 1}, got {motion_frame}")
    cap = num_audio_frames if max_frames_num is None else int(max_frames_num)
    total = min(num_audio_frames, cap)
    chunks: list[AudioChunk] = []
    start, length, emitted = 0, num_audio_frames, 0
    is_last = num_audio_frames <= frame_num or cap <= frame_num
    # shorter than one window: the only chunk is padded like a last chunk
    miss = frame_num - num_audio_frames + EXTRA_REFLECTED if num_audio_frames <= frame_num else 0
    while True:
        index = len(chunks)
        keep_from = 0 if index == 0 else motion_frame
        keep = max(0, min(frame_num - keep_from, total - emitted))
        chunks.append(AudioChunk(index, start, start + frame_num, is_last, miss, keep_from, keep))
        emitted += keep
        if is_last:
            return chunks
        start += frame_num - motion_frame
        end = start + frame_num
        if end >= min(cap, length):
            is_last = True
            miss = end - length + EXTRA_REFLECTED if end >= length else 0


def total_frames(num_audio_frames: int, max_frames_num: Optional[int] = None) -> int:
    """Video frames the plan produces after the final cut: min(audio frames, max_frames_num)."""
    return num_audio_frames if max_frames_num is None else min(num_audio_frames, int(max_frames_num))


def iter_audio_windows(
    embeddings: Embeddings,
    frame_num: int = FRAME_NUM,
    motion_frame: int = MOTION_FRAME,
    max_frames_num: Optional[int] = None,
    context: int = CONTEXT,
) -> Iterator[tuple[AudioChunk, torch.Tensor]]:
    """Yield (chunk, [speakers, frame_num, 5, ...] window) following the official loop.

    Speakers are extended by reflection independently, each when the chunk end reaches its own
    length (official per-speaker rule); the schedule follows speaker 1's length, as officially.
    """
    embs = [embeddings] if isinstance(embeddings, torch.Tensor) else list(embeddings)
    plan = plan_audio_chunks(embs[0].shape[0], frame_num, motion_frame, max_frames_num)
    for chunk in plan:
        if chunk.is_last:  # officially decided (and extended) just before the last chunk
            embs = [extend_by_reflection(e, chunk.end)[0] for e in embs]
        yield chunk, audio_window(embs, chunk.start, frame_num, context)
