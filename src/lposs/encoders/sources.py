"""Which weights each encoder loads, decided before anything is loaded.

``resolve_clip_weights`` and ``resolve_dino_weights`` run the search of ``load_clip`` and
``load_dino`` (see :mod:`lposs.encoders.weights`) and return a :class:`WeightsSource`;
``resolve_weights`` does both and reports every missing model in one error, so a first
run without weights lists all that is missing at once.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ConfigError, WeightsNotFoundError
from .weights import (
    WEIGHTS_ENV,
    WeightsSource,
    find_in_hub,
    find_in_weights_dir,
    hub_cached,
)

__all__ = [
    "resolve_weights",
    "resolve_clip_weights",
    "resolve_dino_weights",
    "DINO_MODELS",
    "OPEN_CLIP_FILES",
]

# lposs names of the vision models -> timm model names (architecture.pretrained_tag).
DINO_MODELS = {
    "dino_vitb16": "vit_base_patch16_224.dino",
    "dino_vitb8": "vit_base_patch8_224.dino",
    "dinov2_vitb14": "vit_base_patch14_dinov2.lvd142m",
}
# OpenCLIP's own weight files in a Hub repository or a local-dir: folder, in its order.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def resolve_weights(
    *,
    clip: str,
    clip_pretrained: str | None,
    clip_weights: str | os.PathLike | None = None,
    dino: str | None = None,
    dino_weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[WeightsSource, WeightsSource | None]:
    """The weight sources of both encoders, found before either is loaded.

    Args:
        clip: OpenCLIP model name (see :func:`lposs.encoders.load_clip`).
        clip_pretrained: its pretrained tag; None: random weights.
        clip_weights: a local CLIP checkpoint instead of the search.
        dino: DINO model name (see :func:`lposs.encoders.load_dino`); None: no DINO.
        dino_weights: a local DINO checkpoint instead of the search.
        cache_dir: Hugging Face Hub cache folder (default: huggingface_hub's).

    Returns:
        ``(clip_source, dino_source)``, ``dino_source`` None when ``dino`` is None; pass
        them as ``weights=`` to ``load_clip`` / ``load_dino``.

    Raises:
        ConfigError: an unknown model name or pretrained tag.
        WeightsNotFoundError: weights of one or both models are missing; one message
            says, for each, how to provide them.
    """
    missing: list[str] = []
    clip_source = dino_source = None
    try:
        clip_source = resolve_clip_weights(clip, clip_pretrained, weights=clip_weights,
                                           cache_dir=cache_dir)
    except WeightsNotFoundError as err:
        missing.append(str(err))
    if dino is not None:
        try:
            dino_source = resolve_dino_weights(dino, weights=dino_weights, cache_dir=cache_dir)
        except WeightsNotFoundError as err:
            missing.append(str(err))
    if len(missing) == 1:
        raise WeightsNotFoundError(missing[0])
    if missing:
        raise WeightsNotFoundError(
            "weights of both models are missing. CLIP: " + missing[0] + " DINO: " + missing[1]
        )
    return clip_source, dino_source


def resolve_clip_weights(
    name: str = "ViT-B-16",
    pretrained: str | None = "laion2b_s34b_b88k",
    *,
    weights: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> WeightsSource:
    """Find where :func:`load_clip` would take the weights of ``name`` from, loading nothing.

    Args: as for :func:`load_clip`.

    Returns:
        The source: ``"file"`` (``weights``, a file given as ``pretrained``, one found in
        ``$LPOSS_WEIGHTS`` or the file of a ``local-dir:`` folder), ``"hub"`` (the
        Hugging Face Hub cache, or downloaded when the Hub answers; for ``hf-hub:``
        names, the repository OpenCLIP downloads from) or ``"random"``.

    Raises:
        ConfigError: unknown model name or pretrained tag.
        WeightsNotFoundError: ``weights`` does not exist, or no weights were found; the
            message lists how to provide them.
    """
    from open_clip.factory import parse_model_name

    tag_cfg = clip_tag_config(name, pretrained, weights)
    schema, identifier = parse_model_name(name)
    if schema is None and weights is None and pretrained is not None and os.path.isfile(pretrained):
        weights = pretrained  # OpenCLIP also accepts a file as `pretrained`
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {str(path)!r} does not exist (CLIP "
                                       f"model {name!r})")
        return WeightsSource("file", path)
    if schema == "local-dir":  # OpenCLIP loads the folder's own file, or none (random)
        found = local_dir_weights(identifier)
        return WeightsSource("file", found) if found is not None else WeightsSource("random")
    if schema == "hf-hub":
        return (hub_cached(identifier, OPEN_CLIP_FILES, cache_dir=cache_dir)
                or WeightsSource("hub", repo=identifier))
    if pretrained is None:
        return WeightsSource("random")
    return _find_clip_weights(name, pretrained, tag_cfg, cache_dir)


def resolve_dino_weights(
    name: str = "dino_vitb16",
    *,
    weights: str | os.PathLike | None = None,
    pretrained: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> WeightsSource:
    """Find where :func:`load_dino` would take the weights of ``name`` from, loading nothing.

    Args: as for :func:`load_dino`.

    Returns:
        The source: ``"file"`` (``weights``, or found in ``$LPOSS_WEIGHTS``), ``"hub"``
        (the Hugging Face Hub cache, or downloaded when the Hub answers) or ``"random"``.

    Raises:
        ConfigError: unknown model name.
        WeightsNotFoundError: ``weights`` does not exist, or no weights were found; the
            message lists how to provide them.
    """
    timm_name, cfg = timm_name_and_config(name)
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"weights file {str(path)!r} does not exist (DINO "
                                       f"model {name!r})")
        return WeightsSource("file", path)
    if not pretrained:
        return WeightsSource("random")
    original = os.path.basename(cfg.get("url") or "").rsplit(".", 1)[0]
    local = find_in_weights_dir([s for s in dict.fromkeys([name, timm_name, original]) if s])
    if local is not None:
        return WeightsSource("file", local)
    repo_id = cfg.get("hf_hub_id")
    reason = f"timm has no Hugging Face Hub copy of {timm_name}"
    if repo_id:
        files = [cfg.get("hf_hub_filename") or "model.safetensors", "pytorch_model.bin"]
        found, reason = find_in_hub(repo_id, list(dict.fromkeys(files)), cache_dir=cache_dir)
        if found is not None:
            return found
    hub_hint = f"`hf download {repo_id} model.safetensors`" if repo_id else "timm while online"
    raise WeightsNotFoundError(
        f"no weights for vision model {name!r} (timm {timm_name}): {reason}. Provide them in "
        f"one of these ways: pass a local checkpoint with --dino-weights PATH (command line) or "
        f"load_dino(..., weights=PATH) (.safetensors, .pt, .pth, .bin; the original "
        f"facebookresearch files work too); or put '{name}.safetensors' (or .pt/.pth/.bin, or "
        f"'{timm_name}.safetensors') in the folder named by the {WEIGHTS_ENV} environment "
        f"variable; or download them once while online ({hub_hint}) so the Hugging Face Hub "
        "cache holds them."
    )


def clip_tag_config(name: str, pretrained: str | None, weights) -> dict:
    """OpenCLIP's config of the pretrained tag (empty without one); checks name and tag."""
    import open_clip
    from open_clip.factory import parse_model_name

    if not isinstance(name, str) or open_clip.get_model_config(name) is None:
        raise ConfigError(f"{name!r} is not an OpenCLIP model name (see "
                          "open_clip.list_models()) nor a local-dir:/path OpenCLIP folder")
    if parse_model_name(name)[0] is not None or pretrained is None or os.path.isfile(pretrained):
        return {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
    if not tag_cfg and weights is None:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise ConfigError(f"pretrained {pretrained!r} is not a tag of {name}; known: {tags}")
    return tag_cfg


def local_dir_weights(folder: str) -> Path | None:
    """The weight file OpenCLIP loads from a ``local-dir:`` folder (its own choice when it
    exposes it, else the first of its default names); None when there is none."""
    from open_clip import factory

    choose = getattr(factory, "_find_checkpoint_in_dir", None)
    if callable(choose):
        found = choose(Path(folder))
        return Path(found) if found else None
    return next((Path(folder) / f for f in OPEN_CLIP_FILES if (Path(folder) / f).is_file()),
                None)


def _find_clip_weights(name: str, pretrained: str, tag_cfg: dict, cache_dir) -> WeightsSource:
    local = find_in_weights_dir([f"{name}-{pretrained}", name])
    if local is not None:
        return WeightsSource("file", local)
    repo_and_file = tag_cfg.get("hf_hub", "")
    reason = "the pretrained tag has no Hugging Face Hub copy"
    if repo_and_file:
        if repo_and_file.endswith("/"):  # a repository holding OpenCLIP's default file names
            repo_id = repo_and_file.rstrip("/")
            files = list(OPEN_CLIP_FILES)
        else:  # "org/repo/filename"
            repo_id, filename = os.path.split(repo_and_file)
            stem = filename.rsplit(".", 1)[0]
            files = [f"{stem}.safetensors", filename] if filename.endswith(".bin") else [filename]
        found, reason = find_in_hub(repo_id, files, cache_dir=cache_dir)
        if found is not None:
            return found
        hub_hint = f"`hf download {repo_id} {files[0]}`"
    else:
        hub_hint = "OpenCLIP while online"
    raise WeightsNotFoundError(
        f"no weights for CLIP model {name!r} (pretrained={pretrained!r}): {reason}. Provide "
        f"them in one of these ways: pass a local checkpoint with --clip-weights PATH (command "
        f"line) or load_clip(..., weights=PATH) (.safetensors, .pt, .pth, .bin); or put "
        f"'{name}-{pretrained}.safetensors' (or .pt/.pth/.bin) in the folder named by the "
        f"{WEIGHTS_ENV} environment variable; or download them once while online "
        f"({hub_hint}) so the Hugging Face Hub cache holds them."
    )


def timm_name_and_config(name: str) -> tuple[str, dict]:
    """The timm model name of ``name`` and its pretrained config (a dict, maybe empty)."""
    import timm
    from timm.models import get_pretrained_cfg

    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    timm_name = DINO_MODELS.get(name, name)
    if not timm.is_model(timm_name) or not timm_name.startswith("vit_"):
        raise ConfigError(f"name {name!r} is not one of {sorted(DINO_MODELS)} nor a timm ViT name")
    try:
        cfg = get_pretrained_cfg(timm_name)
    except RuntimeError as err:  # an unknown pretrained tag
        raise ConfigError(f"name {name!r}: {err}") from err
    return timm_name, cfg.to_dict() if cfg is not None else {}
