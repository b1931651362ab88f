"""Read weight files lazily and materialise meta-device modules tensor by tensor.

Models are built on the meta device (no memory), then each parameter is read from its file,
cast and moved to the target device one at a time, so loading a 14B model never holds two
copies in host RAM. Pickled files are only read through `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from ..devices import resolve_device
from ..errors import CheckpointError, MissingWeightsError

SAFETENSORS_EXT = (".safetensors", ".sft")
PICKLE_EXT = (".pth", ".pt", ".bin", ".ckpt")
"""Usual names only (for listing folders); the container is read from the content (`container_of`)."""
FLOAT8_DTYPES = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, name)
)


class LazyStateDict:
    """A read-only mapping key -> tensor over one or more weight files.

    safetensors files are opened with `safe_open` and read per key; pickled files are loaded
    with `torch.load(weights_only=True, mmap=True)` (memory-mapped, so untouched tensors cost no
    RAM). When several files hold the same key, the later file wins (the official merge rule).
    `origin(key)` names the file a key comes from, for error messages.
    """

    def __init__(self, files: Iterable[os.PathLike | str], rename: Optional[Callable[[str], Optional[str]]] = None):
        self.files = [Path(f) for f in files]
        self._where: dict[str, tuple[int, str]] = {}
        self._handles: list = []
        for i, path in enumerate(self.files):
            handle = _open_one(path)
            self._handles.append(handle)
            for raw in _keys_of(handle):
                key = rename(raw) if rename else raw
                if key is None:
                    continue
                self._where[key] = (i, raw)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def origin(self, key: str) -> str:
        return str(self.files[self._where[key][0]])

    def shape(self, key: str) -> tuple[int, ...]:
        i, raw = self._where[key]
        handle = self._handles[i]
        if isinstance(handle, dict):
            return tuple(handle[raw].shape)
        return tuple(handle.get_slice(raw).get_shape())

    def __getitem__(self, key: str) -> torch.Tensor:
        i, raw = self._where[key]
        handle = self._handles[i]
        try:
            return handle[raw] if isinstance(handle, dict) else handle.get_tensor(raw)
        except Exception as exc:  # corrupt data inside a readable header
            raise CheckpointError(
                f"Could not read tensor '{raw}' from {self.files[i]}: {exc}. "
                "The file looks damaged; download it again."
            ) from exc

    def is_mapped(self, key: str) -> bool:
        """True when the tensor is a view into a memory-mapped pickled file."""
        return isinstance(self._handles[self._where[key][0]], dict)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key in self._where:
            yield key, self[key]


GGUF_MAGIC = b"GGUF"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's zip container (the default since torch 1.6)
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors format's own limit on the JSON header


def container_of(path: os.PathLike | str) -> Optional[str]:
    """The container of a weight file from its first bytes, never its name: 'safetensors' (an
    8-byte little-endian header length, then the JSON header's '{'), 'torch' (torch.save's zip or
    legacy pickle, protocol 2-5), 'gguf' (the GGUF magic), or None (none of these, or unreadable)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return None
    if head[:4] == GGUF_MAGIC:
        return "gguf"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if head[:4] == ZIP_MAGIC or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "torch"
    return None


def _open_one(path: Path):
    if not path.exists():
        raise MissingWeightsError(f"Weight file not found: {path}.", missing=[str(path)])
    if path.stat().st_size == 0:
        raise CheckpointError(f"Weight file {path} is empty; download it again.")
    container = container_of(path)
    if container == "safetensors":
        from safetensors import safe_open

        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except Exception as exc:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({exc}); it is damaged or incomplete. "
                "Download it again."
            ) from exc
    if container == "torch":
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            from ..errors import unpickling_reason

            raise CheckpointError(
                f"{path} could not be loaded as a PyTorch checkpoint ({unpickling_reason(exc)}); it is damaged, "
                "incomplete or not a plain tensor checkpoint: download it again or use its .safetensors file."
            ) from None
        if isinstance(data, dict) and "state_dict" in data and isinstance(data["state_dict"], dict):
            data = data["state_dict"]
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} does not hold a state dict (found {type(data).__name__}).")
        return data
    if container == "gguf":
        raise CheckpointError(
            f"{path} is a GGUF file, which is read as a DiT, adapter or umT5 file only (--dit, --adapter, --t5), "
            "not as this model's checkpoint."
        )
    raise CheckpointError(
        f"{path} is not a weight file infinitetalk can read: its content is neither safetensors, a PyTorch "
        "checkpoint nor GGUF (whatever its name says), so it is damaged or another kind of file."
    )


