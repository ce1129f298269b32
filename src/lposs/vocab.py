"""Class vocabularies: the one home of the rules for class names and their synonyms.

A vocabulary is a list of class names; a name may hold ``;``-separated synonyms
(``"grass;lawn"``), which the text encoder embeds one by one and the segmenter reduces by
their maximum. Names come from a comma-separated string or list (:func:`parse_class_names`),
or from a file with one class per line (:func:`load_class_names`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .config import UNKNOWN
from .errors import ClassNamesError, DatasetError

__all__ = [
    "MAX_CLASSES",
    "MAX_NAMES",
    "SYNONYM_SEPARATOR",
    "check_class_names",
    "load_class_names",
    "parse_class_names",
    "split_synonyms",
]

MAX_CLASSES = UNKNOWN - 1
"""Most classes in one vocabulary (254): indices 0..253 and ``UNKNOWN`` fit an 8-bit PNG."""

MAX_NAMES = 512
"""Most text rows in one vocabulary, classes and synonyms together (three times COCO-Stuff's
171): each is propagated separately, so memory and time grow with their number (about
20 MB a row at the largest working size, 448 x 2048)."""

MAX_CLASS_FILE_BYTES = 4 << 20
"""Largest class-name file read (4 MiB): a list of 254 names is a few kilobytes."""

SYNONYM_SEPARATOR = ";"
"""Separates the synonyms of one class name: ``"background;wall;floor"``."""


def split_synonyms(name: str) -> list[str]:
    """The synonyms of one class name, whitespace around each stripped.

    Args:
        name: A class name, e.g. ``"grass; lawn"``.

    Returns:
        The synonyms in order, e.g. ``["grass", "lawn"]`` (one for a plain name).

    Raises:
        ClassNamesError: The name or one of its synonyms is empty (``"a;"``, ``" "``).
    """
    synonyms = [s.strip() for s in name.split(SYNONYM_SEPARATOR)]
    if not all(synonyms):
        raise ClassNamesError(f"empty class name in {name!r}")
    return synonyms


def parse_class_names(classes: str | Sequence[str]) -> list[str]:
    """Validate a vocabulary given by a user.

    Args:
        classes: a comma-separated string or a sequence of names; a name may hold
            ``;``-separated synonyms ("grass;lawn").

    Returns:
        The names, whitespace around names and synonyms stripped.

    Raises:
        TypeError: ``classes`` is not a str, list or tuple (a set or dict has no fixed
            order, so the label order would change from run to run).
        ClassNamesError: the list is empty, a name or synonym is empty, a name repeats
            (ignoring case), there are more than :data:`MAX_CLASSES` (254) names (class
            indices 0..253 and ``UNKNOWN`` (255) fit the 8-bit label PNG), or more than
            :data:`MAX_NAMES` (512) names and synonyms together.
    """
    if isinstance(classes, str):
        classes = classes.split(",")
    elif not isinstance(classes, Sequence):
        kind = type(classes).__name__
        raise TypeError(f"classes must be a list, tuple or comma-separated str, got a {kind}: "
                        "its order is not fixed, so label i would not always be the same "
                        "class; pass a list in the order you want (e.g. sorted(classes))")
    names = []
    for raw in classes:
        if not isinstance(raw, str):
            raise ClassNamesError(f"class names must be strings, got {type(raw).__name__}")
        names.append(SYNONYM_SEPARATOR.join(split_synonyms(raw)))
    if not names:
        raise ClassNamesError("the class list is empty: give at least one class name")
    seen = set()
    for name in names:
        if name.lower() in seen:
            raise ClassNamesError(f"duplicate class name {name!r}")
        seen.add(name.lower())
    if len(names) >= UNKNOWN:
        raise ClassNamesError(
            f"at most {MAX_CLASSES} classes are supported, got {len(names)}: the label PNG "
            f"stores class indices 0..{MAX_CLASSES - 1} in 8 bits and {UNKNOWN} = unknown; "
            "split the vocabulary into several runs")
    rows = sum(len(split_synonyms(name)) for name in names)
    if rows > MAX_NAMES:
        raise ClassNamesError(
            f"at most {MAX_NAMES} names and synonyms together are supported, got {rows}: each "
            "is propagated separately, so memory and time grow with their number; drop "
            "synonyms or split the vocabulary into several runs")
    return names


def check_class_names(names: Sequence[str], *, source: str) -> list[str]:
    """Validate a benchmark's or dataset's class list, keeping the names verbatim.

    Unlike :func:`parse_class_names`, names are not stripped (ADE20K's published list has
    ``"bed "``) and duplicates are compared case-sensitively.

    Args:
        names: Class names, index = label value.
        source: Where the names come from, for the error messages.

    Returns:
        The names as a new list.

    Raises:
        TypeError: ``names`` is not a sequence of strings.
        ClassNamesError: No names, an empty name or synonym, or a repeated name.
    """
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(f"class_names must be a list of strings, got {type(names).__name__}")
    out = []
    for i, name in enumerate(names):
        if not isinstance(name, str):
            raise TypeError(f"class_names[{i}] must be a str, got {type(name).__name__}")
        try:
            split_synonyms(name)
        except ClassNamesError:
            raise ClassNamesError(
                f"{source}: class {i} ({name!r}) has an empty name or synonym"
            ) from None
        out.append(name)
    if not out:
        raise ClassNamesError(f"{source}: no class names")
    duplicates = sorted({n for n in out if out.count(n) > 1})
    if duplicates:
        raise ClassNamesError(f"{source}: duplicate class names {duplicates}")
    return out


def load_class_names(path: str | os.PathLike) -> list[str]:
    """Read a class-name file: one class per line, ``;`` between synonyms.

    Blank lines and lines starting with ``#`` are skipped; names and synonyms are stripped.

    Args:
        path: A UTF-8 text file.

    Returns:
        The class names, in file order.

    Raises:
        DatasetError: The file does not exist.
        ClassNamesError: The file is unreadable or holds no names, or empty or duplicate
            names.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"class-name file not found: {path}" if not path.exists() else
                           f"class-name file {path} is not a regular file")
    size = path.stat().st_size
    if size > MAX_CLASS_FILE_BYTES:
        raise ClassNamesError(f"class-name file {path} is {size / 2**20:.1f} MiB; a class list "
                              f"is at most {MAX_CLASS_FILE_BYTES // 2**20} MiB (is it the right "
                              "file?)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassNamesError(f"cannot read class-name file {path}: {exc}") from exc
    names = [line.strip() for line in lines]
    names = [
        SYNONYM_SEPARATOR.join(s.strip() for s in name.split(SYNONYM_SEPARATOR))
        for name in names
        if name and not name.startswith("#")
    ]
    return check_class_names(names, source=f"class-name file {path}")
