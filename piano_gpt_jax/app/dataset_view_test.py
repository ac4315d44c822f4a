"""Dataset review computations on a small real dataset."""

from __future__ import annotations

import pytest

from piano_gpt_jax.app import dataset_view
from piano_gpt_jax.app.errors import AppError


def test_piece_table_histograms_and_task_split(small_dataset):
    dd = dataset_view.load_dataset(str(small_dataset))
    table = dataset_view.piece_table(dd["validation"])
    assert table["composer"].tolist() == ["Franz Liszt", "Frédéric Chopin"]
    assert table["notes"].tolist() == [300, 300] and (table["duration [s]"] > 1).all()
    notes, source = dataset_view.piece(dd["validation"], 1)
    assert len(notes) == 300 and source["composer"] == "Frédéric Chopin"
    hist = dataset_view.histograms(notes)
    assert all(int(h["notes"].sum()) == 300 for h in hist.values())
    tok = dataset_view.default_tokenizer()
    view = dataset_view.task_view(notes, source, "high_notes_masking-x10", 0, 128, 2048, tok)
    assert len(view.target) == 10 and len(view.source) == 118
    # prompt: dataset, composer, N_NOTES, task, param, 2 MUSIC_TIME, source tokens, <GENAI>
    assert view.prompt_tokens == 7 + len(tok.encode(view.source)) + 1
    assert view.target_tokens == len(tok.encode(view.target)) + 1 and view.fits
    assert not dataset_view.task_view(notes, source, "high_notes_masking-x10", 0, 128, 64,
                                      tok).fits
    with pytest.raises(AppError, match="out of range"):
        dataset_view.piece(dd["validation"], 2)


def test_missing_dataset_is_a_message(tmp_path):
    with pytest.raises(AppError, match="does not exist"):
        dataset_view.load_dataset(str(tmp_path / "no-such-dataset"))
    with pytest.raises(AppError, match="give a dataset"):
        dataset_view.load_dataset("  ")
