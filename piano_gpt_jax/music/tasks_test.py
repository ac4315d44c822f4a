import numpy as np
import pandas as pd
import pytest

from piano_gpt_jax.music.tasks import (
    BottomLineMasking,
    ChordMasking,
    HighNotesMasking,
    LongNotesMasking,
    LowNotesMasking,
    ShortNotesMasking,
    StrideMasking,
    TopLineMasking,
    resolve_tasks,
    task_special_tokens,
)


def notes(rows):
    """rows of (pitch, start, end); velocity is the row number so rows stay identifiable."""
    pitch, start, end = map(np.asarray, zip(*rows, strict=True))
    return {"pitch": pitch, "velocity": np.arange(len(rows)), "start": start.astype(float),
            "end": end.astype(float)}


def rows_of(part):
    return sorted(part["velocity"].tolist())


def test_stride_alternates_blocks_in_row_order():
    twelve = notes([(60 + i, 0.5 * i, 0.5 * i + 0.4) for i in range(12)])
    s = StrideMasking(2).split(twelve)
    assert s.source["velocity"].tolist() == [0, 1, 4, 5, 8, 9]
    assert s.target["velocity"].tolist() == [2, 3, 6, 7, 10, 11]
    assert s.prefix_tokens == ("<PARAMETRIC_STRIDE_MASK>", "<PARAMETER_2>")
    s3 = StrideMasking(3).split(twelve)
    assert rows_of(s3.target) == [3, 4, 5, 9, 10, 11]


def test_high_and_low_notes_first_occurrence_on_ties():
    n = notes([(60, 0.0, 1), (72, 0.1, 1), (72, 0.2, 1), (50, 0.3, 1), (50, 0.4, 1), (65, 0.5, 1)])
    high = HighNotesMasking(2).split(n)
    assert rows_of(high.target) == [1, 2] and rows_of(high.source) == [0, 3, 4, 5]
    assert HighNotesMasking(3).split(n).target["velocity"].tolist() == [1, 2, 5]  # by start
    low = LowNotesMasking(1).split(n)
    assert rows_of(low.target) == [3]  # the first of the two 50s
    assert LowNotesMasking(1).task_name == "low_notes_masking-x1"


def test_short_and_long_notes_compute_duration_when_missing():
    n = notes([(60, 0.0, 0.1), (62, 0.2, 2.2), (64, 0.4, 0.45), (65, 0.6, 1.6)])
    assert "duration" not in n
    assert rows_of(ShortNotesMasking(2).split(n).target) == [0, 2]
    assert rows_of(LongNotesMasking(1).split(n).target) == [1]
    # An explicit duration column is used as given (as the reference does).
    df = pd.DataFrame(n).assign(duration=[9.0, 0.1, 0.2, 0.3])
    assert rows_of(LongNotesMasking(1).split(df).target) == [0]


def test_top_and_bottom_line_follow_the_sliding_window():
    # Melody on top (72, 74, 76) over a sustained bass (48) and an inner voice (60, 62).
    n = notes([
        (48, 0.0, 1.2),
        (72, 0.0, 0.3),
        (60, 0.0, 0.6),
        (74, 0.4, 0.7),
        (62, 0.6, 1.0),
        (76, 0.8, 1.1),
    ])
    top = TopLineMasking(1).split(n)
    assert rows_of(top.target) == [1, 3, 5]
    assert top.prefix_tokens == ("<PARAMETRIC_TOP_LINE>", "<PARAMETER_1>")
    top2 = TopLineMasking(2).split(n)  # second pass takes the next line down
    assert rows_of(top2.target) == [1, 2, 3, 4, 5]
    bottom = BottomLineMasking(1).split(n)
    assert rows_of(bottom.target) == [0]
    assert BottomLineMasking(1).task_name == "bottom_line_masking-x1"


def test_chord_masking_takes_all_but_first_note_of_big_chords():
    n = notes([
        (48, 0.000, 1), (52, 0.005, 1), (55, 0.010, 1),  # 3-note chord
        (60, 0.500, 1), (64, 0.505, 1),  # 2-note chord: below threshold 3
        (67, 1.000, 1),
        (40, 1.500, 2), (44, 1.501, 2), (47, 1.502, 2), (52, 1.503, 2),  # 4-note chord
    ])
    s = ChordMasking(3).split(n)
    assert rows_of(s.target) == [1, 2, 7, 8, 9]
    assert s.prefix_tokens == ("<CHORD_MASK>",)
    assert ChordMasking(3).task_name == "chord_masking-x3"
    assert ChordMasking(3).split(notes([(60, 0.0, 1), (62, 1.0, 2)])).n_target_notes == 0


def test_task_sets_match_the_reference_counts():
    assert len(resolve_tasks("piano_default")) == 61
    assert len(task_special_tokens(resolve_tasks("piano_default"))) == 19
    assert len(resolve_tasks("piano_medium")) == 40
    assert len(task_special_tokens(resolve_tasks("piano_medium"))) == 18
    assert len(resolve_tasks("top_line")) == 3 and len(resolve_tasks("chords")) == 1
    # Deterministic token order (the reference used hash-set order).
    assert task_special_tokens(resolve_tasks("top_line")) == [
        "<PARAMETRIC_TOP_LINE>", "<PARAMETER_1>", "<PARAMETER_2>", "<PARAMETER_3>"]


def test_resolve_tasks_accepts_names_and_config_dicts():
    by_name = resolve_tasks(["top_line_masking-x2", "chord_masking-x3"])
    assert [t.task_name for t in by_name] == ["top_line_masking-x2", "chord_masking-x3"]
    by_cfg = resolve_tasks([
        {"class": "HighNotesMasking", "params": {"n_notes": 4}},
        {"class": "StrideMasking", "param_range": [{"stride": 1}, {"stride": 2}]},
    ])
    assert [t.task_name for t in by_cfg] == [
        "high_notes_masking-x4", "stride_notes_masking-x1", "stride_notes_masking-x2"]


@pytest.mark.parametrize("spec", ["no_such_set", ["top_line_masking-xx"], [{"class": "Nope",
                                                                            "params": {}}]])
def test_unknown_tasks_give_a_clear_error(spec):
    with pytest.raises(ValueError, match="valid|task set"):
        resolve_tasks(spec)


@pytest.mark.parametrize("gap, in_chord", [(0.0149, True), (0.0151, False)])
def test_chord_tolerance_at_its_boundary(gap, in_chord):
    """CHORD_TOLERANCE_S = 15 ms: a note starting 14.9 ms after the previous one joins its chord
    (and is masked), one starting 15.1 ms after does not."""
    part = ChordMasking(2).split(notes([(60, 0.0, 1.0), (64, gap, 1.0), (67, 2.0, 3.0)]))
    assert rows_of(part.target) == ([1] if in_chord else [])


@pytest.mark.parametrize("onset, in_first_window", [(0.199, True), (0.2, True), (0.201, False)])
def test_line_window_at_its_boundary(onset, in_first_window):
    """LINE_WINDOW_S = 0.2 s: the first window (from the first onset) sees notes starting up to
    0.2 s later, inclusive. A high note starting inside it takes the top line from the short
    note before it; one starting just after leaves that note on the top line."""
    part = TopLineMasking(1).split(notes([(60, 0.0, 0.1), (80, onset, onset + 0.05),
                                          (50, 0.6, 0.7)]))
    assert rows_of(part.target) == ([1, 2] if in_first_window else [0, 1, 2])
