"""Where each encoder's weights come from, decided before anything is loaded, and their identity.

``load_clip`` / ``load_dino`` search, in order: ``weights=PATH`` (``--clip-weights`` /
``--dino-weights``), as is; ``$LPOSS_WEIGHTS/<stem><ext>``, ``ext`` one of
:data:`WEIGHT_EXTENSIONS` (``ViT-B-16-laion2b_s34b_b88k.safetensors``,
``dino_vitb16.safetensors``); the Hugging Face Hub cache (files OpenCLIP / timm downloaded
before); a Hub download, only when the Hub answers (offline, ``HF_HUB_OFFLINE=1``, or with
no route to the Hub this fails at once with :class:`WeightsNotFoundError`). The result is a
:class:`WeightsSource`; its ``info()`` is the provenance record encoders expose as
``weights_info``, and :func:`weights_id` the one string every cache key and identity check
uses for those weights.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, WeightsNotFoundError
from .cache import remembered_sha256

__all__ = ["WEIGHTS_ENV", "WEIGHT_EXTENSIONS", "DINO_MODELS", "OPEN_CLIP_FILES",
           "WeightsSource", "weights_id", "resolve_weights", "resolve_clip_weights",
           "resolve_dino_weights", "clip_tag_config", "local_dir_weights",
           "timm_name_and_config", "hub_cached", "find_in_hub", "weight_file"]

WEIGHTS_ENV = "LPOSS_WEIGHTS"  # environment variable naming a folder of weight files
WEIGHT_EXTENSIONS = (".safetensors", ".pt", ".pth", ".bin")  # searched in this order
# lposs names of the vision models -> timm model names (architecture.pretrained_tag).
DINO_MODELS = {
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
}
# OpenCLIP's own weight files in a Hub repository or a local-dir: folder, in its order.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_HUB_PROBE_TIMEOUT_S = 3.0  # seconds to wait for a TCP connection to the Hub


@dataclass(frozen=True)
class WeightsSource:
    """Where one model's weights come from.

    Attributes:
        source: ``"file"`` (a local file given or found in ``$LPOSS_WEIGHTS``), ``"hub"``
            (a Hugging Face Hub file, from its local cache) or ``"random"`` (no weights).
        path: the local file that is read; None for random weights.
        repo, revision, file: for ``"hub"``: the repository, the commit of the cached
            snapshot holding the file, and the file's name in the repository.
    """

    source: str
    path: Path | None = None
    repo: str | None = None
    revision: str | None = None
    file: str | None = None

    def info(self) -> dict:
        """The provenance record: ``source`` and, where they apply, ``path``, ``repo``,
        ``revision``, ``file`` and the file's ``sha256`` (hex)."""
        record = {"source": self.source}
        for key in ("path", "repo", "revision", "file"):
            if getattr(self, key) is not None:
                record[key] = str(getattr(self, key))
        if self.path is not None and Path(self.path).is_file():
            record["sha256"] = remembered_sha256(self.path)
        return record


def weights_id(info: dict) -> str:
    """The identity of an encoder's weights from its ``weights_info``, as one string:
    ``"sha256:<hex>"`` for a file, ``"hub:<repo>@<revision>/<file>#sha256:<hex>"`` for a
    Hub file, ``"random"`` for none (``"unknown"`` for a model wrapped directly)."""
    source = info.get("source", "unknown")
    if source == "file":
        return f"sha256:{info.get('sha256')}"
    if source == "hub":
        hub = f"hub:{info.get('repo')}@{info.get('revision')}/{info.get('file')}"
        return hub + (f"#sha256:{info['sha256']}" if "sha256" in info else "")
    return str(source)


