"""The segmenter: an image and free-text class names in, a segmentation out.

``Segmenter.set_image`` runs both encoders once over every sliding window and builds the
image's two graphs (patches, pixels); ``Segmenter.predict`` answers any vocabulary from
them (text embeddings, LPOSS over the patches of all windows jointly, window combine,
LPOSS+ over pixels, resize back, synonyms reduced by max, argmax).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import io
from .config import LPOSSConfig, get_preset
from .errors import ClassNamesError, ConfigError
from .propagation import PatchGraph, PixelGraph, patch_graph, pixel_graph, pixel_propagation
from .windows import crop_windows, patch_positions, resize_image, stitch_windows, window_grid
from .windows import working_size as working_size_of

__all__ = [
    "Segmenter", "Segmentation", "ScoreMaps", "EncodedImage", "WindowSetup", "UNKNOWN",
    "parse_class_names",
    "refine_scores",
]

UNKNOWN = 255
"""Label value of pixels whose best score is below the abstain threshold (also a miss in
the metrics, like the ignore value)."""

# Floor for the propagated all-ones column that puts scores back on the cosine scale.
_MIN_NORMALISER = 1e-6


def parse_class_names(classes: str | Sequence[str]) -> list[str]:
    """Validate a vocabulary.

    Args:
        classes: a comma-separated string or a sequence of names; a name may hold
            ``;``-separated synonyms ("grass;lawn").

    Returns:
        The names, whitespace around names and synonyms stripped.

    Raises:
        ClassNamesError: the list is empty, a name or synonym is empty, or a name repeats.
    """
    if isinstance(classes, str):
        classes = classes.split(",")
    names = []
    for raw in classes:
        if not isinstance(raw, str):
            raise ClassNamesError(f"class names must be strings, got {type(raw).__name__}")
        synonyms = [s.strip() for s in raw.split(";")]
        if not all(synonyms):
            raise ClassNamesError(f"empty class name in {raw!r}")
        names.append(";".join(synonyms))
    if not names:
        raise ClassNamesError("the class list is empty: give at least one class name")
    seen = set()
    for name in names:
        if name.lower() in seen:
            raise ClassNamesError(f"duplicate class name {name!r}")
        seen.add(name.lower())
    if len(names) >= UNKNOWN:
        raise ClassNamesError(f"at most {UNKNOWN - 1} classes are supported, got {len(names)}")
    return names


class ScoreMaps:
    """Per-class scores at the original size, resized from the working size on demand.

    The paper's output order (METHOD.md, Output): the raw propagated scores are reduced
    over each class's synonyms at working size (``raw``), then resized bilinearly
    (``align_corners=False``) to the original size, where their argmax gives the labels.
    The scores reported divide the resized raw scores by the resized propagated
    all-ones column (``weight``), which puts them on the cosine scale without changing
    the argmax. One class is resized at a time, so no ``(C, H, W)`` array is needed to
    label an image.

    Args:
        raw: ``(C, h, w)`` float scores at the working size.
        weight: ``(h, w)`` the propagated all-ones column, or None (scores as they are).
        size: ``(H, W)`` the original size.
    """

    def __init__(self, raw: torch.Tensor, weight: torch.Tensor | None, size: tuple[int, int]):
        self.raw = raw
        self.weight = weight
        self.size = (int(size[0]), int(size[1]))
        self._weight_full: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)``."""
        return (self.raw.shape[0], *self.size)

    def _resized(self, plane: torch.Tensor) -> torch.Tensor:
        """``(h, w)`` -> ``(H, W)`` float32, on the plane's device."""
        plane = plane.float()
        if tuple(plane.shape) == self.size:
            return plane
        return F.interpolate(plane[None, None], size=self.size, mode="bilinear",
                             align_corners=False)[0, 0]

    def _weight(self) -> torch.Tensor | None:
        if self.weight is not None and self._weight_full is None:
            self._weight_full = self._resized(self.weight).clamp_min(_MIN_NORMALISER)
        return self._weight_full

    @torch.inference_mode()
    def class_scores(self, c: int) -> torch.Tensor:
        """``(H, W)`` float32 scores of class ``c`` on the CPU (cosine scale)."""
        plane = self._resized(self.raw[c])
        weight = self._weight()
        return (plane if weight is None else plane / weight).cpu()

    @torch.inference_mode()
    def full(self) -> torch.Tensor:
        """``(C, H, W)`` float32 scores of every class on the CPU."""
        out = torch.empty(self.shape, dtype=torch.float32)
        for c in range(self.shape[0]):
            out[c] = self.class_scores(c)
        return out

    @torch.inference_mode()
    def labels(self, unknown_threshold: float | None = None) -> torch.Tensor:
        """``(H, W)`` int64 argmax over classes at the original size (first class on ties),
        ``UNKNOWN`` where the best score (cosine scale) is below ``unknown_threshold``."""
        best = self._resized(self.raw[0]).clone()
        labels = torch.zeros(self.size, dtype=torch.int64, device=best.device)
        for c in range(1, self.shape[0]):
            plane = self._resized(self.raw[c])
            better = plane > best
            labels.masked_fill_(better, c)
            torch.maximum(best, plane, out=best)
            del plane, better
        if unknown_threshold is not None:
            weight = self._weight()
            if weight is not None:
                best /= weight
            labels.masked_fill_(best < unknown_threshold, UNKNOWN)
        return labels.cpu()


