"""Piano-roll pictures as PNG bytes, drawn by our `pianoroll` module (the CLI's pictures)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from piano_gpt_jax import pianoroll

# pyplot keeps global state; Streamlit runs each browser session's script in its own thread.
_PYPLOT_LOCK = threading.Lock()


def pianoroll_png(path: Path, layers: Sequence[tuple[str, Any, str]],
                  title: str | None = None) -> bytes:
    """Draw `layers` of (label, notes, colour) into `path` (inside the app's output folder) and
    return the PNG bytes."""
    with _PYPLOT_LOCK:
        pianoroll.plot_pianoroll(path, layers, title)
    return Path(path).read_bytes()
