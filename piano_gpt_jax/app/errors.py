"""One exception type for everything the user can fix from the page."""

from __future__ import annotations


class AppError(ValueError):
    """A problem with the user's input; pages show its message instead of a traceback."""
