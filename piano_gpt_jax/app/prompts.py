"""Prompt notes for the Generate page: from an uploaded MIDI file or a dataset piece, sliced by note
index or seconds, transposed and sped up or slowed down."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.music import layouts, pieces
from piano_gpt_jax.music.midi import MidiReadError, read_midi

COLUMNS = ("pitch", "velocity", "start", "end")
SLICE_MODES = ("notes", "seconds")


@dataclass(frozen=True)
class Prompt:
    notes: pd.DataFrame  # pitch, velocity, start, end; sorted by start, first note at t = 0
    description: str
    dataset_token: str = layouts.FALLBACK_DATASET_TOKEN
    composer_token: str = layouts.UNKNOWN_COMPOSER_TOKEN


def frame(notes: Any) -> pd.DataFrame:
    """The four note columns as a DataFrame sorted by start (then pitch), whatever the input."""
    if notes is None or len(notes) == 0:
        return pd.DataFrame({c: np.zeros(0, np.int64 if c in ("pitch", "velocity") else float)
                             for c in COLUMNS})
    df = pd.DataFrame({c: np.asarray(notes[c]) for c in COLUMNS})
    return df.sort_values(["start", "pitch"], kind="stable").reset_index(drop=True)


def display_name(name: str) -> str:
    """An uploaded file's name as the page may show it: control characters (a NUL byte replaced
    the page with Streamlit's exception box) dropped, at most 120 characters."""
    clean = "".join(ch for ch in str(name) if ch.isprintable())
    return (clean[:117] + "...") if len(clean) > 120 else (clean or "upload.mid")


def empty_prompt() -> Prompt:
    return Prompt(frame(None), "no prompt (the model starts from scratch)")


def read_upload(data: bytes, name: str, scratch: Path) -> pd.DataFrame:
    """Notes of an uploaded MIDI file. The bytes are written into the app's own scratch directory
    because the MIDI reader needs a path; the user's file is never touched."""
    if not data:
        raise AppError(f"the uploaded file {name!r} is empty; upload a .mid/.midi file")
    path = scratch / "upload.mid"
    path.write_bytes(data)
    try:
        notes = read_midi(path)
    except MidiReadError as e:
        raise AppError(f"{name!r} is not a readable MIDI file ({e.reason}); upload a standard "
                       ".mid/.midi file") from None
    if len(notes) == 0:
        raise AppError(f"{name!r} holds no piano notes (no note events in the range A0..C8); "
                       "upload another file")
    return frame(notes)


def prompt_from_record(record: Any, description: str) -> Prompt:
    """A dataset record as a prompt, with the dataset and composer tokens its source names."""
    try:
        notes = pieces.notes_from_record(record)
    except ValueError as e:
        raise AppError(f"{description}: {e}") from None
    source = record.get("source") if hasattr(record, "get") else None
    return Prompt(frame(notes), description, layouts.dataset_token(source),
                  layouts.composer_token(source))


def slice_notes(notes: pd.DataFrame, mode: str, first: float, last: float) -> pd.DataFrame:
    """Notes [first, last) by index (mode "notes") or by start time in seconds ("seconds"),
    shifted so the first kept note starts at 0."""
    if mode not in SLICE_MODES:
        raise AppError(f"slice mode must be one of {SLICE_MODES}, got {mode!r}")
    if last <= first:
        raise AppError(f"the slice end ({last:g}) must be after its start ({first:g})")
    df = frame(notes)
    if mode == "notes":
        df = df.iloc[int(first):int(last)]
    else:
        t = df["start"] - (df["start"].min() if len(df) else 0.0)
        df = df[(t >= first) & (t < last)]
    return pieces.shift_to_zero(df).reset_index(drop=True)


def transform(notes: pd.DataFrame, pitch_shift: int = 0, speed: float = 1.0) -> pd.DataFrame:
    """Transpose by `pitch_shift` semitones and play `speed` times faster, with the trainer's own
    augmentation functions so a prompt looks like the records the model saw."""
    df = frame(notes)
    if len(df) == 0 or (pitch_shift == 0 and speed == 1.0):
        return df
    piece = {c: df[c].to_numpy() for c in COLUMNS}
    try:
        if pitch_shift:
            piece = pieces.pitch_shift(piece, int(pitch_shift))
        if speed != 1.0:
            piece = pieces.change_speed(piece, float(speed))
    except ValueError as e:
        allowed = pieces.allowed_pitch_shifts(piece, 48)
        raise AppError(f"{e} (this prompt allows shifts {allowed[0]}..{allowed[-1]})") from None
    return frame(piece)


def duration_s(notes: pd.DataFrame) -> float:
    return float(notes["end"].max() - notes["start"].min()) if len(notes) else 0.0
