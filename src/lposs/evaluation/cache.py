"""The encoder-output cache: each image's ``EncodedImage`` kept on disk, so that runs that
differ only in propagation settings (a sweep) encode every image once."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ..errors import DatasetError, LpossError
from ..output.files import file_sha256
from ..pipeline.encoded import EncodedImage
from ..pipeline.segmenter import Segmenter
from .records import file_name
from .settings import settings_digest

__all__ = ["cache_folder", "encode_cached"]

_log = logging.getLogger(__name__)


def cache_folder(cache_dir: str | os.PathLike, encoder_identity: str) -> Path:
    """The folder of ``cache_dir`` for these encoders (``Segmenter.encoder_identity``: the
    encoder settings, the precision and the weights' ``weights_id``), created if needed.

    Raises:
        LpossError: the folder cannot be created.
    """
    folder = Path(cache_dir) / f"encoded-{settings_digest({'encoders': encoder_identity})[:16]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LpossError(f"cannot write to cache folder {cache_dir}: {err}") from None
    return folder


def encode_cached(segmenter: Segmenter, sample_id: str, image_path: Path,
                  cache: Path | None) -> bool:
    """Encodes the image into the segmenter, through the cache; returns whether it hit.

    The cache file is named by the sample id and the image file's content hash (the folder
    by the encoder settings, see ``cache_folder``), so a changed image is encoded again.
    """
    path = None
    if cache is not None:
        try:
            path = cache / f"{file_name(sample_id)}-{file_sha256(image_path)[:16]}.pt"
        except OSError as err:
            raise DatasetError(f"cannot read image {image_path}: {err}") from None
        if path.is_file():
            try:
                segmenter.set_encoded(EncodedImage.load(path, segmenter.device))
                return True
            except Exception as err:  # any damage to a cache file: encode again
                _log.warning("lposs: cache file %s is unusable (%s); encoding again", path, err)
    encoded = segmenter.set_image(image_path)
    if path is not None:
        try:
            encoded.save(path)
        except OSError as err:
            _log.warning("lposs: cannot write cache file %s (%s)", path, err)
    return False
