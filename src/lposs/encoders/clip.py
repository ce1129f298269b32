"""The vision-language model: an OpenCLIP ViT used the MaskCLIP way, and its text encoder.

Dense features (METHOD.md, Encoders) are :func:`lposs.predictors.maskclip.dense_features`:
the last block's self-attention replaced by its value path, then ``ln_post``, the class
token dropped and the visual projection. Text: prompt-ensembled embeddings, cached per
synonym in memory and, for weights with a content digest, on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from functools import lru_cache, partial
from importlib import resources
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ClassNamesError
from ..output.files import atomic_write
from ..vocab import split_synonyms
from .cache import text_cache_folder
from .common import DenseEncoder
from .device import PRECISIONS, resolve_device, resolve_precision
from .sources import (
    OPEN_CLIP_FILES,
    WeightsSource,
    clip_tag_config,
    hub_cached,
    local_dir_weights,
    resolve_clip_weights,
    weights_id,
)
from .weights import build_with_weights, read_checkpoint

__all__ = ["ClipEncoder", "load_clip", "imagenet_templates"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP pixel mean (RGB)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # OpenAI CLIP pixel std (RGB)
_TEXT_BATCH = 640  # prompts per text-encoder forward pass
_UNIT_NORM_TOLERANCE = 1e-3  # a cached text embedding further from norm 1 is recomputed
# Version of the text-embedding computation; bump it when the numbers it gives change, so
# that embeddings cached on disk by an older version are not reused.
TEXT_EMBEDDING_VERSION = 2


@lru_cache(maxsize=1)
def imagenet_templates() -> tuple[str, ...]:
    """The 80 ImageNet prompt templates of CLIP, each with one ``{}`` for the class name."""
    text = resources.files("lposs").joinpath("data", "prompt_templates.json").read_text("utf-8")
    return tuple(json.loads(text)["imagenet_templates"])


class ClipEncoder(DenseEncoder):
    """A frozen OpenCLIP model giving MaskCLIP dense features and prompt-ensembled text.

    Args:
        model: an ``open_clip.CLIP`` whose ``visual`` is a plain OpenCLIP ViT.
        tokenizer: the model's open_clip tokenizer (``open_clip.get_tokenizer(name)``).
        mean, std: pixel mean and std (RGB); default: the model's preprocessing config,
            else CLIP's.
        templates: prompt templates with one ``{}``; default: the 80 ImageNet templates.
        text_cache_dir: a folder keeping text embeddings of these exact weights across
            processes (``load_clip`` picks it by ``weights_id``); None: memory only.

    Attributes:
        model: the wrapped OpenCLIP model.
        patch_size: P, the vision transformer's patch size in pixels.
        embed_dim: E, the joint embedding size (512 for ViT-B-16).
        text_cache: ``{synonym: (E,) float32 embedding}`` of every name encoded so far.
    """

    def __init__(self, model: nn.Module, tokenizer, *, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, templates: Sequence[str] | None = None,
                 text_cache_dir: str | os.PathLike | None = None) -> None:
        visual = getattr(model, "visual", None)
        if not hasattr(visual, "conv1") or not hasattr(visual, "transformer"):
            raise TypeError("model must be an OpenCLIP CLIP model with a VisionTransformer tower")
        if getattr(visual, "attn_pool", None) is not None or not isinstance(
                visual.transformer.resblocks[-1].attn, nn.MultiheadAttention):
            raise ValueError("only plain OpenCLIP ViTs are supported (nn.MultiheadAttention, "
                             "no attentional pooling)")
        super().__init__(mean or getattr(visual, "image_mean", None) or CLIP_MEAN,
                         std or getattr(visual, "image_std", None) or CLIP_STD,
                         visual.conv1.weight.device)
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.embed_dim = int(visual.proj.shape[1]) if visual.proj is not None else visual.width
        self.templates = tuple(templates) if templates is not None else imagenet_templates()
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("templates must be a non-empty list of strings with one '{}' each")
        self.text_cache: dict[str, torch.Tensor] = {}
        self.text_cache_dir = Path(text_cache_dir) if text_cache_dir is not None else None

    def _dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        from ..predictors.maskclip import dense_features  # here: predictors import encoders

        return dense_features(self.model.visual, x)

    @torch.inference_mode()
    def encode_classes(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt-ensembled text embeddings, one row per ``;``-separated synonym: each
        synonym in every template, encoded, L2-normalised, averaged over the templates and
        L2-normalised again. A disk-cache file without a finite unit vector of this size is
        recomputed, rewritten and named in a warning.

        Args:
            names: C class names (checked by :func:`lposs.vocab.vocabulary` where they
                enter); ``"person; man; woman"`` gives three rows for one class.

        Returns:
            ``(embeddings, class_index)``: ``(C', E)`` float32 unit vectors on the model's
            device and ``(C',)`` int64, the position in ``names`` of each row's class.

        Raises:
            ClassNamesError: a synonym too long for the text context (77 tokens for
                OpenCLIP, templates included): cut, it could not be told from another.
        """
        rows, index = [], []
        for position, name in enumerate(names):
            synonyms = split_synonyms(name)
            rows += synonyms
            index += [position] * len(synonyms)
        damaged: list[Path] = []
        missing = [s for s in dict.fromkeys(rows) if not self._recall(s, damaged)]
        if damaged:
            more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
            warnings.warn(f"text-embedding cache file {damaged[0]}{more} held no finite unit "
                          "vector of this model; recomputed and rewritten", stacklevel=2)
        if missing:
            for synonym, embedding in zip(missing, self._encode_texts(missing), strict=True):
                self.text_cache[synonym] = embedding
                self._store(synonym, embedding)
        embeddings = torch.stack([self.text_cache[s] for s in rows])
        return embeddings, torch.tensor(index, dtype=torch.long, device=embeddings.device)

    def _disk_path(self, synonym: str) -> Path | None:
        """The cache file of ``synonym``, keyed also by the dtype, tokenizer and templates."""
        if self.text_cache_dir is None:
            return None
        tokenizer = type(self.tokenizer)
        key = "\n".join([
            f"text-embedding-v{TEXT_EMBEDDING_VERSION}", str(self._dtype()),
            f"{tokenizer.__module__}.{tokenizer.__qualname__}",
            f"context_length={getattr(self.tokenizer, 'context_length', None)}",
            f"model_context_length={getattr(self.model, 'context_length', None)}",
            json.dumps(self.templates), synonym]).encode()
        return self.text_cache_dir / f"{hashlib.sha256(key).hexdigest()[:40]}.pt"

    def _recall(self, synonym: str, damaged: list[Path]) -> bool:
        """Whether ``synonym``'s embedding is in memory, after reading it from disk when it
        is there; a file that holds no finite ``(E,)`` unit vector is added to ``damaged``."""
        path = self._disk_path(synonym)
        if synonym in self.text_cache or path is None or not path.is_file():
            return synonym in self.text_cache
        try:
            embedding = torch.load(path, map_location=self.mean.device, weights_only=True)
        except Exception:  # noqa: BLE001 - any unreadable file is a damaged entry
            embedding = None
        if not (torch.is_tensor(embedding) and embedding.is_floating_point()
                and embedding.shape == (self.embed_dim,)
                and bool(torch.isfinite(embedding).all())
                and abs(float(embedding.float().norm()) - 1.0) <= _UNIT_NORM_TOLERANCE):
            damaged.append(path)
            return False
        self.text_cache[synonym] = embedding.float()
        return True

    def _store(self, synonym: str, embedding: torch.Tensor) -> None:
        path = self._disk_path(synonym)
        try:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda f: torch.save(embedding.cpu().clone(), f))
        except OSError:  # a read-only cache only costs speed
            pass

    def _encode_texts(self, synonyms: list[str]) -> torch.Tensor:
        """``(S, E)`` prompt-ensembled embeddings of S synonyms."""
        prompts = [t.format(s) for s in synonyms for t in self.templates]
        tokens = self.tokenizer(prompts).to(self.mean.device)
        # Prompts of one token length at a time: no pass computes padding (~1.4x less work).
        lengths = (tokens != 0).sum(dim=1)
        full = lengths.view(len(synonyms), len(self.templates)) >= tokens.shape[1]
        if bool(full.any()):  # the tokenizer cut the prompt to its context: refuse
            synonym = synonyms[int(full.any(dim=1).nonzero()[0])]
            raise ClassNamesError(
                f"class name {synonym[:60]!r}{'...' if len(synonym) > 60 else ''} is too long for "
                f"the text encoder: in the prompt templates it fills CLIP's "
                f"{tokens.shape[1]}-token context and would be cut, so names that differ only "
                "after that point would get the same embedding; shorten it")
        feats = torch.empty(len(prompts), self.embed_dim, device=tokens.device)
        for length in lengths.unique().tolist():
            for rows in (lengths == length).nonzero().squeeze(1).split(_TEXT_BATCH):
                feats[rows] = self._encode_tokens(tokens[rows]).float()
        feats = F.normalize(feats, dim=-1).view(len(synonyms), len(self.templates), -1)
        return F.normalize(feats.mean(dim=1), dim=-1)

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``model.encode_text`` over only the first L token positions, L = the longest
        prompt: `(B, 77)` int -> `(B, E)`. Exact for causal towers pooled at the end-of-text
        token (no earlier position attends to the padding after it); ~4x less work."""
        model = self.model
        mask = getattr(model, "attn_mask", None)
        if mask is None or getattr(model, "text_pool_type", None) != "argmax":
            return model.encode_text(tokens)
        length = int((tokens != 0).sum(dim=1).max())  # padding is 0, after the end-of-text
        tokens = tokens[:, :length]
        cast = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast) + model.positional_embedding[:length].to(cast)
        x = model.ln_final(model.transformer(x, attn_mask=mask[:length, :length]))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]  # end-of-text
        projection = model.text_projection
        if projection is None:
            return x
        return projection(x) if isinstance(projection, nn.Linear) else x @ projection


def load_clip(
    name: str = "ViT-B-16",
    pretrained: str | None = "laion2b_s34b_b88k",
    *,
    weights: str | os.PathLike | WeightsSource | None = None,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    cache_dir: str | os.PathLike | None = None,
    **model_kwargs,
) -> ClipEncoder:
    """Build an OpenCLIP ViT as a frozen :class:`ClipEncoder`; ``weights_info`` says where
    its weights came from (searched as :mod:`lposs.encoders.sources` says).

    Args:
        name: OpenCLIP model name (``open_clip.list_models()``), a plain ViT.
        pretrained: OpenCLIP pretrained tag (or, as in OpenCLIP, a checkpoint file);
            None (and no ``weights``): random weights.
        weights: a local checkpoint of the full CLIP model, or a ``WeightsSource``.
        device: where the model runs (default: CPU).
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` (GPU only) or ``"auto"``
            (:func:`lposs.encoders.resolve_precision`); features are returned as float32.
        cache_dir: Hugging Face Hub cache folder (default: huggingface_hub's).
        **model_kwargs: architecture overrides for ``open_clip.create_model`` (small tests).

    Raises:
        ConfigError: unknown model name, pretrained tag, precision or device.
        WeightsNotFoundError: no weights found, or a file that is not a checkpoint of
            this model; the message names the file or says how to provide them.
        UnsafeCheckpointError: the checkpoint holds pickled objects.
    """
    import open_clip
    from open_clip.factory import parse_model_name

    tag_cfg = clip_tag_config(name, pretrained, weights)
    device = resolve_device(device)
    dtype = PRECISIONS[resolve_precision(precision, device)]
    source = weights if isinstance(weights, WeightsSource) else resolve_clip_weights(
        name, pretrained, weights=weights, cache_dir=cache_dir)
    schema, identifier = parse_model_name(name)  # local-dir: / hf-hub: carry their own weights
    by_open_clip = ((schema == "local-dir" and source.path == local_dir_weights(identifier))
                    or (schema == "hf-hub" and source.source == "hub"))
    build = partial(_create_model, name, bool(tag_cfg.get("quick_gelu", False)), cache_dir,
                    model_kwargs)
    if source.path is None or by_open_clip:
        model = build(torch.device("cpu"))
    else:  # the file is read before the model is built: a bad file fails fast
        state_dict = read_checkpoint(source.path)
        model = build_with_weights(build, _convert_clip_keys, state_dict, source.path, name,
                                   fill=_fill_causal_mask)
        del state_dict  # its tensors are the parameters now: a cast must not keep both
    model = model.to(device=device, dtype=dtype)
    if schema == "hf-hub" and source.path is None:  # open_clip has downloaded it by now
        source = hub_cached(source.repo, OPEN_CLIP_FILES, cache_dir=cache_dir) or source
    info = source.info()
    text_cache_dir = (text_cache_folder(name, model_kwargs, weights_id(info))
                      if schema is None else None)  # a local-dir's config is in no key
    encoder = ClipEncoder(model, open_clip.get_tokenizer(name), mean=tag_cfg.get("mean"),
                          std=tag_cfg.get("std"), text_cache_dir=text_cache_dir)
    encoder.weights_info = info
    return encoder


def _create_model(name: str, quick_gelu: bool, cache_dir, model_kwargs: dict,
                  on: torch.device) -> nn.Module:
    """``open_clip.create_model`` without weights on device ``on``, its root-logger notes
    ("initialized randomly") silenced."""
    import open_clip

    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        return open_clip.create_model(name, pretrained=None, force_quick_gelu=quick_gelu,
                                      device=on, **model_kwargs,
                                      cache_dir=None if cache_dir is None else str(cache_dir))
    finally:
        logging.disable(previous)


def _convert_clip_keys(model: nn.Module, state_dict: dict) -> dict:
    """OpenCLIP's mapping of other checkpoint layouts (e.g. OpenAI's) to its own keys."""
    from open_clip.convert import convert_state_dict

    return convert_state_dict(model, state_dict)


def _fill_causal_mask(model: nn.Module) -> None:
    """Set the text tower's causal attention mask, a buffer checkpoints do not hold:
    ``-inf`` above the diagonal, 0 elsewhere (OpenCLIP's ``build_causal_mask``)."""
    mask = getattr(model, "attn_mask", None)
    if isinstance(mask, torch.Tensor) and mask.is_meta:
        model.attn_mask = torch.full(tuple(mask.shape), float("-inf")).triu_(1)
