"""Where the calibration activations live while the layers are sliced, and safetensors written piece by piece.

Slicing keeps the signal of every calibration batch between layers: ``N x L x width`` values, independent of
the model's depth. :class:`ActivationStore` keeps them on the compute device (the default), in host RAM
(``offload="cpu"``: a GPU then holds one batch at a time) or in a memory-mapped file (``offload="disk"``:
host RAM holds one batch at a time). The slicer reads and writes them only through ``append`` and iteration,
so each batch is produced, consumed and released in turn.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import SliceGPTError

OFFLOAD_MODES = ("cpu", "disk")

# safetensors dtype names (https://github.com/huggingface/safetensors, format.md).
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class OffloadError(SliceGPTError):
    """A bad ``offload`` choice."""


def check_offload(offload: str | None) -> str | None:
    """``None`` (activations on the compute device), ``"cpu"`` or ``"disk"``; anything else names the fix."""
    if offload in (None, "none", "device"):
        return None
    if offload not in OFFLOAD_MODES:
        raise OffloadError(
            f"offload must be one of None, {', '.join(map(repr, OFFLOAD_MODES))}, got {offload!r}"
        )
    return offload


def _as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The raw bytes of a CPU tensor (any dtype, bfloat16 included) as a flat uint8 array."""
    flat = tensor.detach().contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy() if flat.numel() else np.zeros(0, dtype=np.uint8)


class ActivationStore:
    """An append-only sequence of per-batch tensors on ``device`` (or host RAM), yielded on ``compute``."""

    def __init__(self, device: torch.device | str, compute: torch.device | str | None = None):
        self.device = torch.device(device)
        self.compute = torch.device(compute) if compute is not None else self.device
        self._items: list[torch.Tensor] = []

    def append(self, tensor: torch.Tensor) -> None:
        self._items.append(tensor.to(self.device))

    def __len__(self) -> int:
        return len(self._items)

    def layout(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Shape and dtype of every batch, in order."""
        return [(tuple(item.shape), item.dtype) for item in self._items]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for item in self._items:
            yield item.to(self.compute, non_blocking=True)

    def close(self) -> None:
        self._items.clear()


class DiskActivationStore(ActivationStore):
    """Batches appended to one file and read back through a memory map, one batch at a time.

    Only the batch in use is resident: each read maps its byte range, copies it to the compute device, and
    unmaps it. The file lives in ``directory`` (default: the system temp dir) and is deleted on :meth:`close`.
    """

    def __init__(self, compute: torch.device | str, directory: str | os.PathLike | None = None):
        super().__init__("cpu", compute)
        handle, name = tempfile.mkstemp(prefix="hf-slicegpt-activations-", suffix=".bin", dir=directory)
        self.path = Path(name)
        self._file = os.fdopen(handle, "wb")
        self._entries: list[tuple[int, tuple[int, ...], torch.dtype]] = []
        self._offset = 0

    def append(self, tensor: torch.Tensor) -> None:
        data = _as_bytes(tensor.to("cpu"))
        self._file.write(data.tobytes() if not data.flags.c_contiguous else memoryview(data))
        self._entries.append((self._offset, tuple(tensor.shape), tensor.dtype))
        self._offset += data.size

    def __len__(self) -> int:
        return len(self._entries)

    def layout(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [(shape, dtype) for _, shape, dtype in self._entries]

    def __iter__(self) -> Iterator[torch.Tensor]:
        self._file.flush()
        for offset, shape, dtype in self._entries:
            count = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            if count == 0:
                yield torch.empty(shape, dtype=dtype, device=self.compute)
                continue
            mapped = np.memmap(self.path, dtype=np.uint8, mode="c", offset=offset, shape=(count,))
            try:
                view = torch.from_numpy(np.asarray(mapped)).view(dtype).reshape(shape)
                out = view.to(self.compute, copy=True)
            finally:
                del mapped
            yield out

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.path.unlink(missing_ok=True)
        self._entries.clear()

    def __del__(self) -> None:  # a crash must not leave gigabytes in /tmp
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def make_store(
    offload: str | None, compute: torch.device, directory: str | os.PathLike | None = None
) -> ActivationStore:
    """An empty store for one set of activations under the ``offload`` policy."""
    if offload is None:
        return ActivationStore(compute)
    if offload == "cpu":
        return ActivationStore("cpu", compute)
    return DiskActivationStore(compute, directory)


def collect(
    tensors: Iterable[torch.Tensor], offload: str | None, compute: torch.device, directory=None
) -> ActivationStore:
    """Drain ``tensors`` (a generator: one batch alive at a time) into a new store."""
    store = make_store(offload, compute, directory)
    for tensor in tensors:
        store.append(tensor)
    return store


# -- safetensors, written as the tensors come ------------------------------------------------------------------
def write_safetensors(
    path: str | os.PathLike,
    layout: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file whose tensors (named and shaped by ``layout``) arrive one at a time.

    ``safetensors.torch.save_file`` needs every tensor in memory at once; activations of a large calibration
    set need not fit. The format is a little-endian u64 header length, a JSON header with each tensor's dtype,
    shape and byte range, and the raw bytes in that order.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dtype in layout:
        if dtype not in _ST_DTYPES:
            raise ValueError(f"cannot write dtype {dtype} to safetensors")
        size = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {
            "dtype": _ST_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(f"{path}.partial")
    with open(tmp, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)))
        handle.write(blob)
        count = 0
        for (name, shape, dtype), tensor in zip(layout, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise ValueError(
                    f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, expected {shape} {dtype}"
                )
            handle.write(memoryview(_as_bytes(tensor.to("cpu"))))
            count += 1
        handle.flush()
        os.fsync(handle.fileno())
    if count != len(layout):
        raise ValueError(f"{path}: {count} tensors written, {len(layout)} announced")
    os.replace(tmp, path)


def copy_file(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy through a temporary name so that ``dst`` is complete or absent."""
    tmp = Path(f"{dst}.partial")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


__all__ = [
    "OFFLOAD_MODES",
    "ActivationStore",
    "DiskActivationStore",
    "OffloadError",
    "check_offload",
    "collect",
    "make_store",
    "write_safetensors",
]
