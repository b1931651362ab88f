"""Precomputed prompt embeddings standing in for the text encoder.

`PromptEmbeddings({prompt: context})` has the text encoder's `encode(prompts) -> [context, ...]`
interface, so a pipeline built with `InfiniteTalk.from_components(text_encoder=...)` can run
on umT5 outputs computed once (batch jobs with one prompt, servers that keep them, tests that
replay the official contexts) without loading umT5.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..errors import InputError


class PromptEmbeddings:
    """prompt text -> umT5 hidden states [tokens, text_dim] (trimmed to the token count)."""

    def __init__(self, embeddings: Mapping[str, torch.Tensor]):
        self._embeddings = {str(k): v for k, v in embeddings.items()}
        for prompt, value in self._embeddings.items():
            if value.dim() != 2:
                raise InputError(f"The embedding of prompt {prompt[:40]!r} must be [tokens, dim], got {tuple(value.shape)}.")

    def encode(self, prompts: Sequence[str] | str) -> list[torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = [p for p in prompts if p not in self._embeddings]
        if missing:
            raise InputError(f"No precomputed embedding for the prompt {missing[0][:60]!r}; add it to PromptEmbeddings "
                             "or use a text encoder.")
        return [self._embeddings[p] for p in prompts]

    __call__ = encode
