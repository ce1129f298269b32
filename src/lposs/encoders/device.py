"""Where the encoders run and in which precision (the dtype the models are cast to; features
always come back as float32): ``"fp32"``, the default; ``"bf16"``, fast on GPUs and on CPUs
with native bf16 (``avx512_bf16`` or ``amx_bf16``), about 3x slower than fp32 on other CPUs
(a warning says so); ``"fp16"``, GPUs only (PyTorch computes fp16 matrix products on the CPU
many times slower than fp32); ``"auto"``: fp16 on CUDA, bf16 on a CPU with native bf16,
fp32 otherwise.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import ConfigError

__all__ = ["PRECISIONS", "resolve_device", "resolve_precision", "cpu_has_native_bf16"]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})  # /proc/cpuinfo flags of native bf16
_CPUINFO = Path("/proc/cpuinfo")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device`` present on this machine; None: the CPU.

    Raises:
        TypeError: ``device`` is not a str, torch.device or None.
        ConfigError: not a device name, or that device is not available here; one line.
    """
    if device is None:
        return torch.device("cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a str, a torch.device or None, got "
                        f"{type(device).__name__}")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"device {str(device)!r} is not a valid torch device "
                          f"({_first_line(err)}); use e.g. cpu, cuda, cuda:1 or mps") from None
    missing = _unavailable(resolved)
    if missing:
        raise ConfigError(f"device {str(device)!r} is not available on this machine: {missing}")
    return resolved


def _unavailable(device: torch.device) -> str:
    """Why ``device`` cannot be used here, in one short sentence; "" when it can."""
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not count:
            return "PyTorch finds no CUDA GPU here (torch.cuda.is_available() is False)"
        if device.index is not None and device.index >= count:
            return (f"CUDA device index {device.index} is out of range, this machine has "
                    f"{count} CUDA device{'s' if count != 1 else ''} (cuda:0..cuda:{count - 1})")
        return ""
    if device.type == "mps" and not torch.backends.mps.is_available():
        return "PyTorch finds no Apple MPS device here (torch.backends.mps.is_available() is False)"
    try:
        torch.empty(0, device=device)  # the CPU, MPS and other backends (xpu, ...)
    except (RuntimeError, AssertionError) as err:
        return _first_line(err)
    return ""


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


def resolve_precision(precision: str, device: str | torch.device | None = None) -> str:
    """The precision the models run in on ``device`` (default: CPU): ``"fp32"``, ``"fp16"`` or
    ``"bf16"`` (a key of :data:`PRECISIONS`), ``"auto"`` resolved (see the module notes).

    Warns:
        UserWarning: ``"bf16"`` on a CPU without native bf16 (slower than fp32 there).

    Raises:
        ConfigError: an unknown precision, or ``"fp16"`` on the CPU.
    """
    choices = [*PRECISIONS, "auto"]
    if not isinstance(precision, str) or precision not in choices:
        raise ConfigError(f"precision must be one of {choices}, got {precision!r}")
    device_type = torch.device(device).type if device is not None else "cpu"
    if precision == "auto":
        if device_type == "cuda":
            return "fp16"
        return "bf16" if device_type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device_type == "cpu":
        raise ConfigError(
            "precision 'fp16' is not supported on the CPU (PyTorch computes fp16 matrix "
            "products there many times slower than fp32); use 'bf16', 'auto' or 'fp32', or "
            "run on a GPU")
    if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        warnings.warn("precision 'bf16' runs slower than fp32 on this CPU, which has no native "
                      "bf16 (avx512_bf16 or amx_bf16); use fp32 or auto",
                      stacklevel=1)  # one location: shown once for both encoders
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether ``avx512_bf16`` or ``amx_bf16`` is among the CPU flags of ``/proc/cpuinfo``."""
    return bool((_cpu_flags() or frozenset()) & _CPU_BF16_FLAGS)


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str] | None:
    """The CPU feature flags of ``/proc/cpuinfo``; None where that file cannot be read."""
    try:
        lines = _CPUINFO.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for key, _, value in (line.partition(":") for line in lines):
        if key.strip() in {"flags", "Features"}:  # x86 / ARM
            return frozenset(value.split())
    return frozenset()
