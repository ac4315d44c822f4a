"""What the Dataset review page computes: the piece list, histograms, and how a PIANO task splits
a record into source and target, with the record's token count at a run's context size."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.app.prompts import frame
from piano_gpt_jax.data.pipeline import build_tokenizer
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.data.sources import load_piano_dataset
from piano_gpt_jax.generate import GenerateError, prompt_for_task, resolve_task
from piano_gpt_jax.music import layouts, pieces

DEFAULT_CONTEXT_SIZE = 2048  # the reference recipe's
DEFAULT_NOTES_PER_RECORD = 128


def load_dataset(name: str) -> Any:
    """A DatasetDict from anything the trainer accepts ('builtin', a save_to_disk folder, a MIDI
    folder, a hub name); AppError with the loader's reason otherwise."""
    if not name or not name.strip():
        raise AppError("give a dataset: 'builtin', a folder written by save_to_disk, or a folder "
                       "of MIDI files")
    try:
        return load_piano_dataset(name.strip())
    except Exception as e:  # noqa: BLE001 — hub, arrow and MIDI import errors all mean "unusable"
        raise AppError(f"cannot open dataset {name.strip()!r}: {str(e)[:500]}") from None


def piece_table(split: Any) -> pd.DataFrame:
    """One row per piece: composer, title, notes, duration [s]; computed on the Arrow columns so
    a thousand-piece split lists in well under a second."""
    table = split.with_format("arrow")[:]
    notes = table.column("notes")
    if isinstance(notes, pa.ChunkedArray):
        notes = notes.combine_chunks()
    ends = pc.struct_field(notes, "end")
    counts = pc.list_value_length(ends).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(ends).to_numpy(zero_copy_only=False)
    starts_flat = pc.list_flatten(pc.struct_field(notes, "start")).to_numpy(zero_copy_only=False)
    bounds = np.concatenate([[0], np.cumsum(counts)])
    duration = np.zeros(len(counts))
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        if b > a:
            duration[i] = float(flat[a:b].max() - starts_flat[a:b].min())
    sources = [layouts.parse_source(s) for s in table.column("source").to_pylist()]
    return pd.DataFrame({
        "composer": [str(s.get("composer") or "?") for s in sources],
        "title": [str(s.get("title") or "?") for s in sources],
        "notes": counts,
        "duration [s]": np.round(duration, 1),
    })


def piece(split: Any, index: int) -> tuple[pd.DataFrame, dict]:
    """(notes, parsed source) of piece `index` of a split."""
    if not 0 <= index < len(split):
        raise AppError(f"piece {index} is out of range: this split has {len(split)} pieces")
    record = split[int(index)]
    try:
        notes = pieces.notes_from_record(record)
    except ValueError as e:
        raise AppError(f"piece {index} cannot be read: {e}") from None
    return frame(notes), layouts.parse_source(record.get("source"))


def histograms(notes: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Counts of pitch (per key), velocity (bins of 8) and duration (log-spaced bins), indexed by
    a readable bin label so a bar chart shows them in order."""
    pitch = np.bincount(notes["pitch"].to_numpy(np.int64) - pieces.PITCH_MIN,
                        minlength=pieces.PITCH_MAX - pieces.PITCH_MIN + 1)
    vel, vel_edges = np.histogram(notes["velocity"], bins=np.arange(0, 129, 8))
    dur_edges = np.array([0, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, np.inf])
    dur, _ = np.histogram(notes["end"] - notes["start"], bins=dur_edges)
    dur_labels = [f"{a:g}-{b:g}" if np.isfinite(b) else f">{a:g}"
                  for a, b in zip(dur_edges[:-1], dur_edges[1:], strict=True)]
    return {
        "pitch": pd.DataFrame({"notes": pitch}, index=pd.Index(
            np.arange(pieces.PITCH_MIN, pieces.PITCH_MAX + 1), name="MIDI pitch")),
        "velocity": pd.DataFrame({"notes": vel}, index=pd.Index(
            [f"{a:03d}" for a in vel_edges[:-1]], name="velocity from")),
        "duration": pd.DataFrame({"notes": dur}, index=pd.Index(
            [f"{i}: {lab}" for i, lab in enumerate(dur_labels)], name="duration [s]")),
    }


def default_tokenizer() -> Any:
    """A fresh vocabulary with every default task's tokens, annotated layout: a new run's."""
    return build_tokenizer(DataSettings(stage="piano_task", tasks="piano_default",
                                        shard_index=0, shard_count=1))


@dataclass
class TaskView:
    source: pd.DataFrame
    target: pd.DataFrame
    prompt_tokens: int  # head + task tokens + source + <GENAI>
    target_tokens: int  # target + <EOGENAI> (annotated layout)
    context_size: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.target_tokens

    @property
    def fits(self) -> bool:
        # A record is context_size + 1 tokens long (inputs and shifted targets).
        return self.total_tokens <= self.context_size + 1


def task_view(notes: pd.DataFrame, source: dict, task_name: str, first: int, n_notes: int,
              context_size: int, tokenizer: Any) -> TaskView:
    """The record of `n_notes` notes from note `first`, split by the task as the trainer does."""
    window = notes.iloc[int(first):int(first) + int(n_notes)]
    if len(window) == 0:
        raise AppError(f"no notes from note {first}: the piece has {len(notes)}")
    window = pieces.shift_to_zero(window)
    layout = layouts.checkpoint_layout(None, tokenizer.token_to_id)
    try:
        task = resolve_task(task_name)
        ids, src, tgt = prompt_for_task(tokenizer, task, window, layouts.dataset_token(source),
                                        layouts.composer_token(source), layout)
    except GenerateError as e:
        raise AppError(str(e)) from None
    end = 1 if layout == layouts.ANNOTATED and layouts.EOGENAI in tokenizer.token_to_id else 0
    return TaskView(frame(src), frame(tgt), int(len(ids)), int(len(tokenizer.encode(tgt))) + end,
                    int(context_size))
