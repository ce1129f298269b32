"""The segmenter: an image and free-text class names in, a segmentation out.

``Segmenter.set_image`` runs both encoders once over every sliding window and builds the
image's two graphs (patches, pixels); ``Segmenter.predict`` answers any vocabulary from
them (text embeddings, LPOSS over the patches of all windows jointly, window combine,
LPOSS+ over pixels, resize back, synonyms reduced by max, argmax). Both take an optional
``progress`` callback (``lposs.progress.Progress``) that receives ``(stage, done, total)``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import UNKNOWN, LPOSSConfig
from ..errors import ConfigError
from ..methods import get_preset
from ..output.segmentation import ScoreMaps, Segmentation, provenance
from ..progress import Progress, StageCounter
from ..propagation import CGInfo, PatchGraph, PixelGraph, patch_graph, pixel_graph
from ..vocab import parse_class_names
from .checks import check_unknown_threshold
from .encoded import EncodedImage, PreparedImage, WindowSetup
from .images import DEFAULT_MAX_PIXELS, read_image
from .windows import crop_windows, patch_positions, stitch_windows, window_grid, working_image

__all__ = [
    "Segmenter", "Segmentation", "ScoreMaps", "EncodedImage", "PreparedImage", "WindowSetup",
    "UNKNOWN", "parse_class_names",
]


@dataclass
class _ImageGraphs:
    """The graphs of one image under one set of graph settings (no class enters them)."""

    settings: tuple  # what they were built with (``LPOSSConfig.graph_key``)
    patch: list[PatchGraph | None]  # one per window setup; None without the patch stage
    pixel: PixelGraph | None  # None without the pixel stage
    seconds: float  # how long building them took


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

    def __init__(self, clip, dino, config: LPOSSConfig | None = None):
        """
        Args:
            clip: a ``ClipEncoder`` (``lposs.load_clip``).
            dino: a ``DinoEncoder`` (``lposs.load_dino``); used when the patch stage runs.
            config: the settings; the paper's LPOSS+ defaults when None.
        """
        self.clip = clip
        self.dino = dino
        self.config = config or LPOSSConfig()
        self._state: EncodedImage | None = None
        self._state_source: EncodedImage | None = None  # what set_image/set_encoded gave out
        self._image_graphs: _ImageGraphs | None = None

    @classmethod
    def from_pretrained(
        cls,
        preset: str | LPOSSConfig = "lposs+",
        *,
        clip_weights: str | Path | None = None,
        dino_weights: str | Path | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        **overrides,
    ) -> Segmenter:
        """Build the models named by a preset (or config) with their pretrained weights.

        Args:
            preset: a name from ``lposs.PRESETS`` or an ``LPOSSConfig``.
            clip_weights: a local CLIP checkpoint instead of the OpenCLIP download/cache.
            dino_weights: a local DINO checkpoint instead of the timm download/cache.
            device: where the models run (default: CPU).
            precision: "fp32", "bf16", "fp16" (GPU) or "auto" for the encoders.
            **overrides: config fields to change, e.g. ``k=800``.

        Raises:
            WeightsNotFoundError: weights neither cached, downloadable nor given.
        """
        from ..encoders import load_clip, load_dino, resolve_weights

        config = get_preset(preset) if isinstance(preset, str) else preset
        config = config.replace(**overrides) if overrides else config
        clip_source, dino_source = resolve_weights(  # every missing model reported at once
            clip=config.clip, clip_pretrained=config.clip_pretrained, clip_weights=clip_weights,
            dino=config.dino if config.patch_stage else None, dino_weights=dino_weights)
        clip = load_clip(config.clip, config.clip_pretrained, weights=clip_source,
                         device=device, precision=precision)
        dino = None
        if config.patch_stage:
            dino = load_dino(config.dino, weights=dino_source, device=device,
                             precision=precision)
        return cls(clip, dino, config)

    @property
    def device(self) -> torch.device:
        return next(self.clip.parameters()).device

    def provenance(self) -> dict:
        """What this segmenter's results are made with, for their JSON
        (:func:`lposs.output.segmentation.provenance`): package versions, device, the precision
        the encoders compute in, and per encoder its model name and where its weights came
        from (``weights_info``: file path or Hub repository, revision and file, sha256;
        ``"random"`` for random weights). The OpenCLIP tag (``pretrained``) is listed only
        for weights that came from the Hub under that tag."""
        cfg = self.config
        clip = {"model": cfg.clip, **self.clip.weights_info}
        if clip.get("source") == "hub":
            clip["pretrained"] = cfg.clip_pretrained
        dino = None
        if self.dino is not None and cfg.patch_stage:
            dino = {"model": cfg.dino, **self.dino.weights_info}
        return provenance(weights={"clip": clip, "dino": dino}, device=self.device,
                          precision=self.clip.precision)

    @property
    def image(self) -> torch.Tensor | None:
        """`(3, H, W)` the image set by ``set_image``/``set_encoded`` (uint8, or float in
        [0, 1]), on the CPU; None before one is set. Pass it to ``Segmentation.save`` to
        draw the overlay without decoding the file again."""
        return None if self._state is None else self._state.image

    # ------------------------------------------------------------------ encoding
    def prepare_image(
        self, image, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
    ) -> PreparedImage:
        """Decode an image and resize it to the working size, for ``set_image``. Uses no
        model and no state of the segmenter, so it can run in another thread.

        Args:
            image: a path, PIL image, uint8 array `(H, W, 3)` or tensor `(3, H, W)` in [0, 1].
            max_pixels: refuse larger images (``ImageError``); None disables the cap.

        Raises:
            ImageError: the image is unreadable or larger than ``max_pixels``.
        """
        source = str(Path(image).resolve()) if isinstance(image, (str, os.PathLike)) else None
        image = read_image(image, max_pixels=max_pixels)  # uint8 for 8-bit sources
        working = working_image(image, self.config.short_side, self.config.long_side)
        return PreparedImage(image.cpu(), working, source)

    @torch.inference_mode()
    def set_image(
        self, image, *, max_pixels: int | None = DEFAULT_MAX_PIXELS,
        progress: Progress | None = None,
    ) -> EncodedImage:
        """Encode an image (every window through CLIP and DINO, once) and build its graphs.

        Args:
            image: a path, PIL image, uint8 array `(H, W, 3)`, tensor `(3, H, W)` in [0, 1],
                or a ``PreparedImage`` (then already decoded and resized).
            max_pixels: refuse larger images (``ImageError``); None disables the cap.
            progress: called with ``(stage, done, total)`` (``lposs.progress.Progress``).

        Returns:
            The encoded image (also kept for ``predict``).
        """
        if not isinstance(image, PreparedImage):
            image = self.prepare_image(image, max_pixels=max_pixels)
        self._state = self.encode_images([image], progress=progress)[0]
        self._state_source = self._state
        self._image_graphs = None
        self._graphs(progress)
        return self._state

    @torch.inference_mode()
    def encode_images(
        self, images: Sequence[PreparedImage], *, progress: Progress | None = None
    ) -> list[EncodedImage]:
        """Encode several images, their windows sharing the encoders' batches.

        A VOC-size image has 15 windows, too few to fill a GPU; the windows of several
        images in one forward pass do (``batch.segment_files`` uses this on CUDA). Each
        image's features are those ``set_image`` computes for it alone (the same crops
        through the same layers; batching changes no value beyond float rounding). Use
        the results with ``set_encoded``; the segmenter's current image is unchanged.

        Args:
            images: from ``prepare_image``.
            progress: called with ``(stage, done, total)`` (``lposs.progress.Progress``).

        Returns:
            One ``EncodedImage`` per image, in order; ``encode_s`` is each one's share of
            the encoders' time.
        """
        start = time.perf_counter()
        cfg = self.config
        workings = [image.working.to(self.device) for image in images]
        boxes = [[window_grid(*w.shape[-2:], size=size, stride=stride)
                  for size, stride in cfg.windows] for w in workings]
        passes = (2 if cfg.patch_stage else 1) * sum(len(b) for per in boxes for b in per)
        counter = StageCounter(progress, "encoding windows", passes)
        setups: list[list[WindowSetup | None]] = [[None] * len(cfg.windows) for _ in images]
        for s in range(len(cfg.windows)):
            crops = [crop_windows(w, per[s], multiple=1) for w, per in zip(workings, boxes)]
            for group in _same_shape_groups(crops):  # windows of small images are smaller
                batch = torch.cat([crops[i] for i in group])
                counts = [len(crops[i]) for i in group]
                clip = _split(self._dense_features(self.clip, batch, counter), counts)
                dino = (_split(self._dense_features(self.dino, batch, counter), counts)
                        if cfg.patch_stage else [None] * len(group))
                for i, c, d in zip(group, clip, dino):
                    setups[i][s] = self._window_setup(boxes[i][s], c, d)
        share = (time.perf_counter() - start) / max(len(images), 1)
        identity = self.encoder_identity()
        return [EncodedImage(image.image, w, per, share, image.source, identity)
                for image, w, per in zip(images, workings, setups)]

    def encoder_identity(self) -> str:
        """What decides an ``EncodedImage`` made by this segmenter, as one string: the
        encoder settings (``LPOSSConfig.encoder_key``), the precision, and each encoder's
        weights (content sha256, Hub repository and revision; ``"random"`` when there are
        none, so two random-weight models cannot be told apart)."""
        def weights(encoder) -> dict | None:
            if encoder is None:
                return None
            info = getattr(encoder, "weights_info", None) or {}
            return {k: info.get(k) for k in ("source", "sha256", "repo", "revision", "file")}

        dino = self.dino if self.config.patch_stage else None
        return json.dumps({"config": self.config.encoder_key(), "precision": self.clip.precision,
                           "clip": weights(self.clip), "dino": weights(dino)},
                          sort_keys=True, default=str)

    def release_image(self) -> None:
        """Forget the image set last, its features and its graphs (``predict`` needs a new
        ``set_image`` after this): a batch frees them while the result is being written."""
        self._state = self._state_source = None
        self._image_graphs = None

    def set_encoded(self, encoded: EncodedImage) -> None:
        """Use an image encoded earlier (``set_image``'s return value, or
        ``EncodedImage.load``) with these same encoders and window settings; its graphs are
        built by the first ``predict``. Setting the image that is already set keeps them."""
        if encoded is self._state_source:
            return
        self._check_encoded(encoded)
        self._state = EncodedImage(encoded.image, encoded.working.to(self.device),
                                   [s.to(self.device) for s in encoded.setups], encoded.encode_s,
                                   encoded.source, encoded.encoders)
        self._state_source = encoded
        self._image_graphs = None

    def _check_encoded(self, encoded: EncodedImage) -> None:
        """Raise ``ConfigError`` unless ``encoded`` could have come from these encoders
        and window settings: its recorded identity (when it has one) and its shapes."""
        cfg = self.config
        if encoded.encoders is not None and encoded.encoders != self.encoder_identity():
            raise ConfigError(
                "this EncodedImage was made by other encoders, weights, precision or window "
                "settings than this segmenter's, so its features would answer for another "
                "model; encode the image again with set_image")
        setups, working = encoded.setups, encoded.working
        expected_boxes = [window_grid(*working.shape[-2:], size=size, stride=stride)
                          for size, stride in cfg.windows]
        fits = len(setups) == len(expected_boxes) and all(
            torch.equal(s.boxes.cpu(), b) and s.clip.shape[1] == self.clip.embed_dim
            and (s.dino is None) == (not cfg.patch_stage)
            for s, b in zip(setups, expected_boxes))
        if not fits:
            raise ConfigError(
                "this EncodedImage does not fit this segmenter (its windows or feature sizes "
                "differ from those of these encoders and window settings); encode the image "
                "again with set_image")

    def _graphs(self, progress: Progress | None = None) -> _ImageGraphs:
        """The set image's graphs under the current config, built once and then reused."""
        cfg, state = self.config, self._state
        settings = cfg.graph_key()
        if self._image_graphs is None or self._image_graphs.settings != settings:
            start = time.perf_counter()
            counter = StageCounter(progress, "building graphs",
                                    len(state.setups) * int(cfg.patch_stage) + int(cfg.pixel_stage))
            patch = []
            for s in state.setups:
                patch.append(patch_graph(s.dino, s.positions, k=cfg.k, gamma=cfg.gamma,
                                         sigma=cfg.sigma, distance_power=cfg.distance_power,
                                         alpha=cfg.alpha) if cfg.patch_stage else None)
                counter.advance(int(cfg.patch_stage))
            pixel = pixel_graph(state.working, r=cfg.r, tau=cfg.tau, alpha=cfg.alpha) \
                if cfg.pixel_stage else None
            counter.advance(int(cfg.pixel_stage))
            self._image_graphs = _ImageGraphs(settings, patch, pixel,
                                              time.perf_counter() - start)
        return self._image_graphs

    def _dense_features(self, encoder, crops: torch.Tensor,
                        counter: StageCounter) -> torch.Tensor:
        """`(n, 3, s, s)` windows -> `(n, E, gh, gw)` float32 features, one forward pass of
        ``config.batch_size`` windows at a time (the encoder's own batching), counted."""
        batch_size = self.config.batch_size
        parts = []
        for first in range(0, len(crops), batch_size):
            parts.append(encoder.dense_features(crops[first:first + batch_size],
                                                batch_size=batch_size).float())
            counter.advance(len(parts[-1]))
        return torch.cat(parts)

    def _window_setup(self, boxes: torch.Tensor, clip: torch.Tensor,
                      dino: torch.Tensor | None) -> WindowSetup:
        """One image's window setup from its `(n, E, gh, gw)` CLIP and `(n, D, gh', gw')` DINO
        window features (None without the patch stage)."""
        if dino is None:
            return WindowSetup(boxes, clip, None, None, self.clip.patch_size)
        grid = tuple(dino.shape[-2:])
        if tuple(clip.shape[-2:]) != grid:  # e.g. DINO ViT-B/8: VLM features to the VM grid
            clip = F.interpolate(clip, size=grid, mode="bilinear", align_corners=False)
        positions = patch_positions(boxes, grid, self.dino.patch_size).to(dino.device)
        dino = dino.permute(0, 2, 3, 1).reshape(-1, dino.shape[1])
        return WindowSetup(boxes, clip, dino, positions, self.dino.patch_size)

    # ---------------------------------------------------------------- prediction
    @torch.inference_mode()
    def predict(
        self, classes: str | Sequence[str], *, unknown_threshold: float | None = None,
        progress: Progress | None = None,
    ) -> Segmentation:
        """Segment the image given to ``set_image`` into ``classes``.

        Args:
            classes: names (``;`` separates synonyms of one class), or one comma-separated
                string; at most 254 (``lposs.vocab.MAX_CLASSES``: indices 0..253 and 255 =
                unknown fit the 8-bit label PNG).
            unknown_threshold: label a pixel ``UNKNOWN`` when its best score (cosine
                scale, see ``Segmentation.scores``) is below this.
            progress: called with ``(stage, done, total)`` (``lposs.progress.Progress``).

        Returns:
            A ``Segmentation`` at the original image size.
        """
        if self._state is None:
            raise RuntimeError("call set_image(image) before predict(classes)")
        check_unknown_threshold(unknown_threshold)
        classes = parse_class_names(classes)
        cfg, state = self.config, self._state
        graphs = self._graphs(progress)
        timings = {"encode": state.encode_s, "graphs": graphs.seconds}

        start = time.perf_counter()
        counter = StageCounter(progress, "encoding classes", 1)
        text, class_index = self.clip.encode_classes(classes)
        text = text.to(self.device, torch.float32)
        counter.advance()
        timings["text"] = time.perf_counter() - start

        start = time.perf_counter()
        working_hw = tuple(state.working.shape[-2:])
        combined = 0.0
        patch_reports = []
        counter = StageCounter(progress, "propagating over patches", len(state.setups))
        for setup, graph in zip(state.setups, graphs.patch):
            stitched, info = self._patch_scores(setup, graph, text, working_hw)
            combined = combined + stitched
            if info is not None:
                patch_reports.append(info.summary())
            counter.advance()
        combined = combined / len(state.setups)  # (C' + 1, h, w)
        timings["patch_lp"] = time.perf_counter() - start
        convergence = {"patch": _worst(patch_reports)} if patch_reports else {}

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
        raw = _reduce_synonyms(combined[:-1], class_index.to(combined.device), len(classes))
        maps = ScoreMaps(raw, combined[-1], tuple(state.image.shape[-2:]))
        # one byte a pixel below 255 classes; Segmentation.labels gives int64 on request
        labels = maps.labels(unknown_threshold,
                             dtype=torch.uint8 if len(classes) < UNKNOWN else torch.int64)
        counter.advance()
        timings["resize_argmax"] = time.perf_counter() - start
        return Segmentation(labels, maps, classes, timings, _settings(cfg, unknown_threshold),
                            convergence, state.source, self.provenance())

    def _patch_scores(self, setup: WindowSetup, graph: PatchGraph | None, text: torch.Tensor,
                      working_hw) -> tuple[torch.Tensor, CGInfo | None]:
        """Initial scores of one window setup, propagated over its patches and stitched.

        Returns:
            ``(scores, info)``: `(C' + 1, h, w)` scores, one row per synonym, then the
            all-ones row that keeps the normaliser of the propagation; the solver's report
            (None without the patch stage).
        """
        cfg = self.config
        n, _, gh, gw = setup.clip.shape
        scores = torch.einsum("nehw,ce->nhwc", setup.clip, text).reshape(n * gh * gw, -1)
        scores = torch.cat([scores, scores.new_ones(scores.shape[0], 1)], dim=1)
        info = None
        if graph is not None:
            scores, info = graph.propagate(scores, tol=cfg.tol, max_iter=cfg.max_iter,
                                           return_info=True)
        grids = scores.reshape(n, gh, gw, -1).permute(0, 3, 1, 2)
        return stitch_windows(grids, setup.boxes, *working_hw,
                              patch_size=setup.patch_size), info

    def __call__(self, image, classes, *, unknown_threshold: float | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 progress: Progress | None = None) -> Segmentation:
        """``set_image(image)`` then ``predict(classes)``."""
        self.set_image(image, max_pixels=max_pixels, progress=progress)
        return self.predict(classes, unknown_threshold=unknown_threshold, progress=progress)


