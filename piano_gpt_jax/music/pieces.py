"""Piece-level note utilities shared by every data source and by record building.

A *piece* here is a plain ``dict`` of equal-length numpy arrays ``pitch``, ``velocity`` (int64) and
``start``, ``end``, ``duration`` (float64 seconds), sorted by start time (then pitch). Working on
arrays rather than DataFrames keeps augmentation and splitting vectorised and cheap to copy.

Validation policy of :func:`clean_notes` (applied by :func:`notes_from_record`):

* notes with a non-finite time, ``end <= start`` (zero or negative length) or a pitch outside the
  piano range 21..108 are dropped, and the number of dropped notes is reported per reason;
* velocities are clipped into 1..127 (a MIDI note-on with velocity 0 is a note-off);
* a record whose columns are missing or of unequal length is rejected with :class:`BadRecordError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

PITCH_MIN = 21
PITCH_MAX = 108
NOTE_COLUMNS = ("pitch", "velocity", "start", "end", "duration")
_REQUIRED_COLUMNS = ("pitch", "velocity", "start", "end")

class BadRecordError(ValueError):
    """A record cannot be read as a piece at all (missing or mismatched note columns)."""


Notes = dict[str, np.ndarray]


def _columns(notes: Any) -> Mapping[str, Any]:
    if hasattr(notes, "columns"):  # pandas DataFrame
        return {c: notes[c].to_numpy() for c in notes.columns}
    if isinstance(notes, Mapping):
        return notes
    raise BadRecordError(
        f"notes must be a mapping of arrays or a DataFrame, got {type(notes).__name__}"
    )


def as_notes(notes: Any) -> Notes:
    """THE adapter into a piece: a DataFrame (also the column-less one a decoder returns for no
    notes), a mapping of arrays, or None. Rows are kept as given (no cleaning or sorting: that
    is `clean_notes`); `duration` is added when missing."""
    if notes is None or (hasattr(notes, "columns") and len(notes) == 0):
        return empty_notes()
    cols = _columns(notes)
    missing = [c for c in _REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise BadRecordError(f"notes lack the column(s) {missing}; notes need pitch, velocity, "
                             "start, end (seconds)")
    out = {c: np.asarray(cols[c]).reshape(-1) for c in _REQUIRED_COLUMNS}
    out["duration"] = (np.asarray(cols["duration"]).reshape(-1) if "duration" in cols
                       else out["end"].astype(np.float64) - out["start"].astype(np.float64))
    return out


def to_frame(notes: Any) -> pd.DataFrame:
    """A piece as a DataFrame of pitch, velocity, start, end sorted by start (stable): what MIDI
    writing, piano rolls and the reference's notes_df consumers take."""
    n = as_notes(notes)
    df = pd.DataFrame({k: n[k] for k in _REQUIRED_COLUMNS})
    return df.sort_values("start", kind="stable").reset_index(drop=True)


def empty_notes() -> Notes:
    return {
        "pitch": np.zeros(0, np.int64),
        "velocity": np.zeros(0, np.int64),
        "start": np.zeros(0, np.float64),
        "end": np.zeros(0, np.float64),
        "duration": np.zeros(0, np.float64),
    }


