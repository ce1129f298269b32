"""Typed exceptions for mistakes a user can make; the CLI turns each into one stderr line."""

__all__ = [
    "is_out_of_memory",
    "LpossError",
    "ImageError",
    "ClassNamesError",
    "WeightsNotFoundError",
    "UnsafeCheckpointError",
    "DatasetError",
    "ConfigError",
    "ScoresError",
    "OutputError",
]


class LpossError(Exception):
    """Base class of every error lposs raises for bad input."""


class ImageError(LpossError, ValueError):
    """An image is missing, unreadable, truncated, too large or of an unusable shape."""


class ClassNamesError(LpossError, ValueError):
    """The class vocabulary is empty, has empty names or duplicates."""


class WeightsNotFoundError(LpossError, FileNotFoundError):
    """Model weights could not be found, fetched or read.

    Raised for weights missing everywhere (the message says how to provide them, for
    every model missing at once) and for a weight file that is unreadable, not a
    checkpoint, or not one of the model (the message names the file and what was
    expected).
    """


class UnsafeCheckpointError(LpossError, ValueError):
    """A checkpoint would need unpickling arbitrary Python objects to load."""


class DatasetError(LpossError, FileNotFoundError):
    """A dataset folder is missing or malformed; the message names the expected path."""


class ConfigError(LpossError, ValueError):
    """A setting or preset name is invalid."""


class ScoresError(LpossError, ValueError):
    """Scores or a label map to refine are empty, not finite, or not of the image's shape."""


class OutputError(LpossError, ValueError):
    """An output name would leave its folder, or another lposs is writing to the folder."""


# How allocators word running out: torch's CUDA/MPS/XPU ("... out of memory"), its CPU
# allocator ("DefaultCPUAllocator: can't allocate memory").
_OUT_OF_MEMORY_PHRASES = ("out of memory", "can't allocate memory")


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` says memory ran out: ``MemoryError``, or a ``RuntimeError`` (among
    them ``torch.cuda.OutOfMemoryError``) whose message says so."""
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(p in text for p in _OUT_OF_MEMORY_PHRASES)