@dataclass
class Segmentation:
    """The result of one prediction.

    Attributes:
        labels: `(H, W)` int64 class index per pixel at the original size; ``UNKNOWN``
            (255) where the abstain threshold rejected every class.
        score_maps: the per-class scores, resized to the original size on demand (a
            ``(C, H, W)`` tensor given here is wrapped as it is).
        classes: the C class names, in label order.
        timings: seconds per stage.
        settings: the configuration that produced it.
    """

    labels: torch.Tensor
    score_maps: ScoreMaps
    classes: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.score_maps, torch.Tensor):
            self.score_maps = ScoreMaps(self.score_maps, None, tuple(self.score_maps.shape[-2:]))

    @functools.cached_property
    def scores(self) -> torch.Tensor:
        """`(C, H, W)` float32 per-class scores at the original size, on the scale of CLIP
        cosine similarity (propagation-weighted averages of the initial patch-text
        similarities; the synonym maximum for ``;`` names). Computed on first access:
        for a large image this is C full-size float maps."""
        return self.score_maps.full()

    def colors(self):
        """`(C, 3)` uint8 colour per class (the palette of the saved PNG)."""
        return io.palette(len(self.classes))

    def class_shares(self) -> dict[str, float]:
        """Share of pixels per class name (and "unknown" when present)."""
        shares = io.class_shares(self.labels, len(self.classes))
        named = dict(zip(self.classes, shares))
        if len(shares) > len(self.classes) and shares[-1] > 0:
            named["unknown"] = shares[-1]
        return named

    def summary(self) -> dict:
        """A JSON-ready summary: classes, colours, pixel shares, timings, settings."""
        colors = self.colors().tolist()
        shares = io.class_shares(self.labels, len(self.classes))  # C + 1: unknown last
        return {
            "size": list(self.labels.shape),
            "classes": [
                {"index": i, "name": name, "color": colors[i], "share": shares[i]}
                for i, name in enumerate(self.classes)
            ],
            "unknown": {"index": UNKNOWN, "share": shares[-1]},
            "timings_s": self.timings,
            "settings": self.settings,
        }

    def overlay(self, image):
        """The image blended with the class colours, with a legend (a PIL image).

        Args:
            image: what ``io.load_image`` accepts, at the labels' size.
        """
        return io.overlay(io.load_image(image, max_pixels=None), self.labels, self.classes,
                          self.colors())

    def save(
        self, out_dir: str | Path, stem: str, image=None, *, scores: bool = False
    ) -> list[Path]:
        """Write ``<stem>.png`` (palette label map), ``<stem>.json`` and, given the image,
        ``<stem>_overlay.png``; ``<stem>_scores.npy`` when ``scores``. Each file is
        written atomically. Returns the written paths."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = [out_dir / f"{stem}.png"]
        io.save_label_png(written[-1], self.labels, self.colors())
        if image is not None:
            written.append(out_dir / f"{stem}_overlay.png")
            io.save_overlay(written[-1], self.overlay(image))
        if scores:
            written.append(out_dir / f"{stem}_scores.npy")
            io.save_scores(written[-1], self.score_maps)
        written.append(out_dir / f"{stem}.json")
        io.write_json(written[-1], self.summary())
        return written


@dataclass
class WindowSetup:
    """Cached encoder outputs for one (window size, stride) setup."""

    boxes: torch.Tensor  # (n, 4) y1, x1, y2, x2 in working pixels
    clip: torch.Tensor  # (n, E, gh, gw) dense CLIP features (unit norm), on the graph grid
    dino: torch.Tensor | None  # (n * gh * gw, D) DINO value features, unit norm
    positions: torch.Tensor | None  # (n * gh * gw, 2) patch centres (y, x)
    patch_size: int  # pixels per grid cell of `clip`

    def to(self, device: torch.device) -> WindowSetup:
        """The features and positions on ``device`` (boxes stay on the CPU)."""
        def move(t):
            return None if t is None else t.to(device)

        return WindowSetup(self.boxes, move(self.clip), move(self.dino), move(self.positions),
                           self.patch_size)


@dataclass
class EncodedImage:
    """Everything ``predict`` needs from an image: what ``set_image`` computes once.

    Save it with ``save`` to skip the encoders next time (e.g. an evaluation sweep over
    propagation settings); ``Segmenter.set_encoded`` takes it back.
    """

    image: torch.Tensor  # (3, H, W) the original image (uint8, or float in [0, 1]), on the CPU
    working: torch.Tensor  # (3, h, w) at the working size, on the model's device
    setups: list[WindowSetup]
    encode_s: float  # seconds the encoders took

    def save(self, path: str | Path) -> None:
        """Write to ``path`` atomically (a torch file of plain tensors, loadable with
        ``weights_only=True``)."""
        setups = [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in vars(s).items()}
                  for s in self.setups]
        payload = {"image": self.image.cpu(), "working": self.working.cpu(), "setups": setups,
                   "encode_s": self.encode_s}
        io.atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device | None = None) -> EncodedImage:
        """Read what ``save`` wrote (never unpickles arbitrary objects)."""
        payload = torch.load(path, map_location=device or "cpu", weights_only=True)
        return cls(payload["image"].cpu(), payload["working"],
                   [WindowSetup(**s) for s in payload["setups"]], payload["encode_s"])


@dataclass
class _ImageGraphs:
    """The graphs of one image under one set of graph settings (no class enters them)."""

    settings: tuple  # what they were built with (see Segmenter._graphs)
    patch: list[PatchGraph | None]  # one per window setup; None without the patch stage
    pixel: PixelGraph | None  # None without the pixel stage
    seconds: float  # how long building them took


class Segmenter:
    """Open-vocabulary segmentation with LPOSS / LPOSS+.

    Encode an image once with ``set_image``; then ``predict`` any vocabulary.

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
        from .encoders import load_clip, load_dino, resolve_weights

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

    # ------------------------------------------------------------------ encoding
    @torch.inference_mode()
    def set_image(
        self, image, *, max_pixels: int | None = io.DEFAULT_MAX_PIXELS
    ) -> EncodedImage:
        """Encode an image (every window through CLIP and DINO, once) and build its graphs.

        Args:
            image: a path, PIL image, uint8 array `(H, W, 3)` or tensor `(3, H, W)` in [0, 1].
            max_pixels: refuse larger images (``ImageError``); None disables the cap.

        Returns:
            The encoded image (also kept for ``predict``).
        """
        start = time.perf_counter()
        cfg = self.config
        image = io.read_image(image, max_pixels=max_pixels)  # uint8 for 8-bit sources
        working = _working_image(image, cfg).to(self.device)
        image = image.cpu()
        setups = [self._encode_windows(working, size, stride) for size, stride in cfg.windows]
        self._state = EncodedImage(image, working, setups, time.perf_counter() - start)
        self._state_source = self._state
        self._image_graphs = None
        self._graphs()
        return self._state

    def set_encoded(self, encoded: EncodedImage) -> None:
        """Use an image encoded earlier (``set_image``'s return value, or
        ``EncodedImage.load``) with these same encoders and window settings; its graphs are
        built by the first ``predict``. Setting the image that is already set keeps them."""
        if encoded is self._state_source:
            return
        self._state = EncodedImage(encoded.image, encoded.working.to(self.device),
                                   [s.to(self.device) for s in encoded.setups], encoded.encode_s)
        self._state_source = encoded
        self._image_graphs = None

    def _graphs(self) -> _ImageGraphs:
        """The set image's graphs under the current config, built once and then reused."""
        cfg, state = self.config, self._state
        settings = (cfg.patch_stage, cfg.k, cfg.gamma, cfg.sigma, cfg.distance_power,
                    cfg.pixel_stage, cfg.r, cfg.tau, cfg.alpha)
        if self._image_graphs is None or self._image_graphs.settings != settings:
            start = time.perf_counter()
            patch = [patch_graph(s.dino, s.positions, k=cfg.k, gamma=cfg.gamma, sigma=cfg.sigma,
                                 distance_power=cfg.distance_power, alpha=cfg.alpha)
                     if cfg.patch_stage else None for s in state.setups]
            pixel = pixel_graph(state.working, r=cfg.r, tau=cfg.tau, alpha=cfg.alpha) \
                if cfg.pixel_stage else None
            self._image_graphs = _ImageGraphs(settings, patch, pixel,
                                              time.perf_counter() - start)
        return self._image_graphs

    def _encode_windows(self, working: torch.Tensor, size: int, stride: int) -> WindowSetup:
        cfg = self.config
        boxes = window_grid(*working.shape[-2:], size=size, stride=stride)
        crops = crop_windows(working, boxes, multiple=1)
        clip = self.clip.dense_features(crops, batch_size=cfg.batch_size).float()
        if not cfg.patch_stage:
            return WindowSetup(boxes, clip, None, None, self.clip.patch_size)
        dino = self.dino.dense_features(crops, batch_size=cfg.batch_size).float()
        grid = tuple(dino.shape[-2:])
        if tuple(clip.shape[-2:]) != grid:  # e.g. DINO ViT-B/8: VLM features to the VM grid
            clip = F.interpolate(clip, size=grid, mode="bilinear", align_corners=False)
        positions = patch_positions(boxes, grid, self.dino.patch_size).to(dino.device)
        dino = dino.permute(0, 2, 3, 1).reshape(-1, dino.shape[1])
        return WindowSetup(boxes, clip, dino, positions, self.dino.patch_size)

    # ---------------------------------------------------------------- prediction
    @torch.inference_mode()
    def predict(
        self, classes: str | Sequence[str], *, unknown_threshold: float | None = None
    ) -> Segmentation:
        """Segment the image given to ``set_image`` into ``classes``.

        Args:
            classes: names (``;`` separates synonyms of one class), or one comma-separated
                string.
            unknown_threshold: label a pixel ``UNKNOWN`` when its best score (cosine
                scale, see ``Segmentation.scores``) is below this.

        Returns:
            A ``Segmentation`` at the original image size.
        """
        if self._state is None:
            raise RuntimeError("call set_image(image) before predict(classes)")
        _check_threshold(unknown_threshold)
        classes = parse_class_names(classes)
        cfg, state = self.config, self._state
        graphs = self._graphs()
        timings = {"encode": state.encode_s, "graphs": graphs.seconds}

        start = time.perf_counter()
        text, class_index = self.clip.encode_classes(classes)
        text = text.to(self.device, torch.float32)
        timings["text"] = time.perf_counter() - start

        start = time.perf_counter()
        working_hw = tuple(state.working.shape[-2:])
        combined = 0.0
        for setup, graph in zip(state.setups, graphs.patch):
            combined = combined + self._patch_scores(setup, graph, text, working_hw)
        combined = combined / len(state.setups)  # (C' + 1, h, w)
        timings["patch_lp"] = time.perf_counter() - start

        start = time.perf_counter()
        if graphs.pixel is not None:
            combined = graphs.pixel.propagate(combined, tol=cfg.tol, max_iter=cfg.max_iter)
        timings["pixel_lp"] = time.perf_counter() - start

        start = time.perf_counter()
        raw = _reduce_synonyms(combined[:-1], class_index.to(combined.device), len(classes))
        maps = ScoreMaps(raw, combined[-1], tuple(state.image.shape[-2:]))
        labels = maps.labels(unknown_threshold)
        timings["resize_argmax"] = time.perf_counter() - start
        return Segmentation(labels, maps, classes, timings, _settings(cfg, unknown_threshold))

    def _patch_scores(self, setup: WindowSetup, graph: PatchGraph | None, text: torch.Tensor,
                      working_hw) -> torch.Tensor:
        """Initial scores of one window setup, propagated over its patches and stitched.

        Returns:
            `(C' + 1, h, w)`: one row per synonym, then the all-ones row that keeps the
            normaliser of the propagation.
        """
        cfg = self.config
        n, _, gh, gw = setup.clip.shape
        scores = torch.einsum("nehw,ce->nhwc", setup.clip, text).reshape(n * gh * gw, -1)
        scores = torch.cat([scores, scores.new_ones(scores.shape[0], 1)], dim=1)
        if graph is not None:
            scores = graph.propagate(scores, tol=cfg.tol, max_iter=cfg.max_iter)
        grids = scores.reshape(n, gh, gw, -1).permute(0, 3, 1, 2)
        return stitch_windows(grids, setup.boxes, *working_hw, patch_size=setup.patch_size)

    def __call__(self, image, classes, *, unknown_threshold: float | None = None,
                 max_pixels: int | None = io.DEFAULT_MAX_PIXELS) -> Segmentation:
        """``set_image(image)`` then ``predict(classes)``."""
        self.set_image(image, max_pixels=max_pixels)
        return self.predict(classes, unknown_threshold=unknown_threshold)