def clean_notes(notes: Any) -> tuple[Notes, dict[str, int]]:
    """Validate and normalise notes; return the piece and how many notes were dropped, per reason.

    Dropping (rather than rejecting the whole piece) keeps real-world files usable: one stray
    out-of-range note should not cost a whole performance.
    """
    cols = _columns(notes)
    missing = [c for c in _REQUIRED_COLUMNS if c not in cols]
    if missing:
        raise BadRecordError(
            f"notes lack the column(s) {missing}; a piece needs pitch, velocity, start, end"
        )
    try:
        pitch = np.asarray(cols["pitch"], dtype=np.float64).reshape(-1)
        velocity = np.asarray(cols["velocity"], dtype=np.float64).reshape(-1)
        start = np.asarray(cols["start"], dtype=np.float64).reshape(-1)
        end = np.asarray(cols["end"], dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise BadRecordError(f"note columns are not numeric: {err}") from None
    lengths = {len(pitch), len(velocity), len(start), len(end)}
    if len(lengths) != 1:
        raise BadRecordError(
            f"note columns have different lengths (pitch {len(pitch)}, velocity {len(velocity)}, "
            f"start {len(start)}, end {len(end)})"
        )
    finite = np.isfinite(pitch) & np.isfinite(velocity) & np.isfinite(start) & np.isfinite(end)
    in_range = (pitch >= PITCH_MIN) & (pitch <= PITCH_MAX)
    positive = end > start
    keep = finite & in_range & positive
    dropped = {
        "non_finite": int(np.sum(~finite)),
        "pitch_out_of_range": int(np.sum(finite & ~in_range)),
        "end_not_after_start": int(np.sum(finite & in_range & ~positive)),
    }
    pitch = np.rint(pitch[keep]).astype(np.int64)
    velocity = np.clip(np.rint(velocity[keep]), 1, 127).astype(np.int64)
    start, end = start[keep], end[keep]
    order = np.lexsort((pitch, start))
    if not np.all(order[:-1] < order[1:]):
        pitch, velocity, start, end = pitch[order], velocity[order], start[order], end[order]
    piece = {
        "pitch": pitch,
        "velocity": velocity,
        "start": start,
        "end": end,
        "duration": end - start,
    }
    return piece, dropped


def notes_from_record(record: Mapping[str, Any]) -> Notes:
    """The validated piece of a dataset record (``record["notes"]``) or of a bare notes mapping."""
    if isinstance(record, Mapping) and "notes" in record:
        notes = record["notes"]
    else:
        notes = record
    if notes is None:
        raise BadRecordError("record has no notes")
    piece, _ = clean_notes(notes)
    return piece


def n_notes(notes: Notes) -> int:
    return int(len(notes["pitch"]))


def select(notes: Notes, index: Any) -> Notes:
    """Rows of a piece by boolean mask, slice or index array (duration kept consistent)."""
    return {k: v[index] for k, v in notes.items()}


def shift_to_zero(notes: Any) -> Any:
    """The piece moved in time so its first note starts at 0; a DataFrame stays a DataFrame
    (the one implementation for pieces, prompts and the app's slices)."""
    if isinstance(notes, pd.DataFrame):
        if len(notes) == 0:
            return notes.copy()
        t0 = float(notes["start"].min())
        return notes.assign(start=notes["start"] - t0, end=notes["end"] - t0)
    if n_notes(notes) == 0:
        return dict(notes)
    t0 = notes["start"].min()
    out = dict(notes)
    out["start"] = notes["start"] - t0
    out["end"] = notes["end"] - t0
    return out


def split_on_pauses(notes: Notes, threshold: float | None) -> list[Notes]:
    """Split a piece at silences longer than ``threshold`` seconds; every part starts at time 0.

    A silence is measured from the latest end of all notes so far (not just the previous note),
    so a long sustained note never creates a false pause, and the segment after the last pause
    is kept (both were bugs of the reference ``filter_pauses``). ``threshold`` None or <= 0
    disables splitting.
    """
    count = n_notes(notes)
    if count == 0:
        return []
    if threshold is None or threshold <= 0 or count == 1:
        return [shift_to_zero(notes)]
    running_end = np.maximum.accumulate(notes["end"])
    gaps = notes["start"][1:] - running_end[:-1]
    cuts = np.flatnonzero(gaps > threshold) + 1
    bounds = np.concatenate([[0], cuts, [count]])
    return [
        shift_to_zero(select(notes, slice(a, b)))
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]


def pitch_shift(notes: Notes, shift: int) -> Notes:
    """Transpose by ``shift`` semitones; refuses a shift that leaves the piano range."""
    out = dict(notes)
    out["pitch"] = notes["pitch"] + int(shift)
    if n_notes(out) and (out["pitch"].min() < PITCH_MIN or out["pitch"].max() > PITCH_MAX):
        raise ValueError(
            f"pitch shift {shift} moves notes outside {PITCH_MIN}..{PITCH_MAX}; "
            "choose one from allowed_pitch_shifts()"
        )
    return out


def change_speed(notes: Notes, factor: float) -> Notes:
    """Play ``factor`` times faster (factor > 1 shortens all times), as the reference does."""
    if not factor > 0:
        raise ValueError(f"speed change factor must be positive, got {factor}")
    out = dict(notes)
    out["start"] = notes["start"] / factor
    out["end"] = notes["end"] / factor
    out["duration"] = out["end"] - out["start"]
    return out


def allowed_pitch_shifts(notes: Notes, max_shift: int) -> list[int]:
    """Every integer shift in [-max_shift, max_shift] keeping all notes in 21..108 (0 included)."""
    max_shift = int(max_shift)
    if max_shift < 0:
        raise ValueError(f"max_pitch_shift must be >= 0, got {max_shift}")
    if n_notes(notes) == 0:
        return list(range(-max_shift, max_shift + 1))
    low = max(-max_shift, PITCH_MIN - int(notes["pitch"].min()))
    high = min(max_shift, PITCH_MAX - int(notes["pitch"].max()))
    return list(range(low, high + 1))
