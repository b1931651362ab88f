"""Weight sources in official key names, built over the raw readers.

Every source has the interface of `weights.materialize.LazyStateDict` (keys, __contains__,
__len__, __getitem__, items, origin, is_mapped, shape, files), so `materialize`, the LoRA merge
and the fp8 layout (`weights.quant.Fp8Source`) work on any of them.

* `MappedSource`: official key -> (raw keys, how to make the tensor, shape) over one raw source,
  for renames, reshapes, transposes and fused rows (HF CLIP q/k/v -> to_qkv).
* `MergedSource`: several sources in one key space; a later source wins (the official merge rule
  of the DiT shards and the adapter file).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch


@dataclass(frozen=True)
class Entry:
    """How one official tensor is made: `make(*[raw[k] for k in raw_keys])`, of shape `shape`."""

    raw_keys: tuple[str, ...]
    shape: tuple[int, ...]
    make: Optional[Callable[..., torch.Tensor]] = None  # None: the one raw tensor as it is


class MappedSource:
    """A source whose keys are the official names, each made from tensors of `raw`."""

    def __init__(self, raw, entries: dict[str, Entry], *, files: Optional[Sequence] = None, extras: Optional[dict] = None):
        self._raw = raw
        self._entries = dict(entries)
        self.files = list(files if files is not None else raw.files)
        self.extras = dict(extras or {})  # reader facts (format, quant types) for logs and `info`

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._entries:
            yield key, self[key]

    def origin(self, key: str) -> str:
        return self._raw.origin(self._entries[key].raw_keys[0])

    def is_mapped(self, key: str) -> bool:
        entry = self._entries[key]
        return entry.make is None and self._raw.is_mapped(entry.raw_keys[0])

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def raw_source(self):
        return self._raw

    def raw_key(self, key: str) -> Optional[str]:
        """The raw key of a plain (renamed only) entry, else None."""
        entry = self._entries[key]
        return entry.raw_keys[0] if entry.make is None and len(entry.raw_keys) == 1 else None

    def __getitem__(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        tensors = [self._raw[k] for k in entry.raw_keys]
        return tensors[0] if entry.make is None else entry.make(*tensors)


class MergedSource:
    """Several sources as one; when two hold a key, the later one wins."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self.files = [f for s in self.sources for f in s.files]
        self._where: dict[str, int] = {}
        for i, source in enumerate(self.sources):
            for key in source.keys():
                self._where[key] = i

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._where:
            yield key, self[key]

    def source_of(self, key: str):
        return self.sources[self._where[key]]

    def origin(self, key: str) -> str:
        return self.source_of(key).origin(key)

    def is_mapped(self, key: str) -> bool:
        return self.source_of(key).is_mapped(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.source_of(key).shape(key)

    def ggml_type(self, key: str) -> Optional[str]:
        source = self.source_of(key)
        return source.ggml_type(key) if hasattr(source, "ggml_type") else None

    def raw(self, key: str) -> torch.Tensor:
        return self.source_of(key).raw(key)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.source_of(key)[key]


def renamed(source, rename: Callable[[str], Optional[str]]) -> MappedSource:
    """`source` with its keys renamed by `rename` (None drops a key); tensors are read lazily."""
    entries = {}
    for key in source.keys():
        new = rename(key)
        if new is not None:
            entries[new] = Entry((key,), tuple(source.shape(key)))
    extras = getattr(source, "extras", {})
    return MappedSource(source, entries, extras=extras)