def _reduce_synonyms(
    synonyms: torch.Tensor, class_index: torch.Tensor, n_classes: int
) -> torch.Tensor:
    """`(C', h, w)` propagated synonym scores -> `(C, h, w)`: each class's max over its
    synonyms (``class_index``: `(C',)` the class of each row), at the working size."""
    if synonyms.shape[0] == n_classes:  # no synonyms: rows are classes, in order
        return synonyms
    return torch.stack([synonyms[class_index == c].amax(dim=0) for c in range(n_classes)])


def _check_threshold(unknown_threshold: float | None) -> None:
    if unknown_threshold is None:
        return
    if isinstance(unknown_threshold, bool) or not isinstance(unknown_threshold, (int, float)):
        raise ConfigError(f"unknown_threshold must be a number or None, got "
                          f"{unknown_threshold!r}")
    if not math.isfinite(unknown_threshold):
        raise ConfigError(f"unknown_threshold must be a finite number, got {unknown_threshold}")


def _working_image(image: torch.Tensor, cfg: LPOSSConfig) -> torch.Tensor:
    """`(3, H, W)` uint8 or float image -> `(3, h, w)` float32 in [0, 1] at the working size
    (short side ``cfg.short_side``, long side at most ``cfg.long_side``)."""
    size = working_size_of(*image.shape[-2:], cfg.short_side, cfg.long_side)
    return resize_image(image, size).float()


