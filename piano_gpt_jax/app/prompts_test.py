"""Prompt notes: uploads (good, corrupt, empty), slicing and transforms."""

from __future__ import annotations

import pandas as pd
import pytest

from piano_gpt_jax.app import prompts
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.app.testing_support import arpeggio_notes


def test_read_upload_real_corrupt_and_empty(tmp_path, maestro_dir):
    midi = sorted(maestro_dir.glob("*.mid"))[0]
    notes = prompts.read_upload(midi.read_bytes(), midi.name, tmp_path)
    assert len(notes) > 1000 and list(notes.columns) == list(prompts.COLUMNS)
    assert notes["start"].is_monotonic_increasing
    with pytest.raises(AppError, match="not a readable MIDI file"):
        prompts.read_upload(b"MThd this is not midi at all" * 10, "broken.mid", tmp_path)
    with pytest.raises(AppError, match="is empty"):
        prompts.read_upload(b"", "empty.mid", tmp_path)
    from piano_gpt_jax.music.midi import write_midi

    no_notes = write_midi(arpeggio_notes(0), tmp_path / "silent.mid")
    with pytest.raises(AppError, match="holds no piano notes"):
        prompts.read_upload(no_notes.read_bytes(), "silent.mid", tmp_path)


def test_slice_by_notes_and_seconds_starts_at_zero():
    notes = arpeggio_notes(40)  # a note every 0.25 s
    by_index = prompts.slice_notes(notes, "notes", 4, 12)
    assert len(by_index) == 8 and by_index["start"].iloc[0] == 0.0
    assert by_index["pitch"].tolist() == notes["pitch"].iloc[4:12].tolist()
    by_time = prompts.slice_notes(notes, "seconds", 1.0, 2.0)
    assert len(by_time) == 4 and by_time["start"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert len(prompts.slice_notes(notes, "seconds", 100.0, 200.0)) == 0
    with pytest.raises(AppError, match="after its start"):
        prompts.slice_notes(notes, "notes", 5, 5)


def test_transform_shift_speed_and_range_error():
    notes = arpeggio_notes(8)
    out = prompts.transform(notes, pitch_shift=2, speed=2.0)
    assert out["pitch"].tolist() == (notes["pitch"] + 2).tolist()
    assert out["end"].max() == pytest.approx(notes["end"].max() / 2)
    with pytest.raises(AppError, match="shifts -39..41"):
        prompts.transform(notes, pitch_shift=48)
    assert prompts.transform(pd.DataFrame(), 3, 1.5).empty
