"""What a review request that cannot be served raises, and the checks of plain request values the review shares."""

from __future__ import annotations

from typing import Any

from pellucid.models.prototype_corrections import MARKS

MAX_NOTE = 500


class ReviewError(ValueError):
    """A review request that cannot be served: names what was asked, what is expected and what was given."""


def check_index(value: Any, count: int, what: str) -> int:
    """``value`` as an index in ``[0, count)``.

    Raises:
        ReviewError: for a value that is not an integer (``True`` is not one) or lies outside the range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ReviewError(f"{what}: expected an integer index in [0, {count}), got {value!r}")
    if not 0 <= value < count:
        raise ReviewError(f"{what}: expected an index in [0, {count}), got {value}")
    return value


def check_mark(mark: Any) -> str | None:
    """``"forbid"``, ``"keep"`` or ``None`` (clear).

    Raises:
        ReviewError: for anything else.
    """
    if mark is not None and mark not in MARKS:
        raise ReviewError(f"mark: expected one of {list(MARKS)} or null (clear), got {mark!r}")
    return mark


def check_note(note: Any) -> str:
    """A short free text, stripped.

    Raises:
        ReviewError: for a note that is not a text of at most :data:`MAX_NOTE` characters.
    """
    if not isinstance(note, str) or len(note) > MAX_NOTE:
        raise ReviewError(f"note: expected a text of at most {MAX_NOTE} characters, got "
                          f"{type(note).__name__} of length {len(note) if isinstance(note, str) else '-'}")
    return note.strip()


__all__ = ["MAX_NOTE", "ReviewError", "check_index", "check_mark", "check_note"]
