"""Finding and safely loading model weights: local files, $LPOSS_WEIGHTS, the Hugging Face Hub.

Order of the search (the factories ``load_clip`` / ``load_dino`` run it):

1. ``weights=PATH``: a local checkpoint, used as is.
2. The folder named by the environment variable ``LPOSS_WEIGHTS``, holding a file
   named after the model: ``<name><ext>`` with ``ext`` one of ``.safetensors``,
   ``.pt``, ``.pth``, ``.bin`` (e.g. ``ViT-B-16-laion2b_s34b_b88k.safetensors``,
   ``dino_vitb16.safetensors``; each factory documents its accepted names).
3. The Hugging Face Hub cache (files OpenCLIP / timm downloaded before): no network.
4. A Hub download, only when the Hub answers; offline (``HF_HUB_OFFLINE=1``) or with
   no route to the Hub this fails at once with :class:`WeightsNotFoundError`.

Checkpoints are read without unpickling arbitrary objects: safetensors, or
``torch.load(..., weights_only=True)``; a checkpoint holding pickled objects raises
:class:`UnsafeCheckpointError`, any other unreadable or unfitting file
:class:`WeightsNotFoundError` naming the file and what was expected. The format is read
from the file's first bytes, not its extension.

Where weights were found is a :class:`WeightsSource`; its ``info()`` is the provenance
record the encoders expose as ``weights_info``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import socket
import struct
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UnsafeCheckpointError, WeightsNotFoundError
from .cache import file_sha256

__all__ = [
    "WEIGHTS_ENV",
    "WEIGHT_EXTENSIONS",
    "WeightsSource",
    "read_checkpoint",
    "find_in_weights_dir",
    "find_in_hub",
    "hub_cached",
    "load_strict",
    "build_with_weights",
]

WEIGHTS_ENV = "LPOSS_WEIGHTS"  # environment variable naming a folder of weight files
WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")  # searched in this order
_NESTING_KEYS = ("state_dict", "model")  # checkpoints may nest the state dict under these
_HUB_PROBE_TIMEOUT_S = 3.0  # seconds to wait for a TCP connection to the Hub
_EXPECTED = ("expected a .safetensors file or a PyTorch checkpoint written by torch.save "
             "(a state dict of tensors)")


@dataclass(frozen=True)
class WeightsSource:
    """Where one model's weights come from, found before anything is loaded.

    Attributes:
        source: ``"file"`` (a local file given or found in ``$LPOSS_WEIGHTS``), ``"hub"``
            (a Hugging Face Hub file, from its local cache) or ``"random"`` (no weights).
        path: the local file that is read; None for random weights.
        repo: the Hub repository, for ``"hub"``.
        revision: the Hub commit of the cached snapshot holding the file, for ``"hub"``.
        file: the file's name in the Hub repository, for ``"hub"``.
    """

    source: str
    path: Path | None = None
    repo: str | None = None
    revision: str | None = None
    file: str | None = None

    def info(self) -> dict:
        """The provenance record: ``source`` and, where they apply, ``path``, ``repo``,
        ``revision``, ``file`` and the file's ``sha256`` (hex)."""
        record: dict = {"source": self.source}
        for key in ("path", "repo", "revision", "file"):
            value = getattr(self, key)
            if value is not None:
                record[key] = str(value)
        if self.path is not None and Path(self.path).is_file():
            record["sha256"] = file_sha256(self.path)
        return record


def read_checkpoint(path: str | os.PathLike, *, strip_prefixes: Sequence[str] = ("module.",)):
    """Read a checkpoint file into a flat ``{name: tensor}`` dict, never unpickling objects.

    Args:
        path: a ``.safetensors`` file, or a ``.pt`` / ``.pth`` / ``.bin`` torch file
            (loaded with ``weights_only=True``). A state dict nested under
            ``"state_dict"`` or ``"model"`` is unwrapped.
        strip_prefixes: key prefixes removed when every key carries them (e.g.
            ``module.`` from DistributedDataParallel).

    Returns:
        The state dict, tensors on the CPU.

    Raises:
        WeightsNotFoundError: the file does not exist or is not a readable checkpoint.
        UnsafeCheckpointError: the file would need unpickling arbitrary Python objects.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {str(path)!r} does not exist")
    kind = _checkpoint_format(path)
    if kind == "safetensors":
        checkpoint = _safetensors_load(path)
    elif kind == "torch":
        checkpoint = _torch_load_safe(path)
    else:
        raise WeightsNotFoundError(f"{path} is not a weights file: {_EXPECTED}; {kind}")
    state_dict = checkpoint
    while isinstance(state_dict, dict):
        nested = [k for k in _NESTING_KEYS if isinstance(state_dict.get(k), dict)]
        if not nested:
            break
        state_dict = state_dict[nested[0]]
    if not isinstance(state_dict, dict) or not state_dict:
        raise WeightsNotFoundError(f"{path} holds no state dict (got "
                                   f"{type(state_dict).__name__}): {_EXPECTED}")
    state_dict = {k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    if not state_dict:
        raise WeightsNotFoundError(f"{path} holds no tensors: {_EXPECTED}")
    for prefix in strip_prefixes:
        if all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def _checkpoint_format(path: Path) -> str:
    """``"safetensors"`` or ``"torch"`` from a file's first bytes, else what it looks like."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except OSError as err:
        raise WeightsNotFoundError(f"cannot read weights file {path}: {err}") from err
    if head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip archive / legacy pickle
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and 8 + struct.unpack("<Q", head[:8])[0] <= size:
        return "safetensors"  # little-endian header length, then the JSON header
    if not head:
        return "the file is empty"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with the bytes {head!r}"
    return f"it starts with the text {text!r}"


