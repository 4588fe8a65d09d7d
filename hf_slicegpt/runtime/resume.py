"""Partial slicing state on disk, so that an interrupted ``slice`` resumes where it stopped.

The state lives in one directory:

- ``model-XXXXX-of-YYYYY.safetensors``: one per finished layer, the sliced block's tensors under the names
  the sliced checkpoint uses (the low-memory path publishes these files as they are);
- ``state-KKKKK.safetensors``: the bases carried to the next layer (and the global basis, if any);
- ``signals-rR-KKKKK.safetensors``: rank ``R``'s calibration activations entering layer ``KKKKK``;
- ``state.json``: written last, atomically; it names the files above, the width plan, the statistics so far
  and a fingerprint of everything the result depends on (settings, model config, calibration tokens).

Only what ``state.json`` names is valid, so a kill at any instant leaves a resumable state. Everything is
safetensors or JSON; nothing is pickled. Resuming restores the exact tensors, so the final checkpoint is
bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint.io import fsync_dir
from ..errors import SliceGPTError
from . import distributed
from .offload import write_safetensors

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"
STATE_FORMAT = 1


class ResumeError(SliceGPTError):
    """The partial state cannot be used for this run."""


def shard_name(index: int, total: int) -> str:
    """The ``transformers`` shard naming, 1-based: ``model-00001-of-00031.safetensors``."""
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def fingerprint(parts: Iterable[Any]) -> str:
    """A sha256 over strings, bytes and tensors (by their raw bytes)."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            tensor = part.detach().to("cpu").contiguous()
            digest.update(str((tuple(tensor.shape), tensor.dtype)).encode())
            if tensor.numel():
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(part, bytes):
            digest.update(part)
        else:
            digest.update(json.dumps(part, sort_keys=True, default=str).encode())
        digest.update(b"\x00")
    return digest.hexdigest()


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``save_file`` through a temporary name, flushed, so that ``path`` is whole or absent."""
    tmp = path.with_name(path.name + ".partial")
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_tensors(
    path: Path, device: torch.device | str = "cpu", meta: bool = False
) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file; ``meta=True`` reads only the header (shapes and dtypes)."""
    out = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
            if meta:
                piece = handle.get_slice(name)
                dtype = _DTYPES[piece.get_dtype()]
                out[name] = torch.empty(piece.get_shape(), dtype=dtype, device="meta")
            else:
                out[name] = handle.get_tensor(name).to(device)
    return out


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# The carried state's files: the record, the bases, this run's activations and dense stream, temporaries.
_CARRIED_STATE = (
    STATE_NAME,
    "state-*.safetensors",
    "signals-*.safetensors",
    "dense-*.safetensors",
    "*.partial",
)


