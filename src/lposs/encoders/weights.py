"""Reading a weight file without unpickling objects, and building a model whose parameters
are its tensors. A file holding pickled objects raises :class:`UnsafeCheckpointError`, any
other unreadable or unfitting file :class:`WeightsNotFoundError`, naming the file."""

from __future__ import annotations

import os
import pickle
import re
import struct
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import UnsafeCheckpointError, WeightsNotFoundError

__all__ = ["read_checkpoint", "build_with_weights"]

_NESTING_KEYS = ("state_dict", "model")  # checkpoints may nest the state dict under these
_EXPECTED = ("expected a .safetensors file or a PyTorch checkpoint written by torch.save "
             "(a state dict of tensors)")


def read_checkpoint(path: str | os.PathLike, *, strip_prefixes: Sequence[str] = ("module.",)):
    """A checkpoint file as a flat ``{name: tensor}`` dict on the CPU: safetensors' own
    reader, or ``torch.load(weights_only=True)``, told apart by the file's first bytes. The
    tensors own their memory (none maps the file): a model built from them keeps working
    when the file is rewritten in place. A state dict nested under ``"state_dict"`` or
    ``"model"`` is unwrapped; ``strip_prefixes`` (e.g. DDP's ``module.``) are removed when
    every key carries them.

    Raises:
        WeightsNotFoundError: the file cannot be read or is not a checkpoint.
        UnsafeCheckpointError: the file would need unpickling arbitrary Python objects.
    """
    path = Path(path).expanduser()
    kind = _checkpoint_format(path)
    if kind == "safetensors":
        state_dict = _read_safetensors(path)
    elif kind == "torch":
        state_dict = _read_torch(path)
    elif kind == "pickle":
        raise _unsafe(path, "a Python pickle that torch.save did not write")
    else:
        raise WeightsNotFoundError(f"{path} is not a weights file: {_EXPECTED}; {kind}")
    while isinstance(state_dict, dict):
        nested = [k for k in _NESTING_KEYS if isinstance(state_dict.get(k), dict)]
        if not nested:
            break
        state_dict = state_dict[nested[0]]
    if isinstance(state_dict, dict):
        state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not isinstance(state_dict, dict) or not state_dict:
        raise WeightsNotFoundError(f"{path} holds no state dict of tensors: {_EXPECTED}")
    for prefix in strip_prefixes:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _checkpoint_format(path: Path) -> str:
    """``"safetensors"``, ``"torch"`` or ``"pickle"`` from a file's first bytes, else what
    the file looks like."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError as err:
        raise WeightsNotFoundError(f"cannot read weights file {path}: {err}") from err
    if head.startswith(b"\x80") and len(head) > 1 and head[1] > 2:
        return "pickle"  # protocol 3+: torch.save writes zip archives or protocol 2
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive / legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return "safetensors"  # little-endian header length, then the JSON header
    if not head:
        return "the file is empty"
    try:
        return f"it starts with the text {head.decode('utf-8')!r}"
    except UnicodeDecodeError:
        return f"it starts with the bytes {head!r}"


def _read_safetensors(path: Path) -> dict:
    """The tensors of a safetensors file, each copied out of the file's memory map."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, "pt") as f:
            return {name: f.get_tensor(name).clone() for name in f.keys()}
    except (SafetensorError, OSError) as err:
        reason = " ".join(str(err).split())[:200]
        raise WeightsNotFoundError(f"{path} is not a readable safetensors file ({reason}): "
                                   f"{_EXPECTED}") from err


def _read_torch(path: Path):
    unreadable = f"{path} is not a readable torch checkpoint"
    try:
        with warnings.catch_warnings():  # torch's notes on pickle protocols: ours is the error
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        found = re.search(r"Unsupported (global: GLOBAL \S+|class \S+|operand \S+)", message)
        reason = found.group(0) if found else "unpickling refused"
        if "GLOBAL" in reason or "class" in reason:
            raise _unsafe(path, reason) from err
        raise WeightsNotFoundError(f"{unreadable} ({reason}): {_EXPECTED}") from err
    except RuntimeError as err:
        if "TorchScript" in str(err):
            raise UnsafeCheckpointError(
                f"{path} is a TorchScript archive, which lposs does not execute; use the "
                "model's safetensors weights (e.g. the Hugging Face Hub copy) instead.") from err
        reason = " ".join(str(err).split())[:200]
        raise WeightsNotFoundError(f"{unreadable} ({reason}): {_EXPECTED}") from err
    except Exception as err:  # noqa: BLE001 - any other failure of the reader (EOF, KeyError...)
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        raise WeightsNotFoundError(f"{unreadable} ({reason}): {_EXPECTED}") from err


def _unsafe(path: Path, reason: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path} holds pickled Python objects, which lposs never unpickles ({reason}). "
        "Re-save only its tensors, e.g. safetensors.torch.save_file(state_dict, "
        "'model.safetensors'), in an environment you trust.")


def build_with_weights(
    build: Callable[[torch.device], torch.nn.Module],
    convert: Callable[[torch.nn.Module, dict], dict],
    state_dict: dict,
    path,
    name: str,
    *,
    fill: Callable[[torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """A model whose parameters are the checkpoint's tensors, without a second copy: built
    on the meta device by ``build(device)``, loaded with ``load_state_dict(assign=True)``
    from ``convert(model, state_dict)``, then ``fill(model)`` sets the buffers checkpoints
    do not hold (CLIP's causal mask). A model still holding a meta tensor is built again on
    the CPU and loaded by copy. ``path`` and ``name`` are for the error message.

    Raises:
        WeightsNotFoundError: the checkpoint does not fit the model.
    """
    for device in (torch.device("meta"), torch.device("cpu")):
        with device:
            model = build(device)
        try:
            model.load_state_dict(convert(model, state_dict), strict=True,
                                  assign=device.type == "meta")
        except RuntimeError as err:
            detail = " ".join(str(err).split())[:400]
            raise WeightsNotFoundError(f"{path} does not hold weights of {name!r} ({detail}); "
                                       "check the model name and the file") from err
        if fill is not None and device.type == "meta":
            fill(model)
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            break
    return model
