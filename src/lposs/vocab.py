"""Class vocabularies: the one home of the rules for class names and their synonyms.

A vocabulary is an ordered list of class names; a name may hold ``;``-separated synonyms
(``"grass;lawn"``), which the text encoder embeds one by one and the segmenter reduces by
their maximum. :func:`vocabulary` applies the rules once and gives a :class:`Vocabulary`:
the names, one text row per synonym, and the class of each row.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .config import MAX_CLASS_FILE_BYTES, MAX_CLASSES, MAX_NAMES, UNKNOWN
from .errors import ClassNamesError, DatasetError

__all__ = ["Vocabulary", "vocabulary", "parse_class_names", "check_class_names",
           "load_class_names", "split_synonyms", "SYNONYM_SEPARATOR"]

SYNONYM_SEPARATOR = ";"
"""Separates the synonyms of one class name: ``"background;wall;floor"``."""


@dataclass(frozen=True)
class Vocabulary:
    """Class names with their synonyms, checked.

    Attributes:
        names: the C class names, synonyms joined by ``;`` (label i is ``names[i]``).
        rows: the C' >= C text rows, one per synonym, in class order.
        class_index: for each row, the index of its class.
    """

    names: tuple[str, ...]
    rows: tuple[str, ...]
    class_index: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)


def split_synonyms(name: str) -> list[str]:
    """The synonyms of one class name, whitespace around each stripped.

    Raises:
        ClassNamesError: The name or one of its synonyms is empty (``"a;"``, ``" "``).
    """
    synonyms = [s.strip() for s in name.split(SYNONYM_SEPARATOR)]
    if not all(synonyms):
        raise ClassNamesError(f"empty class name or synonym in {name!r}")
    return synonyms


def vocabulary(classes: str | Sequence[str], *, published: bool = False) -> Vocabulary:
    """Check a vocabulary and split it into text rows.

    The rules: an ordered list (a comma-separated string, list or tuple); no empty name or
    synonym; no name twice (ignoring case); at most 254 classes (indices 0..253 and
    ``UNKNOWN`` = 255 fit the 8-bit label PNG) and 512 rows (each is propagated). A user's
    names are stripped of surrounding whitespace and may not share a synonym (the class
    listed later could never win). A ``published`` benchmark list is kept verbatim
    (ADE20K's has ``"bed "``, and the paper's COCO-Object background lists ``bed``, a class
    of its own), since its exact text decides the paper's numbers.

    Raises:
        TypeError: ``classes`` has no fixed order (a set, dict or generator).
        ClassNamesError: a rule above is broken; the message names the class.
        TypeError: a name is not a string.
    """
    given = classes
    if isinstance(classes, str):
        classes = classes.split(",")
    elif not isinstance(classes, (list, tuple)):
        raise TypeError(f"classes must be a list, tuple or comma-separated str, got a "
                        f"{type(classes).__name__}: its order is not fixed, so label i would "
                        "not always be the same class; pass a list in the order you want "
                        "(e.g. sorted(classes))")
    if not classes:
        raise ClassNamesError("no class names: the list is empty; give at least one")
    names, rows, index = [], [], []
    for i, name in enumerate(classes):
        if not isinstance(name, str):
            raise TypeError(f"class {i + 1} must be a string, got {type(name).__name__}")
        synonyms = name.split(SYNONYM_SEPARATOR)
        synonyms = synonyms if published else [s.strip() for s in synonyms]
        if not all(s.strip() for s in synonyms):
            where = f" of {given!r}" if isinstance(given, str) else ""
            raise ClassNamesError(f"empty class name or synonym in {name!r} (class {i + 1}"
                                  f"{where})")
        names.append(SYNONYM_SEPARATOR.join(synonyms))
        rows += synonyms
        index += [i] * len(synonyms)
    _check_unique(names, rows, index, published)
    if len(names) >= UNKNOWN:
        raise ClassNamesError(
            f"at most {MAX_CLASSES} classes are supported, got {len(names)}: the label PNG "
            f"stores class indices 0..{MAX_CLASSES - 1} in 8 bits and {UNKNOWN} = unknown; "
            "split the vocabulary into several runs")
    if len(rows) > MAX_NAMES:
        raise ClassNamesError(
            f"at most {MAX_NAMES} names and synonyms together are supported, got {len(rows)}: "
            "each is propagated separately, so memory and time grow with their number; drop "
            "synonyms or split the vocabulary into several runs")
    return Vocabulary(tuple(names), tuple(rows), tuple(index))


def _check_unique(names: list[str], rows: list[str], index: list[int], published: bool) -> None:
    seen: dict[str, int] = {}
    for name in names:
        if name.lower() in seen:
            raise ClassNamesError(f"duplicate class name {name!r}")
        seen[name.lower()] = 1
    if published:
        return
    owner: dict[str, int] = {}
    for row, c in zip(rows, index):
        first = owner.setdefault(row.lower(), c)
        if first != c:
            raise ClassNamesError(
                f"synonym {row!r} belongs to both {names[first]!r} and {names[c]!r}: the "
                "class listed later could never win; keep it in one class")


def parse_class_names(classes: str | Sequence[str]) -> list[str]:
    """A user's vocabulary checked (:func:`vocabulary`): the class names, stripped."""
    return list(vocabulary(classes).names)


def check_class_names(names: Sequence[str], *, source: str) -> list[str]:
    """A benchmark's or dataset's published class list checked and kept verbatim
    (:func:`vocabulary` with ``published=True``); errors are prefixed by ``source``."""
    if not isinstance(names, (list, tuple)):
        raise TypeError(f"class_names must be a list of strings, got {type(names).__name__}")
    try:
        return list(vocabulary(list(names), published=True).names)
    except ClassNamesError as err:
        raise ClassNamesError(f"{source}: {err}") from None


_COMMENT = re.compile(r"(^|\s)#.*$")


def load_class_names(path: str | os.PathLike) -> list[str]:
    """Read a class-name file: UTF-8 (a byte-order mark is dropped), one class per line,
    ``;`` between synonyms; blank lines and ``#`` comments (a line's end from a ``#`` at
    its start or after a space) are skipped. The names follow :func:`vocabulary`'s rules.

    Raises:
        DatasetError: The file does not exist or is not a regular file.
        ClassNamesError: The file is too large or unreadable, or its names break a rule.
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
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ClassNamesError(f"cannot read class-name file {path}: {exc}") from exc
    names = [_COMMENT.sub("", line).strip() for line in lines]
    try:
        return parse_class_names([name for name in names if name])
    except ClassNamesError as err:
        raise ClassNamesError(f"class-name file {path}: {err}") from None