def _settings(cfg: LPOSSConfig, unknown_threshold: float | None) -> dict:
    return {**asdict(cfg), "unknown_threshold": unknown_threshold}


@torch.inference_mode()
def refine_scores(
    image, scores: torch.Tensor, config: LPOSSConfig | None = None, *,
    max_pixels: int | None = io.DEFAULT_MAX_PIXELS,
) -> torch.Tensor:
    """LPOSS+ as a standalone post-processor for any segmenter's scores.

    The image and scores are resized to the working size (shorter side
    ``config.short_side``), propagated over the pixel graph, and resized back.

    Args:
        image: what ``io.load_image`` accepts, `(3, H, W)` once loaded.
        scores: `(C, h, w)` scores (any size; resized to the image).
        config: r, tau, alpha, tol, max_iter and short_side are used.

    Returns:
        `(C, H, W)` float32 refined scores at the image's size.
    """
    cfg = config or LPOSSConfig()
    image = io.read_image(image, max_pixels=max_pixels)
    if scores.ndim != 3 or scores.shape[0] < 1:
        raise ValueError(f"scores must have shape (C, H, W), got {tuple(scores.shape)}")
    height, width = image.shape[-2:]
    working = _working_image(image, cfg)
    y = F.interpolate(scores.float()[None], size=working.shape[-2:], mode="bilinear",
                      align_corners=False)[0]
    refined = pixel_propagation(working, y, r=cfg.r, tau=cfg.tau, alpha=cfg.alpha, tol=cfg.tol,
                                max_iter=cfg.max_iter)
    return F.interpolate(refined[None], size=(height, width), mode="bilinear",
                         align_corners=False)[0]