def _same_shape_groups(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by shape (after the first axis), first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(t.shape[1:]), []).append(i)
    return list(groups.values())


def _split(batch: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """``batch`` cut into consecutive parts of ``counts`` rows, each its own tensor (a view
    would keep, and ``EncodedImage.save`` would write, the whole batch)."""
    if len(counts) == 1:
        return [batch]
    return [part.clone() for part in batch.split(counts)]


def _reduce_synonyms(
    synonyms: torch.Tensor, class_index: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """`(C', h, w)` propagated synonym scores -> `(C, h, w)`: each class's max over its
    synonyms (``class_index``: `(C',)` the class of each row), at the working size."""
    if synonyms.shape[0] == n_classes:  # no synonyms: rows are classes, in order
        return synonyms
    return torch.stack([synonyms[class_index == c].amax(dim=0) for c in range(n_classes)])


def _worst(reports: list[dict[str, int | float]]) -> dict[str, int | float]:
    """One convergence report from several solves: the most iterations, the worst residual."""
    return {"iterations": max(r["iterations"] for r in reports),
            "max_relative_residual": max(r["max_relative_residual"] for r in reports)}


def _settings(cfg: LPOSSConfig, unknown_threshold: float | None) -> dict:
    return {**asdict(cfg), "unknown_threshold": unknown_threshold}