# safetensors dtype names -> torch dtypes (the format's spec; little-endian data).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


def _safetensors_load(path: Path) -> dict:
    """A ``.safetensors`` file read tensor by tensor into memory of its own (no memory
    map: a model whose parameters these become keeps working when the file is replaced
    or rewritten in place, and nothing is held twice while loading).

    Raises:
        WeightsNotFoundError: a header or tensor that does not follow the format.
    """
    def bad(reason: str) -> WeightsNotFoundError:
        return WeightsNotFoundError(f"{path} is not a readable safetensors file ({reason}): "
                                    f"{_EXPECTED}")

    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > min(size - 8, 100 << 20):
                raise bad(f"a header of {header_len} bytes in a file of {size}")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise bad(f"its header is not JSON: {err}") from None
            if not isinstance(header, dict):
                raise bad("its header is not a JSON object")
            data_start = 8 + header_len
            tensors = {}
            for name, entry in header.items():
                if name == "__metadata__":
                    continue
                tensors[name] = _read_tensor(f, name, entry, data_start, size, bad)
            return tensors
    except OSError as err:
        raise WeightsNotFoundError(f"cannot read weights file {path}: {err}") from err


def _read_tensor(f, name: str, entry, data_start: int, size: int, bad) -> torch.Tensor:
    """One tensor of a safetensors file, read into a new tensor (checked against its
    header entry: dtype, shape, and offsets that stay inside the file)."""
    try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = [int(d) for d in entry["shape"]]
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise bad(f"tensor {name!r} has no usable dtype, shape or data_offsets") from None
    numel = math.prod(shape)
    nbytes = numel * torch.empty(0, dtype=dtype).element_size()
    if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes \
            or data_start + end > size:
        raise bad(f"tensor {name!r}: shape {shape} does not fit bytes {begin}..{end}")
    tensor = torch.empty(shape, dtype=dtype)
    f.seek(data_start + begin)
    if nbytes and f.readinto(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())) != nbytes:
        raise bad(f"tensor {name!r} is cut short")
    return tensor


def _torch_load_safe(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        message = str(err)
        if "GLOBAL" not in message and "Unsupported class" not in message:
            reason = _unpickler_reason(message)
            raise WeightsNotFoundError(f"{path} is not a readable torch checkpoint ({reason}): "
                                       f"{_EXPECTED}") from err
        raise UnsafeCheckpointError(
            f"{path} holds pickled Python objects, which lposs never unpickles "
            f"({_unpickler_reason(message)}). Re-save only its tensors, e.g. "
            "safetensors.torch.save_file(state_dict, 'model.safetensors'), in an environment "
            "you trust."
        ) from err
    except RuntimeError as err:
        if "TorchScript" in str(err):
            raise UnsafeCheckpointError(
                f"{path} is a TorchScript archive, which lposs does not execute; use the "
                "model's safetensors weights (e.g. the Hugging Face Hub copy) instead."
            ) from err
        reason = " ".join(str(err).split())[:200]
        raise WeightsNotFoundError(f"{path} is not a readable torch checkpoint ({reason}): "
                                   f"{_EXPECTED}") from err
    except Exception as err:  # noqa: BLE001 - any other failure of the reader (EOF, KeyError...)
        reason = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
        raise WeightsNotFoundError(f"{path} is not a readable torch checkpoint ({reason}): "
                                   f"{_EXPECTED}") from err


def _unpickler_reason(message: str) -> str:
    """The useful part of torch's weights-only unpickler message, on one line."""
    found = re.search(r"Unsupported (global: GLOBAL \S+|class \S+|operand \S+)", message)
    if found:
        return found.group(0)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "unpickling refused"


def find_in_weights_dir(stems: Sequence[str]) -> Path | None:
    """The first file ``$LPOSS_WEIGHTS/<stem><ext>`` that exists, stems first, then extensions.

    Args:
        stems: candidate file names without extension, most specific first.

    Returns:
        The path, or None when ``LPOSS_WEIGHTS`` is unset or holds none of them.
    """
    folder = os.environ.get(WEIGHTS_ENV)
    if not folder:
        return None
    folder = Path(folder).expanduser()
    for stem in stems:
        for ext in WEIGHT_EXTENSIONS:
            candidate = folder / f"{stem}{ext}"
            if candidate.is_file():
                return candidate
    return None


def find_in_hub(
    repo_id: str, filenames: Sequence[str], *, cache_dir: str | os.PathLike | None = None
) -> tuple[WeightsSource | None, str]:
    """A Hub file from the local cache, else downloaded when the Hub answers.

    Args:
        repo_id: Hugging Face Hub repository, e.g. ``timm/vit_base_patch16_224.dino``.
        filenames: files to try in order, e.g. ``("model.safetensors", "pytorch_model.bin")``.
        cache_dir: Hub cache folder (default: huggingface_hub's, ``~/.cache/huggingface``).

    Returns:
        ``(source, reason)``: the ``"hub"`` source with its local path (None when not
        found) and, when not found, why (offline, unreachable, missing on the Hub).
    """
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        return None, "huggingface_hub is not installed"
    cache = None if cache_dir is None else str(cache_dir)
    found = hub_cached(repo_id, filenames, cache_dir=cache_dir)
    if found is not None:
        return found, ""
    if constants.HF_HUB_OFFLINE or _env_true("HF_HUB_OFFLINE"):
        return None, "not in the Hugging Face Hub cache and HF_HUB_OFFLINE is set"
    reachable, why = _hub_reachable(constants.ENDPOINT)
    if not reachable:
        return None, f"not in the Hugging Face Hub cache and the Hub is unreachable ({why})"
    last_error = "no candidate file"
    for filename in filenames:
        try:
            path = huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=cache)
        except Exception as err:  # noqa: BLE001 - any Hub failure becomes the typed error
            last_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        return _hub_source(repo_id, filename, path), ""
    return None, f"download of {repo_id} failed ({last_error})"