def _keys_of(handle) -> list[str]:
    return list(handle.keys())


def open_weights(files: Iterable[os.PathLike | str], rename: Optional[Callable[[str], Optional[str]]] = None) -> LazyStateDict:
    """Open weight files for lazy reading; `rename` maps file keys to module keys (None drops)."""
    return LazyStateDict(files, rename=rename)


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, is_param: bool) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if is_param:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def materialize(
    module: nn.Module,
    source: LazyStateDict,
    device: torch.device | str = "cpu",
    dtype: Optional[torch.dtype] = None,
    *,
    keep_float32: Optional[Callable[[str], bool]] = None,
    ignore_unexpected: Optional[Callable[[str], bool]] = None,
    what: str = "model",
) -> nn.Module:
    """Fill every parameter and persistent buffer of `module` (built on meta) from `source`.

    Strict: a key the module needs but no file has, or a file key the module does not have
    (unless `ignore_unexpected(key)`), raises CheckpointError naming the key and the files.
    Floating tensors are cast to `dtype` (unless `keep_float32(name)`, then float32).
    """
    device = resolve_device(device)
    expected = dict(module.state_dict(keep_vars=True))
    param_names = {n for n, _ in module.named_parameters()}
    file_list = ", ".join(str(f) for f in source.files)

    missing = [k for k in expected if k not in source]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(
            f"The {what} weights are incomplete: key {shown} is missing from {file_list}. "
            "Check that every file of the checkpoint was downloaded (infinitetalk download)."
        )
    unexpected = [k for k in source.keys() if k not in expected and not (ignore_unexpected and ignore_unexpected(k))]
    if unexpected:
        k = unexpected[0]
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise CheckpointError(
            f"Unexpected key '{k}'{more} in {source.origin(k)}: it does not belong to the {what}. "
            "The file is for another model or configuration."
        )

    for name, ref in expected.items():
        tensor = source[name]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(
                f"Key '{name}' in {source.origin(name)} has shape {tuple(tensor.shape)} but the {what} "
                f"expects {tuple(ref.shape)}: the file is for a different model size or configuration."
            )
        if ref.dtype in FLOAT8_DTYPES or tensor.dtype in FLOAT8_DTYPES:
            # fp8 layers keep their storage type; the source must already deliver it
            if tensor.dtype != ref.dtype:
                raise CheckpointError(
                    f"Key '{name}' in {source.origin(name)} is {tensor.dtype} but the {what} expects {ref.dtype}; "
                    "quantise through infinitetalk.weights.quant.Fp8Source when loading an fp8 model."
                )
            target = ref.dtype
        elif tensor.is_floating_point():
            target = torch.float32 if (keep_float32 and keep_float32(name)) else (dtype or tensor.dtype)
        else:
            target = tensor.dtype
        value = tensor.to(device=device, dtype=target, copy=False)
        if device.type == "cpu" and source.is_mapped(name) and value.data_ptr() == tensor.data_ptr():
            value = value.clone()  # never keep a view into a memory-mapped file or a shared buffer
        _set_tensor(module, name, value, name in param_names)
        del tensor, value

    leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:
        raise CheckpointError(
            f"The {what} still has uninitialised tensors after loading ({', '.join(leftover[:3])}); "
            "this is a bug in infinitetalk, please report it."
        )
    return module.eval()