def resolve_weights(*, clip: str, clip_pretrained: str | None,
                    clip_weights: str | os.PathLike | None = None, dino: str | None = None,
                    dino_weights: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None,
                    ) -> tuple[WeightsSource, WeightsSource | None]:
    """The weight sources of both encoders (``dino`` None: no DINO), found before either is
    loaded; pass them as ``weights=`` to ``load_clip`` / ``load_dino``.

    Raises:
        ConfigError: an unknown model name or pretrained tag.
        WeightsNotFoundError: a given file is missing, or weights of one or both models
            are found nowhere; one short message names every missing model.
    """
    searches = [lambda: resolve_clip_weights(clip, clip_pretrained, weights=clip_weights,
                                             cache_dir=cache_dir),
                lambda: resolve_dino_weights(dino, weights=dino_weights, cache_dir=cache_dir)]
    sources, missing = [], []
    for search in searches[: 1 if dino is None else 2]:
        try:
            sources.append(search())
        except WeightsNotFoundError as err:
            if not hasattr(err, "missing"):
                raise
            missing += err.missing
    if missing:
        raise _no_weights(missing)
    return sources[0], sources[1] if dino is not None else None


def resolve_clip_weights(name: str = "ViT-B-16", pretrained: str | None = "laion2b_s34b_b88k",
                         *, weights: str | os.PathLike | None = None,
                         cache_dir: str | os.PathLike | None = None) -> WeightsSource:
    """Where :func:`load_clip` takes the weights of ``name`` from (arguments as there):
    ``weights``, a file given as ``pretrained``, ``$LPOSS_WEIGHTS``, the file of a
    ``local-dir:`` folder, the Hub (``hf-hub:`` names: the repository OpenCLIP downloads
    from), or random weights. Loads nothing.

    Raises:
        ConfigError: unknown model name or pretrained tag.
        WeightsNotFoundError: ``weights`` is not a file, or no weights were found.
    """
    from open_clip.factory import parse_model_name

    tag_cfg = clip_tag_config(name, pretrained, weights)
    schema, identifier = parse_model_name(name)
    if schema is None and weights is None and pretrained is not None and os.path.isfile(pretrained):
        weights = pretrained  # OpenCLIP also accepts a file as `pretrained`
    if weights is not None:
        return WeightsSource("file", weight_file(weights, f"CLIP model {name!r}"))
    if schema == "local-dir":  # OpenCLIP loads the folder's own file, or none (random)
        found = local_dir_weights(identifier)
        return WeightsSource("file", found) if found is not None else WeightsSource("random")
    if schema == "hf-hub":
        return (hub_cached(identifier, OPEN_CLIP_FILES, cache_dir=cache_dir)
                or WeightsSource("hub", repo=identifier))
    if pretrained is None:
        return WeightsSource("random")
    stem = f"{name}-{pretrained}"
    repo_id, files = _clip_hub_files(tag_cfg.get("hf_hub", ""))
    return _search([stem, name], repo_id, files, cache_dir,
                   (f"CLIP model {name!r} (pretrained {pretrained!r})",
                    "the pretrained tag has no Hugging Face Hub copy", "--clip-weights",
                    f"{stem}.safetensors", "OpenCLIP while online"))