def hub_cached(
    repo_id: str, filenames: Sequence[str], *, cache_dir: str | os.PathLike | None = None
) -> WeightsSource | None:
    """The first of ``filenames`` in the local Hugging Face Hub cache of ``repo_id``; no network.

    Returns:
        The ``"hub"`` source, or None when none is cached (or huggingface_hub is absent).
    """
    try:
        import huggingface_hub
    except ImportError:
        return None
    cache = None if cache_dir is None else str(cache_dir)
    for filename in filenames:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, cache_dir=cache)
        if isinstance(cached, str) and os.path.isfile(cached):
            return _hub_source(repo_id, filename, cached)
    return None


def _hub_source(repo_id: str, filename: str, path: str | os.PathLike) -> WeightsSource:
    """A Hub file's source; the revision is the commit folder of its cached snapshot."""
    parts = Path(path).parts
    revision = None
    if "snapshots" in parts[:-1]:  # <cache>/models--org--name/snapshots/<commit>/<file>
        revision = parts[len(parts) - 1 - parts[::-1].index("snapshots") + 1]
    return WeightsSource("hub", Path(path), repo=repo_id, revision=revision, file=filename)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_reachable(endpoint: str) -> tuple[bool, str]:
    """Whether a TCP connection to the Hub opens within a few seconds (skipped behind a proxy)."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme in urllib.request.getproxies():
        return True, ""  # the proxy decides; huggingface_hub reports its own errors
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return True, ""
    except OSError as err:
        return False, f"{url.hostname}:{port}: {err}"


def build_with_weights(
    build: Callable[[torch.device], torch.nn.Module],
    convert: Callable[[torch.nn.Module, dict], dict],
    state_dict: dict,
    path,
    name: str,
    *,
    fill: Callable[[torch.nn.Module], None] | None = None,
) -> torch.nn.Module:
    """A model whose parameters are the checkpoint's tensors, built without a second copy.

    The model is built on the meta device (no random initialisation, no memory) and
    loaded with ``load_state_dict(assign=True)``, so the loaded tensors become its
    parameters: loading takes the checkpoint's memory once instead of twice (a
    safetensors file's tensors stay mapped from the file). ``fill(model)`` then sets the
    buffers that checkpoints do not hold (e.g. CLIP's causal attention mask). A model
    that still has an unset tensor after that (an architecture with other such buffers)
    is built again on the CPU and loaded by copy, as ``load_state_dict`` usually does.

    Args:
        build: makes the architecture on the device it is given, without weights.
        convert: maps the checkpoint's keys to the model's: ``convert(model, state_dict)``.
        state_dict: the checkpoint (:func:`read_checkpoint`).
        path, name: the file and the model name, for the error message.
        fill: sets the model's non-persistent buffers after loading.

    Raises:
        WeightsNotFoundError: the checkpoint does not fit the model.
    """
    meta = torch.device("meta")
    with meta:
        model = build(meta)
    load_strict(model, convert(model, state_dict), path, name, assign=True)
    if fill is not None:
        fill(model)
    if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return model
    model = build(torch.device("cpu"))
    load_strict(model, convert(model, state_dict), path, name)
    return model


def load_strict(model: torch.nn.Module, state_dict: dict, path, name: str, *,
                assign: bool = False) -> None:
    """``model.load_state_dict(state_dict, strict=True, assign=assign)``, a mismatch as a
    typed error."""
    try:
        model.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:400]
        raise WeightsNotFoundError(
            f"{path} does not hold weights of {name!r} ({detail}); check the model name "
            "and the file"
        ) from err
