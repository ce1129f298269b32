"""What lposs keeps across runs: the cache folder, and the digests of weight files.

The cache folder is ``$LPOSS_CACHE``, else ``$XDG_CACHE_HOME/lposs``, else
``~/.cache/lposs``. The sha256 of a weight file (:func:`lposs.output.files.file_sha256`)
is remembered in ``<cache>/file-sha256.json``, keyed by the file's resolved path, size,
modification time (ns) and inode, so a replaced file is hashed again and an unchanged one
is not (hashing the two models' files takes seconds).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..output.files import atomic_write, file_sha256

__all__ = ["CACHE_ENV", "cache_root", "remembered_sha256", "text_cache_folder"]

CACHE_ENV = "LPOSS_CACHE"  # folder for caches kept across runs (default ~/.cache/lposs)
_DIGEST_INDEX = "file-sha256.json"  # {resolved path: {size, mtime_ns, inode, sha256}}


def cache_root() -> Path:
    """The folder of caches kept across runs (it may not exist yet)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lposs"


def text_cache_folder(model: str, overrides: dict, weights_id: str) -> Path | None:
    """Where text embeddings of a CLIP model persist: ``<cache>/text/<model>-<key>``, the key
    a digest of the model name, its architecture overrides and its weights' ``weights_id``;
    None for weights without a content digest (random ones)."""
    if "sha256:" not in weights_id:
        return None
    key = json.dumps({"model": model, "overrides": overrides, "weights": weights_id},
                     sort_keys=True, default=str).encode()
    label = "".join(c if c.isalnum() or c in "-._" else "_" for c in model)
    return cache_root() / "text" / f"{label}-{hashlib.sha256(key).hexdigest()[:24]}"


def remembered_sha256(path: str | os.PathLike) -> str:
    """``file_sha256(path)`` (64 hex digits), looked up in the cache folder's index and
    computed only when the file is new or changed; an index that cannot be read or
    written costs only the hashing. Symbolic links are followed (Hub snapshots)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    identity = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "inode": stat.st_ino}
    index_path = cache_root() / _DIGEST_INDEX
    known = _read_index(index_path).get(str(path))
    if isinstance(known, dict) and all(known.get(k) == v for k, v in identity.items()):
        digest = known.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    digest = file_sha256(path)
    index = _read_index(index_path)  # read again: another process may have added entries
    index = {name: entry for name, entry in index.items() if os.path.isfile(name)}
    index[str(path)] = {**identity, "sha256": digest}
    try:
        index_path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(index, indent=1, sort_keys=True).encode()
        atomic_write(index_path, lambda f: f.write(text))
    except OSError:  # a read-only cache folder only costs hashing again next time
        pass
    return digest


def _read_index(index_path: Path) -> dict:
    try:
        index = json.loads(index_path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}
