"""Piano-roll pictures: prompt and generated notes in two colours, so a listener can see at a
glance what the model added."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

PROMPT_COLOUR = "#4a7fb5"
GENERATED_COLOUR = "#e0702a"
TARGET_COLOUR = "#9a9a9a"


def _arrays(notes: Any) -> tuple[np.ndarray, ...]:
    if notes is None or len(notes) == 0 or "pitch" not in notes:
        z = np.zeros(0)
        return z, z, z, z
    return tuple(np.asarray(notes[k], np.float64) for k in ("pitch", "start", "end", "velocity"))


def plot_pianoroll(path: str | os.PathLike, layers: Sequence[tuple[str, Any, str]],
                   title: str | None = None) -> Path:
    """Draw `layers` of (label, notes, colour) and write a PNG (temp file, then rename).

    Louder notes are drawn more opaque. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Patch, Rectangle

    fig, ax = plt.subplots(figsize=(14, 5), dpi=100)
    lo, hi, t_max = 108, 21, 1.0
    handles = []
    for label, notes, colour in layers:
        pitch, start, end, velocity = _arrays(notes)
        if len(pitch):
            lo, hi = min(lo, int(pitch.min())), max(hi, int(pitch.max()))
            t_max = max(t_max, float(end.max()))
            alpha = 0.35 + 0.65 * np.clip(velocity / 127.0, 0, 1)
            rects = [Rectangle((s, p - 0.4), e - s, 0.8) for p, s, e in zip(pitch, start, end,
                                                                              strict=True)]
            ax.add_collection(PatchCollection(rects, facecolors=[(*matplotlib.colors.to_rgb(
                colour), a) for a in alpha], edgecolors="none"))
        handles.append(Patch(color=colour, label=f"{label} ({len(pitch)} notes)"))
    if lo > hi:
        lo, hi = 48, 72
    ax.set_xlim(0, t_max * 1.01)
    ax.set_ylim(lo - 2, hi + 2)
    ax.set_xlabel("time [s]")
    ax.set_ylabel("MIDI pitch")
    ax.grid(axis="y", alpha=0.2)
    ax.legend(handles=handles, loc="upper right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def prompt_and_generation(path: str | os.PathLike, prompt: Mapping | Any, generated: Any,
                          target: Any = None, title: str | None = None) -> Path:
    """The usual picture: prompt, generation and (for a PIANO task) the true target."""
    layers = [("prompt", prompt, PROMPT_COLOUR)]
    if target is not None:
        layers.append(("original target", target, TARGET_COLOUR))
    layers.append(("generated", generated, GENERATED_COLOUR))
    return plot_pianoroll(path, layers, title)
