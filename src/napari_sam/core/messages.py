"""Error messages shown on one line (CLI errors, wrapped exceptions)."""

from __future__ import annotations


def first_line(exc: BaseException, limit: int = 200, fallback: str | None = None) -> str:
    """The first line of ``exc``'s message, at most ``limit`` characters; ``fallback`` (default: the exception's
    type name) when the message is empty."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__ if fallback is None else fallback
    return text.splitlines()[0][:limit]