class PartialState:
    """Reads and writes the partial state of one slicing run in ``directory``."""

    def __init__(self, directory: str | os.PathLike, key: str, num_layers: int):
        self.directory = Path(directory)
        self.key = key
        self.num_layers = num_layers
        self.rank = distributed.rank()
        self.world_size = distributed.world_size()

    # -- layers ----------------------------------------------------------------------------------------------
    @property
    def total_shards(self) -> int:
        """One shard per layer plus one for the embeddings and head."""
        return self.num_layers + 1

    def layer_path(self, idx: int) -> Path:
        return self.directory / shard_name(idx, self.total_shards)

    def write_layer(self, idx: int, tensors: dict[str, torch.Tensor]) -> None:
        """Rank 0 writes finished layer ``idx`` (the other ranks hold the same tensors)."""
        if self.rank == 0:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_tensors(self.layer_path(idx), tensors)

    def read_layer(self, idx: int, device: torch.device | str, meta: bool = False) -> dict[str, torch.Tensor]:
        path = self.layer_path(idx)
        if not path.is_file():
            raise ResumeError(
                f"the partial state in {self.directory} lacks {path.name}; slice again without resume"
            )
        return load_tensors(path, device, meta=meta)

    # -- the state carried between layers ------------------------------------------------------------------
    def save(
        self,
        layers_done: int,
        tensors: dict[str, torch.Tensor],
        signals: Any,
        info: dict[str, Any],
        dense: Any = None,
    ) -> None:
        """Record that ``layers_done`` layers are finished; ``signals`` is this rank's store (or ``None``), and
        ``dense`` the dense stream of the output-aware correction (or ``None``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        files = {}
        for kind, store in (("signals", signals), ("dense", dense)):
            if store is not None:
                name = f"{kind}-r{self.rank}-{layers_done:05d}.safetensors"
                write_safetensors(self.directory / name, list(_shapes(store)), iter(store))
                files[kind] = [f"{kind}-r{r}-{layers_done:05d}.safetensors" for r in range(self.world_size)]
        distributed.barrier()
        if self.rank == 0:
            state_file = f"state-{layers_done:05d}.safetensors"
            save_tensors(self.directory / state_file, tensors)
            previous = self._read_json()
            record = {
                "format": STATE_FORMAT,
                "key": self.key,
                "layers_done": layers_done,
                "num_layers": self.num_layers,
                "world_size": self.world_size,
                "state_file": state_file,
                "signal_files": files.get("signals"),
                "dense_files": files.get("dense"),
                **info,
            }
            tmp = self.directory / (STATE_NAME + ".partial")
            tmp.write_text(json.dumps(record), encoding="utf-8")
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.directory / STATE_NAME)
            fsync_dir(self.directory)
            if previous is not None and previous.get("layers_done") != layers_done:
                old = [*(previous.get("signal_files") or []), *(previous.get("dense_files") or [])]
                for name in [previous.get("state_file"), *old]:
                    if name:
                        (self.directory / name).unlink(missing_ok=True)
        distributed.barrier()
        logger.info(
            "Checkpointed the slicing state after %d of %d layers in %s",
            layers_done,
            self.num_layers,
            self.directory,
        )

    def _read_json(self) -> dict[str, Any] | None:
        path = self.directory / STATE_NAME
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise ResumeError(f"cannot read {path}: {err}; delete {self.directory} and slice again") from err

    def load(self) -> dict[str, Any] | None:
        """The recorded state, or ``None`` if there is none; refuses a state made by a different run."""
        record = self._read_json()
        if record is None:
            return None
        if record.get("format") != STATE_FORMAT or record.get("key") != self.key:
            raise ResumeError(
                f"the partial state in {self.directory} was made by a different slicing run (other model, "
                "calibration data, settings or number of processes); delete it or slice without resume"
            )
        return record

    def load_tensors(self, record: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
        return load_tensors(self.directory / record["state_file"], device)

    def load_signals(self, record: dict[str, Any], kind: str = "signals") -> Iterable[torch.Tensor]:
        """This rank's saved activations (``kind`` ``"signals"``, or ``"dense"``: the dense stream), one batch
        at a time, in order."""
        files = record.get("signal_files" if kind == "signals" else "dense_files")
        if not files:
            return []
        path = self.directory / files[self.rank]
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            count = len(list(handle.keys()))
        return (_read_one(path, f"batch.{i}") for i in range(count))

    def reset(self) -> None:
        """Start afresh: drop what an earlier run left here (only this module's own files)."""
        if self.rank == 0 and self.directory.is_dir():
            self._unlink(*_CARRIED_STATE, "model-*-of-*.safetensors")
        distributed.barrier()

    def clear_state(self) -> None:
        """Drop the carried state (bases, activations, ``state.json``); finished layer files stay."""
        if self.rank == 0:
            self._unlink(*_CARRIED_STATE)

    def _unlink(self, *patterns: str) -> None:
        for pattern in patterns:
            for path in self.directory.glob(pattern):
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        if self.rank == 0:
            shutil.rmtree(self.directory, ignore_errors=True)


def _read_one(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return handle.get_tensor(name)


def _shapes(signals: Any):
    for i, (shape, dtype) in enumerate(signals.layout()):
        yield f"batch.{i}", shape, dtype


__all__ = ["PartialState", "ResumeError", "fingerprint", "load_tensors", "save_tensors", "shard_name"]
