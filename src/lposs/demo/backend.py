"""What the demo page runs on, without Gradio: the encoders (built on first use, shared by
every preset that names them), one ``Segmenter`` per setting sharing those encoders, and
the encoded images, cached by image content, so that changing the class names, the
method (LPOSS or LPOSS+) or the propagation settings never re-runs the encoders.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..config import DEMO_MAX_PIXELS, LPOSSConfig
from ..errors import ClassNamesError, ImageError, LpossError

__all__ = ["DemoBackend", "DemoResult"]

_KEEP_RUNS = 32  # output folders (label PNG + JSON) kept for download


@dataclass
class DemoResult:
    """What one click produces.

    Attributes:
        overlay: the image blended with the class colours, legend on the right (PIL).
        shares: ``(name, (r, g, b), share)`` per class, then unknown when present.
        timings: seconds per stage of this run (``encode`` is 0 when the encoding was reused).
        encoded_reused: the image was encoded earlier (another vocabulary or method).
        files: the label PNG and the JSON summary.
        size: (H, W) of the image.
    """

    overlay: object
    shares: list[tuple[str, tuple[int, int, int], float]]
    timings: dict[str, float]
    encoded_reused: bool
    files: list[Path]
    size: tuple[int, int]


class DemoBackend:
    """Models, segmenters and encoded images behind the demo page (thread-safe).

    Args:
        presets: the preset configs offered, by name (the command line's model options
            already applied to each).
        default_preset: the preset whose models ``clip_weights`` / ``dino_weights`` are.
        clip_weights: a local CLIP checkpoint for the default preset's CLIP model.
        dino_weights: a local checkpoint for the default preset's vision model.
        device: torch device of the models (default: CPU).
        precision: encoder precision, "fp32", "fp16" or "bf16".
        max_pixels: largest image (height x width) accepted.
        cache_size: encoded images kept (each a few MB at the default settings).
    """

    def __init__(
        self,
        presets: Mapping[str, LPOSSConfig],
        default_preset: str,
        *,
        clip_weights: str | os.PathLike | None = None,
        dino_weights: str | os.PathLike | None = None,
        device: str | None = None,
        precision: str = "fp32",
        max_pixels: int | None = DEMO_MAX_PIXELS,
        cache_size: int = 8,
    ) -> None:
        if default_preset not in presets:
            raise ValueError(f"default_preset {default_preset!r} is not one of {list(presets)}")
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.presets = dict(presets)
        self.default_preset = default_preset
        base = self.presets[default_preset]
        self._clip_weights = {(base.clip, base.clip_pretrained): clip_weights}
        self._dino_weights = {base.dino: dino_weights}
        self.device, self.precision, self.max_pixels = device, precision, max_pixels
        self._clips: dict = {}
        self._dinos: dict = {}
        self._segmenters: dict = {}
        self._encoded: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._out_dir = Path(tempfile.mkdtemp(prefix="lposs-demo-"))
        self._runs: list[Path] = []

    @property
    def output_dir(self) -> Path:
        """Where the downloadable files are written (a fresh temporary folder)."""
        return self._out_dir

    def close(self) -> None:
        """Delete the downloadable files."""
        shutil.rmtree(self._out_dir, ignore_errors=True)

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the request being computed (if any) to
        finish; returns whether none is running now."""
        if not self._lock.acquire(timeout=max(timeout, 0.0)):
            return False
        self._lock.release()
        return True

    def limits(self) -> str:
        """The per-request bounds, in words for the page: the largest image, and the
        working size every image is resized to (the default preset's)."""
        base = self.presets[self.default_preset]
        text = []
        if self.max_pixels is not None:
            text.append(f"images up to {self.max_pixels / 1e6:.3g} megapixels")
        working = f"processed at a working size: shorter side {base.short_side} px"
        long_side = getattr(base, "long_side", None)
        if long_side is not None:
            working += f", longer side at most {long_side} px"
        return "; ".join([*text, working])

    def config(self, preset: str, refine: bool) -> LPOSSConfig:
        """The settings of ``preset`` with the pixel stage on (LPOSS+) or off (LPOSS)."""
        if preset not in self.presets:
            raise LpossError(f"unknown preset {preset!r}; choose one of: {', '.join(self.presets)}")
        return self.presets[preset].replace(pixel_stage=bool(refine))

    def load(self, preset: str | None = None) -> None:
        """Build the models of ``preset`` (default: the default preset) now."""
        with self._lock:
            self._segmenter(self.config(preset or self.default_preset, True))

    def segment(
        self,
        image: str | os.PathLike | None,
        classes: str | None,
        *,
        preset: str,
        refine: bool = True,
        unknown_threshold: float | None = None,
    ) -> DemoResult:
        """Segment an image file into comma-separated classes.

        Raises:
            LpossError: no image, not an image, too large, no or bad class names, weights
                of a preset's model not found; the message is meant for the user.
        """
        if image is None or not str(image):
            raise ImageError("no image: upload one (or pick an example) first")
        if classes is not None and not isinstance(classes, str):
            raise TypeError(f"classes must be a comma-separated str, got {type(classes).__name__}")
        if classes is None or not classes.strip(" ,;\n\t"):
            raise ClassNamesError("no class names: type some, comma-separated, e.g. "
                                  "'sky, grass;lawn, house' (';' joins synonyms)")
        from ..pipeline.checks import check_unknown_threshold
        from ..vocab import parse_class_names

        names = parse_class_names(classes)
        check_unknown_threshold(unknown_threshold)
        config = self.config(preset, refine)
        with self._lock:
            segmenter = self._segmenter(config)
            encoded, reused = self._encode(segmenter, Path(image))
            segmenter.set_encoded(encoded)
            result = segmenter.predict(names, unknown_threshold=unknown_threshold)
            result.timings = {**result.timings, "encode": 0.0 if reused else encoded.encode_s}
            files = self._save(result, Path(image).stem)
        from ..output.drawing import UNKNOWN_COLOR

        overlay = result.overlay(encoded.image)
        colors = [tuple(int(v) for v in c) for c in result.colors()]
        shares = [(name, colors[i] if i < len(colors) else UNKNOWN_COLOR, share)
                  for i, (name, share) in enumerate(result.class_shares().items())]
        return DemoResult(overlay, shares, result.timings, reused, files,
                          tuple(result.labels.shape))

    # ------------------------------------------------------------------ internals
    def _segmenter(self, config: LPOSSConfig):
        """One Segmenter per config; the encoders are shared by every config naming them."""
        from ..pipeline.segmenter import Segmenter

        if config not in self._segmenters:
            clip = self._clip(config)
            dino = self._dino(config) if config.uses_dino else None
            self._segmenters[config] = Segmenter(clip, dino, config)
        return self._segmenters[config]

    def _clip(self, config: LPOSSConfig):
        key = (config.clip, config.clip_pretrained)
        if key not in self._clips:
            from ..encoders import load_clip

            self._clips[key] = load_clip(config.clip, config.clip_pretrained,
                                         weights=self._clip_weights.get(key), device=self.device,
                                         precision=self.precision)
        return self._clips[key]

    def _dino(self, config: LPOSSConfig):
        if config.dino not in self._dinos:
            from ..encoders import load_dino

            self._dinos[config.dino] = load_dino(config.dino,
                                                 weights=self._dino_weights.get(config.dino),
                                                 device=self.device, precision=self.precision)
        return self._dinos[config.dino]

    def _encode(self, segmenter, path: Path):
        """The encoded image, from the cache when this content was encoded with these
        encoders and windows before. Returns ``(EncodedImage, reused)``."""
        from ..output.files import file_sha256

        try:
            digest = file_sha256(path)
        except OSError as err:
            raise ImageError(f"cannot read the uploaded file: {err.strerror or err}") from None
        key = (digest, segmenter.encoder_identity())  # settings, precision, weights_id
        if key in self._encoded:
            self._encoded.move_to_end(key)
            return self._encoded[key], True
        from ..pipeline.image import read_image

        try:  # uint8, as lposs segment reads it: the same OpenCV resize, the same answer
            image = read_image(path, max_pixels=self.max_pixels)
        except ImageError as err:  # name the upload by its file name, not the server's path
            raise ImageError(str(err).replace(str(path), path.name)) from None
        encoded = segmenter.set_image(image, max_pixels=None)
        self._encoded[key] = encoded
        while len(self._encoded) > self._cache_size:
            self._encoded.popitem(last=False)
        return encoded, False

    def _save(self, result, stem: str) -> list[Path]:
        stem = re.sub(r"[^\w.-]+", "_", stem).strip("._") or "image"
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=self._out_dir))
        self._runs.append(run_dir)
        while len(self._runs) > _KEEP_RUNS:
            shutil.rmtree(self._runs.pop(0), ignore_errors=True)
        return result.save(run_dir, f"{stem}_lposs")
