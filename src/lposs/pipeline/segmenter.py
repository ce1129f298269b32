"""The segmenter: an image and free-text class names in, a segmentation out.

``Segmenter.set_image`` runs the encoders once over every sliding window and builds the
image's two graphs (patches, pixels); ``Segmenter.predict`` answers any vocabulary from
them: text embeddings, the method's initial patch scores, LPOSS over the patches of all
windows jointly, window stitching, LPOSS+ over pixels, max over synonyms, resize, argmax.
Both take an optional ``progress`` callback (``lposs.progress.Progress``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..config import DEFAULT_MAX_PIXELS, UNKNOWN, LPOSSConfig
from ..errors import ConfigError
from ..methods import get_preset
from ..output.segmentation import Segmentation, provenance
from ..progress import Progress, StageCounter
from ..propagation import PatchGraph, PixelGraph, patch_graph, pixel_graph
from ..vocab import Vocabulary, vocabulary
from .checks import check_unknown_threshold
from .encoded import EncodedImage, PreparedImage, encode_images
from .image import read_image, working_image
from .scores import ScoreMaps
from .windows import stitch_windows, window_setups

__all__ = ["Segmenter"]


@dataclass
class _ImageGraphs:
    """The graphs of one image under one set of graph settings (no class enters them)."""

    settings: tuple  # what they were built with (``LPOSSConfig.graph_key``)
    patch: list[PatchGraph | None]  # one per window setup; None without the patch stage
    pixel: PixelGraph | None  # None without the pixel stage
    seconds: float  # how long building them took


@dataclass
class _Text:
    """A vocabulary's text embeddings, kept for the next ``predict``."""

    vocab: Vocabulary
    embeddings: torch.Tensor  # (C', E) float32 unit rows, on the model's device
    seconds: float  # how long computing them took