def resolve_dino_weights(name: str = "dino_vitb16", *,
                         weights: str | os.PathLike | None = None, pretrained: bool = True,
                         cache_dir: str | os.PathLike | None = None) -> WeightsSource:
    """Where :func:`load_dino` takes the weights of ``name`` from (arguments as there):
    ``weights``, ``$LPOSS_WEIGHTS``, the Hub, or random weights. Loads nothing.

    Raises:
        ConfigError: unknown model name.
        WeightsNotFoundError: ``weights`` is not a file, or no weights were found.
    """
    timm_name, cfg = timm_name_and_config(name)
    if weights is not None:
        return WeightsSource("file", weight_file(weights, f"DINO model {name!r}"))
    if not pretrained:
        return WeightsSource("random")
    original = os.path.basename(cfg.get("url") or "").rsplit(".", 1)[0]
    files = [cfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin"]
    return _search([s for s in dict.fromkeys([name, timm_name, original]) if s],
                   cfg.get("hf_hub_id"), list(dict.fromkeys(files)), cache_dir,
                   (f"DINO model {name!r}", f"timm has no Hugging Face Hub copy of {timm_name}",
                    "--dino-weights", f"{name}.safetensors", "timm while online"))


def weight_file(path: str | os.PathLike, model: str) -> Path:
    """``path`` checked to be a file; ``model`` (e.g. ``"CLIP model 'ViT-B-16'"``) is named
    in the ``WeightsNotFoundError``."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise WeightsNotFoundError(f"weights {str(path)!r} ({model}) is a directory; a weight "
                                   f"file is expected ({', '.join(WEIGHT_EXTENSIONS)})")
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file {str(path)!r} ({model}) does not exist")
    return path


def _search(stems: Sequence[str], repo_id: str | None, files: Sequence[str], cache_dir,
            missing: tuple[str, ...]) -> WeightsSource:
    """The first ``$LPOSS_WEIGHTS/<stem><ext>``, else a Hub file of ``repo_id``, else the
    error for ``missing = (model, reason without a repository, flag, file name, download
    without a repository)``."""
    folder = os.environ.get(WEIGHTS_ENV)
    candidates = (Path(folder).expanduser() / f"{s}{e}" for s in stems
                  for e in WEIGHT_EXTENSIONS) if folder else ()
    found = next((path for path in candidates if path.is_file()), None)
    if found is not None:
        return WeightsSource("file", found)
    model, reason, flag, file_name, download = missing
    if repo_id:
        source, reason = find_in_hub(repo_id, files, cache_dir=cache_dir)
        if source is not None:
            return source
        download = f"hf download {repo_id} {files[0]}"
    raise _no_weights([(model, reason, flag, file_name, download)])


def _no_weights(missing: list[tuple[str, ...]]) -> WeightsNotFoundError:
    """The error for models found nowhere; ``missing`` holds per model ``(model, reason,
    flag, file name in $LPOSS_WEIGHTS, download command)``. It keeps them as ``.missing``."""
    models, reasons, flags, files, downloads = zip(*missing)
    lines = [f"no weights for {' nor '.join(models)}: {'; '.join(dict.fromkeys(reasons))}.",
             f"Give {' and '.join(f + ' PATH' for f in flags)} (in Python: weights=PATH),",
             f"or put {' and '.join(files)} in the folder ${WEIGHTS_ENV},",
             f"or download once while online: {downloads[0]}",
             *(f"  and {command}" for command in downloads[1:])]
    err = WeightsNotFoundError("\n  ".join(lines))
    err.missing = missing
    return err


def clip_tag_config(name: str, pretrained: str | None, weights) -> dict:
    """OpenCLIP's config of the pretrained tag (empty without one); checks name and tag.

    Raises:
        ConfigError: an unknown model name or pretrained tag.
        WeightsNotFoundError: a ``local-dir:`` folder that is missing or holds no
            ``open_clip_config.json``.
    """
    import open_clip
    from open_clip.factory import parse_model_name

    schema, identifier = parse_model_name(name) if isinstance(name, str) else (None, None)
    if schema == "local-dir" and not (Path(identifier) / "open_clip_config.json").is_file():
        what = "has no open_clip_config.json" if Path(identifier).is_dir() else "is not a folder"
        raise WeightsNotFoundError(
            f"CLIP model {name!r}: {identifier!r} {what}; a local-dir: folder holds OpenCLIP's "
            "open_clip_config.json and its weights (open_clip_model.safetensors)")
    if not isinstance(name, str) or open_clip.get_model_config(name) is None:
        raise ConfigError(f"{name!r} is not an OpenCLIP model name (see "
                          "open_clip.list_models()) nor a local-dir:/path OpenCLIP folder")
    if schema is not None or pretrained is None or os.path.isfile(pretrained):
        return {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if not tag_cfg and weights is None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"pretrained {pretrained!r} is not a tag of {name}; known: {tags}")
    return tag_cfg


def local_dir_weights(folder: str) -> Path | None:
    """The weight file OpenCLIP loads from a ``local-dir:`` folder (its own choice); None
    when there is none."""
    from open_clip.factory import _find_checkpoint_in_dir

    found = _find_checkpoint_in_dir(Path(folder))
    return Path(found) if found else None


def _clip_hub_files(repo_and_file: str) -> tuple[str, list[str]]:
    """OpenCLIP's ``hf_hub`` entry as ``(repository, files to try)``; ``("", [])`` for none."""
    if not repo_and_file:
        return "", []
    if repo_and_file.endswith("/"):  # a repository holding OpenCLIP's default file names
        return repo_and_file.rstrip("/"), list(OPEN_CLIP_FILES)
    repo_id, filename = os.path.split(repo_and_file)  # "org/repo/filename"
    stem = filename.rsplit(".", 1)[0]
    return repo_id, [f"{stem}.safetensors", filename] if filename.endswith(".bin") else [filename]


def timm_name_and_config(name: str) -> tuple[str, dict]:
    """The timm model name of ``name`` and its pretrained config (a dict, maybe empty).

    Raises:
        ConfigError: ``name`` is neither a key of :data:`DINO_MODELS` nor a timm ViT.
    """
    import timm
    from timm.models import get_pretrained_cfg

    timm_name = DINO_MODELS.get(name, name) if isinstance(name, str) else ""
    if not timm.is_model(timm_name) or not timm_name.startswith("vit_"):
        raise ConfigError(f"name {name!r} is not one of {sorted(DINO_MODELS)} nor a timm ViT name")
    try:
        cfg = get_pretrained_cfg(timm_name)
    except RuntimeError as err:  # an unknown pretrained tag
        raise ConfigError(f"name {name!r}: {err}") from err
    return timm_name, cfg.to_dict() if cfg is not None else {}


def find_in_hub(repo_id: str, filenames: Sequence[str], *,
                 cache_dir: str | os.PathLike | None) -> tuple[WeightsSource | None, str]:
    """A Hub file from the local cache, else downloaded when the Hub answers: ``(source,
    "")``, or ``(None, why not)`` (offline, unreachable, missing on the Hub)."""
    import huggingface_hub
    from huggingface_hub import constants

    found = hub_cached(repo_id, filenames, cache_dir=cache_dir)
    if found is not None:
        return found, ""
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if constants.HF_HUB_OFFLINE or offline:
        return None, "not in the Hugging Face Hub cache and HF_HUB_OFFLINE is set"
    why = _hub_unreachable(constants.ENDPOINT)
    if why:
        return None, f"not in the Hugging Face Hub cache and the Hub is unreachable ({why})"
    last_error = "no candidate file"
    for filename in filenames:
        try:
            path = huggingface_hub.hf_hub_download(
                repo_id, filename, cache_dir=None if cache_dir is None else str(cache_dir))
        except Exception as err:  # noqa: BLE001 - any Hub failure becomes the typed error
            last_error = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            continue
        return _hub_source(repo_id, filename, path), ""
    return None, f"download of {repo_id} failed ({last_error})"


def hub_cached(repo_id: str, filenames: Sequence[str], *,
               cache_dir: str | os.PathLike | None = None) -> WeightsSource | None:
    """The first of ``filenames`` in the local Hugging Face Hub cache of ``repo_id`` (no
    network), as a ``"hub"`` source; None when none is cached."""
    import huggingface_hub

    for filename in filenames:
        cached = huggingface_hub.try_to_load_from_cache(
            repo_id, filename, cache_dir=None if cache_dir is None else str(cache_dir))
        if isinstance(cached, str) and os.path.isfile(cached):
            return _hub_source(repo_id, filename, cached)
    return None


def _hub_source(repo_id: str, filename: str, path: str | os.PathLike) -> WeightsSource:
    """A Hub file's source; the revision is the commit folder of its cached snapshot."""
    parts = Path(path).parts
    revision = None
    if "snapshots" in parts[:-1]:  # <cache>/models--org--name/snapshots/<commit>/<file>
        revision = parts[len(parts) - parts[::-1].index("snapshots")]
    return WeightsSource("hub", Path(path), repo=repo_id, revision=revision, file=filename)


def _hub_unreachable(endpoint: str) -> str:
    """Why no TCP connection to the Hub opens within a few seconds; "" when one does (or
    behind a proxy, which decides)."""
    url = urllib.parse.urlsplit(endpoint)
    if url.scheme in urllib.request.getproxies():
        return ""
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_HUB_PROBE_TIMEOUT_S):
            return ""
    except OSError as err:
        return f"{url.hostname}:{port}: {err}"
