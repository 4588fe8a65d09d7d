"""Checking a requested compute device against what this machine has (one check for the API and the CLI)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SliceGPTError


class DeviceError(SliceGPTError):
    """A device that does not exist here, or is not a device name at all."""


def check_device(device: Any) -> torch.device:
    """``device`` (a string such as ``"cuda:0"`` or a ``torch.device``) as a device this machine has."""
    if not isinstance(device, (str, torch.device)) or isinstance(device, bool):
        raise DeviceError(f"device must be a string such as 'cpu' or 'cuda:0', got {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        message = " ".join(str(err).split())
        raise DeviceError(f"unknown device {device!r} ({message}); use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} asked for, but no CUDA GPU is visible; use the cpu device")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise DeviceError(f"device {device!r} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {device!r} asked for, but MPS is not available; use the cpu device")
    return parsed


__all__ = ["DeviceError", "check_device"]