class Segmenter:
    """Open-vocabulary segmentation with LPOSS / LPOSS+.

    Encode an image once with ``set_image``; then ``predict`` any vocabulary.
    ``prepare_image`` (decoding and resizing, no model) may run in another thread while
    the segmenter encodes the previous image.

    Example:
        >>> seg = Segmenter.from_pretrained()
        >>> seg.set_image("cat.jpg")
        >>> result = seg.predict(["cat", "sofa", "background;wall;floor"])
        >>> result.labels.shape, result.scores.shape
    """

    def __init__(self, clip, dino, config: LPOSSConfig | None = None, depth=None):
        """
        Args:
            clip: a ``ClipEncoder`` (``lposs.encoders.load_clip``).
            dino: a ``DinoEncoder`` (``lposs.encoders.load_dino``), for ``config.uses_dino``.
            config: the settings; the paper's LPOSS+ defaults when None.
            depth: a ``DepthEncoder`` (``encoders.depth.load_depth``) for ``config.uses_depth``.
        """
        self.clip = clip
        self.dino = dino
        self.depth = depth
        self.config = config or LPOSSConfig()
        self._encoded: EncodedImage | None = None  # the image set, on the model's device
        self._given: EncodedImage | None = None  # what set_image/set_encoded gave out
        self._image_graphs: _ImageGraphs | None = None
        self._text: _Text | None = None

    @classmethod
    def from_pretrained(
        cls,
        preset: str | LPOSSConfig = "lposs+",
        *,
        clip_weights: str | Path | None = None,
        dino_weights: str | Path | None = None,
        depth_weights: str | Path | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        **overrides,
    ) -> Segmenter:
        """Build the models named by a preset (or config) with their pretrained weights.

        Args:
            preset: a name from ``lposs.PRESETS`` or an ``LPOSSConfig``.
            clip_weights: a local CLIP checkpoint instead of the OpenCLIP download/cache.
            dino_weights: a local DINO checkpoint instead of the timm download/cache.
            depth_weights: a local depth-model checkpoint instead of the Hub cache/download.
            device: where the models run (default: CPU).
            precision: "fp32", "bf16", "fp16" (GPU) or "auto" for the encoders.
            **overrides: config fields to change, e.g. ``k=800``.

        Raises:
            ConfigError: an unknown preset or setting, or a value out of range.
            WeightsNotFoundError: weights neither cached, downloadable nor given.
        """
        from ..encoders import load_clip, load_dino, resolve_weights
        from ..encoders.depth import load_depth

        config = get_preset(preset) if isinstance(preset, str) else preset
        config = config.replace(**overrides) if overrides else config
        clip_source, dino_source = resolve_weights(  # every missing model reported at once
            clip=config.clip, clip_pretrained=config.clip_pretrained, clip_weights=clip_weights,
            dino=config.dino if config.uses_dino else None, dino_weights=dino_weights)
        depth = load_depth(config.depth_model, weights=depth_weights, device=device,
                           precision=precision) if config.uses_depth else None
        clip = load_clip(config.clip, config.clip_pretrained, weights=clip_source,
                         device=device, precision=precision)
        dino = None
        if config.uses_dino:
            dino = load_dino(config.dino, weights=dino_source, device=device,
                             precision=precision)
        return cls(clip, dino, config, depth)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def provenance(self) -> dict:
        """What this segmenter's results are made with, for their JSON: package versions,
        device, the encoders' precision, and per encoder its model and where its weights
        came from (file or Hub repository, with sha256; ``"random"`` for none)."""
        cfg = self.config
        clip = {"model": cfg.clip, **self.clip.weights_info}
        if clip.get("source") == "hub":
            clip["pretrained"] = cfg.clip_pretrained
        dino = {"model": cfg.dino, **self.dino.weights_info} if cfg.uses_dino else None
        depth = {"depth": {"model": cfg.depth_model, **self.depth.weights_info}} \
            if cfg.uses_depth else {}
        return provenance(weights={"clip": clip, "dino": dino, **depth}, device=self.device,
                          precision=self.clip.precision)

    @property
    def image(self) -> torch.Tensor | None:
        """`(3, H, W)` the image set last (uint8, or float in [0, 1]), on the CPU; None
        before one is set. ``Segmentation.save`` draws the overlay from it."""
        return None if self._encoded is None else self._encoded.image

    # ------------------------------------------------------------------ encoding
    def prepare_image(self, image, *,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS) -> PreparedImage:
        """Decode an image and resize it to the working size, for ``set_image``. Uses no
        model and no state of the segmenter, so it can run in another thread.

        Args:
            image: a path, PIL image, uint8 array `(H, W, 3)` or tensor `(3, H, W)` in [0, 1].
            max_pixels: refuse larger images (``ImageError``); None disables the cap.

        Raises:
            ImageError: the image is unreadable or larger than ``max_pixels``.
            ConfigError: ``max_pixels`` is not a positive int or None.
        """
        if max_pixels is not None and (isinstance(max_pixels, bool) or
                                       not isinstance(max_pixels, int) or max_pixels < 1):
            raise ConfigError(f"max_pixels must be a positive int or None (no cap), got "
                              f"{max_pixels!r}")
        source = os.path.realpath(image) if isinstance(image, (str, os.PathLike)) else None
        image = read_image(image, max_pixels=max_pixels)  # uint8 for 8-bit sources
        working = working_image(image, self.config.short_side, self.config.long_side)
        return PreparedImage(image.cpu(), working, source)

    @torch.inference_mode()
    def set_image(self, image, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                  progress: Progress | None = None) -> EncodedImage:
        """Encode an image (every window through the encoders, once) and build its graphs.

        Args:
            image: what ``prepare_image`` takes, or a ``PreparedImage``.
            max_pixels: refuse larger images (``ImageError``); None disables the cap.
            progress: called with ``(stage, done, total)``.

        Returns:
            The encoded image (also kept for ``predict``).
        """
        if not isinstance(image, PreparedImage):
            image = self.prepare_image(image, max_pixels=max_pixels)
        self._encoded = self._given = self.encode_images([image], progress=progress)[0]
        self._image_graphs = None
        self._graphs(progress)
        return self._encoded

    @torch.inference_mode()
    def encode_images(self, images: Sequence[PreparedImage], *,
                      progress: Progress | None = None) -> list[EncodedImage]:
        """Encode several images, their windows sharing the encoders' batches (a VOC-size
        image has 15 windows, too few to fill a GPU). Each image's features are those
        ``set_image`` computes for it alone, up to float rounding. Use the results with
        ``set_encoded``; the current image is unchanged.

        Returns:
            One ``EncodedImage`` per image, in order; ``encode_s`` is each one's share of
            the encoders' time.
        """
        return encode_images(self.clip, self.dino, self.config, images, depth=self.depth,
                             identity=self.encoder_identity(), progress=progress)

    def encoder_identity(self) -> str:
        """What decides an ``EncodedImage`` made by this segmenter, as one string: the
        encoder settings (``LPOSSConfig.encoder_key``), the precision, and each encoder's
        ``weights_id`` (``"random"`` for random weights, which cannot be told apart)."""
        dino = self.dino.weights_id if self.dino is not None and self.config.uses_dino else None
        depth = {"depth": self.depth.weights_id} if self.config.uses_depth and self.depth else {}
        return json.dumps({"config": self.config.encoder_key(), "precision": self.clip.precision,
                           "clip": self.clip.weights_id, "dino": dino, **depth},
                          sort_keys=True, default=str)

    def release_image(self) -> None:
        """Forget the image set last, its features and its graphs (``predict`` needs a new
        ``set_image`` after this): a batch frees them while the result is being written."""
        self._encoded = self._given = None
        self._image_graphs = None

    def set_encoded(self, encoded: EncodedImage) -> None:
        """Use an image encoded earlier (``set_image``'s return value, or
        ``EncodedImage.load``) by these same encoders and window settings; its graphs are
        built by the first ``predict``. Setting the image already set keeps them.

        Raises:
            ConfigError: it was made by other encoders, weights, precision or windows.
        """
        if encoded is self._given:
            return
        boxes = window_setups(*encoded.working.shape[-2:], self.config.windows)
        fits = (encoded.encoders in (None, self.encoder_identity())
                and len(encoded.setups) == len(boxes) and all(
                    torch.equal(s.boxes.cpu(), b) and s.clip.shape[1] == self.clip.embed_dim
                    and (s.dino is None) == (not self.config.uses_dino)
                    for s, b in zip(encoded.setups, boxes))
                and (encoded.depth is None) == (not self.config.uses_depth))
        if not fits:
            raise ConfigError(
                "this EncodedImage was made by other encoders, weights, precision or window "
                "settings than this segmenter's, so its features would answer for another "
                "model; encode the image again with set_image")
        self._encoded = replace(encoded, working=encoded.working.to(self.device),
                                setups=[s.to(self.device) for s in encoded.setups])
        self._given = encoded
        self._image_graphs = None

    def _graphs(self, progress: Progress | None = None) -> _ImageGraphs:
        """The set image's graphs under the current config, built once and then reused."""
        cfg, encoded = self.config, self._encoded
        if self._image_graphs is None or self._image_graphs.settings != cfg.graph_key():
            start = time.perf_counter()
            counter = StageCounter(progress, "building graphs",
                                   len(encoded.setups) * cfg.patch_stage + cfg.pixel_stage)
            patch = []
            for s in encoded.setups:
                patch.append(patch_graph(
                    *s.graph_inputs(cfg.graph_features), k=cfg.k, gamma=cfg.gamma,
                    sigma=cfg.sigma, distance_power=cfg.distance_power, alpha=cfg.alpha,
                    nodes_per_window=None if cfg.joint else s.clip[0, 0].numel())
                    if cfg.patch_stage else None)
                counter.advance(int(cfg.patch_stage))
            pixel = (pixel_graph(encoded.working, r=cfg.r, tau=cfg.tau, alpha=cfg.alpha,
                                 depth=encoded.depth, lab="lab" in cfg.pixel_features,
                                 depth_scale=cfg.depth_scale) if cfg.pixel_stage else None)
            counter.advance(int(cfg.pixel_stage))
            self._image_graphs = _ImageGraphs(cfg.graph_key(), patch, pixel,
                                              time.perf_counter() - start)
        return self._image_graphs

    # ---------------------------------------------------------------- prediction
    @torch.inference_mode()
    def encode_vocabulary(self, classes: str | Sequence[str] | Vocabulary) -> Vocabulary:
        """Check a vocabulary and compute its text embeddings, kept for ``predict``.

        Args:
            classes: names (``;`` separates synonyms of one class), one comma-separated
                string, or a ``Vocabulary``; at most 254 classes (``lposs.vocab``).

        Raises:
            ClassNamesError: a bad vocabulary, or a name too long for CLIP's context.
            TypeError: classes without a fixed order (a set).
        """
        vocab = classes if isinstance(classes, Vocabulary) else vocabulary(classes)
        if self._text is None or self._text.vocab != vocab:
            start = time.perf_counter()
            embeddings, _ = self.clip.encode_classes(list(vocab.names))
            self._text = _Text(vocab, embeddings.to(self.device, torch.float32),
                               time.perf_counter() - start)
        return vocab

    @torch.inference_mode()
    def predict(self, classes: str | Sequence[str] | Vocabulary, *,
                unknown_threshold: float | None = None,
                progress: Progress | None = None) -> Segmentation:
        """Segment the image given to ``set_image`` into ``classes``.

        Args:
            classes: what ``encode_vocabulary`` takes.
            unknown_threshold: label a pixel ``UNKNOWN`` when its best score (cosine
                scale, see ``Segmentation.scores``) is below this, in [-1, 1].
            progress: called with ``(stage, done, total)``.

        Returns:
            A ``Segmentation`` at the original image size. Its ``timings["text"]`` is how
            long the vocabulary's text embeddings took when they were computed (once per
            vocabulary: a batch computes them before its first image).
        """
        if self._encoded is None:
            raise RuntimeError("call set_image(image) before predict(classes)")
        check_unknown_threshold(unknown_threshold)
        counter = StageCounter(progress, "encoding classes", 1)
        vocab = self.encode_vocabulary(classes)
        counter.advance()
        graphs = self._graphs(progress)
        encoded, cfg = self._encoded, self.config
        timings = {"encode": encoded.encode_s, "graphs": graphs.seconds,
                   "text": self._text.seconds}
        start = time.perf_counter()
        combined, convergence = self._patch_scores(graphs, progress)
        timings["patch_lp"] = time.perf_counter() - start

        start = time.perf_counter()
        if graphs.pixel is not None:
            counter = StageCounter(progress, "propagating over pixels", 1)
            combined, info = graphs.pixel.propagate(combined, tol=cfg.tol, max_iter=cfg.max_iter,
                                                    return_info=True)
            convergence["pixel"] = info.summary()
            counter.advance()
        timings["pixel_lp"] = time.perf_counter() - start

        start = time.perf_counter()
        counter = StageCounter(progress, "labelling", 1)
        raw = _reduce_synonyms(combined[:-1], vocab)
        maps = ScoreMaps(raw, combined[-1], tuple(encoded.image.shape[-2:]))
        # one byte a pixel below 255 classes
        labels = maps.labels(unknown_threshold,
                             dtype=torch.uint8 if len(vocab) < UNKNOWN else torch.int64)
        counter.advance()
        timings["resize_argmax"] = time.perf_counter() - start
        settings = {**asdict(cfg), "unknown_threshold": unknown_threshold}
        return Segmentation(labels, maps, list(vocab.names), timings, settings, convergence,
                            encoded.source, self.provenance())

    def _patch_scores(self, graphs: _ImageGraphs,
                      progress: Progress | None) -> tuple[torch.Tensor, dict]:
        """The initial scores of every window setup, propagated over its patches (LPOSS),
        stitched to the working size and averaged over setups.

        Returns:
            `(C' + 1, h, w)` scores, one row per synonym, then the all-ones row that keeps
            the propagation's normaliser; the patch solves' worst convergence (or {}).
        """
        cfg, encoded, text = self.config, self._encoded, self._text.embeddings
        combined, reports = 0.0, []
        counter = StageCounter(progress, "propagating over patches", len(encoded.setups))
        for setup, graph in zip(encoded.setups, graphs.patch):
            n, _, gh, gw = setup.clip.shape
            scores = torch.einsum("nehw,ce->nhwc", setup.clip, text).reshape(n * gh * gw, -1)
            scores = torch.cat([scores, scores.new_ones(scores.shape[0], 1)], dim=1)
            if graph is not None:
                scores, info = graph.propagate(scores, tol=cfg.tol, max_iter=cfg.max_iter,
                                               return_info=True)
                reports.append(info.summary())
            grids = scores.reshape(n, gh, gw, -1).permute(0, 3, 1, 2)
            combined = combined + stitch_windows(grids, setup.boxes, *encoded.working.shape[-2:],
                                                 patch_size=setup.patch_size)
            counter.advance()
        if not reports:
            return combined / len(encoded.setups), {}
        worst = {"iterations": max(r["iterations"] for r in reports),
                 "max_relative_residual": max(r["max_relative_residual"] for r in reports)}
        return combined / len(encoded.setups), {"patch": worst}

    def __call__(self, image, classes, *, unknown_threshold: float | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 progress: Progress | None = None) -> Segmentation:
        """``set_image(image)`` then ``predict(classes)``."""
        self.set_image(image, max_pixels=max_pixels, progress=progress)
        return self.predict(classes, unknown_threshold=unknown_threshold, progress=progress)


def _reduce_synonyms(synonyms: torch.Tensor, vocab: Vocabulary) -> torch.Tensor:
    """`(C', h, w)` propagated synonym scores -> `(C, h, w)`: each class's max over its
    synonyms, at the working size."""
    if len(vocab.rows) == len(vocab):  # no synonyms: rows are classes, in order
        return synonyms
    index = torch.tensor(vocab.class_index, device=synonyms.device)
    return torch.stack([synonyms[index == c].amax(dim=0) for c in range(len(vocab))])
