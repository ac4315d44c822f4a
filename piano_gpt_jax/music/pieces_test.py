import json

import numpy as np
import pandas as pd
import pytest

from piano_gpt_jax.music import layouts, pieces


def _piece(pitch, start, end, velocity=None):
    pitch = np.asarray(pitch)
    return {
        "pitch": pitch,
        "velocity": np.full(len(pitch), 80) if velocity is None else np.asarray(velocity),
        "start": np.asarray(start, float),
        "end": np.asarray(end, float),
    }


def test_notes_from_record_drops_bad_notes_and_sorts():
    record = {
        "notes": {
            "pitch": [60, 20, 64, 62, 109, 67],
            "velocity": [80, 80, 0, 200, 80, 90],
            "start": [1.0, 0.0, 0.5, 0.2, 0.3, 2.0],
            "end": [1.5, 1.0, 0.9, 0.2, 0.8, float("nan")],
            "duration": [0.5, 1.0, 0.4, 0.0, 0.5, 0.0],
        },
        "source": "{}",
    }
    piece, dropped = pieces.clean_notes(record["notes"])
    assert dropped == {"non_finite": 1, "pitch_out_of_range": 2, "end_not_after_start": 1}
    assert piece["pitch"].tolist() == [64, 60]  # sorted by start
    assert piece["velocity"].tolist() == [1, 80]  # velocity 0 clipped to 1
    np.testing.assert_allclose(piece["duration"], [0.4, 0.5])
    assert piece["pitch"].dtype == np.int64 and piece["start"].dtype == np.float64
    got = pieces.notes_from_record(record)
    assert got["pitch"].tolist() == [64, 60]


def test_notes_from_record_accepts_dataframe_and_rejects_broken_records():
    frame = pd.DataFrame({"pitch": [60], "velocity": [70], "start": [0.0], "end": [0.5]})
    assert pieces.notes_from_record(frame)["pitch"].tolist() == [60]
    with pytest.raises(pieces.BadRecordError, match="end"):
        pieces.notes_from_record({"notes": {"pitch": [60], "velocity": [70], "start": [0.0]}})
    with pytest.raises(pieces.BadRecordError, match="different lengths"):
        pieces.notes_from_record(_piece([60, 61], [0.0], [1.0, 2.0], velocity=[1, 2]))
    with pytest.raises(pieces.BadRecordError):
        pieces.notes_from_record({"notes": None})


def test_split_on_pauses_uses_running_max_end_and_keeps_last_segment():
    # A long note (0..10 s) covers the 5 s gap between the 2nd and 3rd short notes: no pause there.
    notes = pieces.notes_from_record(
        _piece([40, 60, 62, 64, 65], [0.0, 0.5, 6.0, 16.0, 16.5], [10.0, 1.0, 6.5, 16.4, 17.0])
    )
    parts = pieces.split_on_pauses(notes, threshold=4.0)
    assert [p["pitch"].tolist() for p in parts] == [[40, 60, 62], [64, 65]]
    np.testing.assert_allclose(parts[1]["start"], [0.0, 0.5])  # shifted to 0
    np.testing.assert_allclose(parts[1]["end"], [0.4, 1.0])
    assert len(pieces.split_on_pauses(notes, threshold=100.0)) == 1
    assert pieces.split_on_pauses(pieces.empty_notes(), 4.0) == []


def test_allowed_pitch_shifts_include_even_shifts_and_zero():
    notes = pieces.notes_from_record(_piece([23, 60, 105], [0, 1, 2], [1, 2, 3]))
    assert pieces.allowed_pitch_shifts(notes, 5) == [-2, -1, 0, 1, 2, 3]
    shifted = pieces.pitch_shift(notes, 2)
    assert shifted["pitch"].tolist() == [25, 62, 107]
    assert notes["pitch"].tolist() == [23, 60, 105]  # input untouched
    with pytest.raises(ValueError, match="allowed_pitch_shifts"):
        pieces.pitch_shift(notes, 4)


def test_change_speed_scales_times():
    notes = pieces.notes_from_record(_piece([60, 62], [1.0, 2.0], [1.5, 3.0]))
    fast = pieces.change_speed(notes, 2.0)
    np.testing.assert_allclose(fast["start"], [0.5, 1.0])
    np.testing.assert_allclose(fast["duration"], [0.25, 0.5])
    with pytest.raises(ValueError):
        pieces.change_speed(notes, 0.0)


@pytest.mark.parametrize(
    ("composer", "key", "token"),
    [
        ("Johann Sebastian Bach", "bach", "<BACH>"),
        ("Frédéric Chopin", "chopin", "<CHOPIN>"),
        ("Wolfgang Amadeus Mozart", "mozart", "<MOZART>"),
        ("Felix Mendelssohn", "mendelssohn", "<MENDELSSON>"),
        ("Sergei Rachmaninoff", "rachmaninoff", "<RACHMANIOFF>"),
        ("Franz Liszt / Franz Schubert", None, "<UNKNOWN_COMPOSER>"),
        ("Bacharach", None, "<UNKNOWN_COMPOSER>"),
        ("", None, "<UNKNOWN_COMPOSER>"),
    ],
)
def test_composer_key_and_token(composer, key, token):
    source = json.dumps({"composer": composer, "dataset": "maestro"})
    assert layouts.composer_key(source) == key
    assert layouts.composer_token(source) == token


def test_dataset_token_never_crashes():
    assert layouts.dataset_token(json.dumps({"dataset": "MAESTRO"})) == "<MAESTRO>"
    assert layouts.dataset_token(json.dumps({"dataset": "atepp-1.1"})) == "<ATEPP-1.1>"
    assert layouts.dataset_token(json.dumps({"composer": "x"})) == "<PIANO_FOR_AI>"
    assert layouts.dataset_token("not json") == "<PIANO_FOR_AI>"
    assert layouts.dataset_token(None) == "<PIANO_FOR_AI>"
    assert layouts.composer_key("[1, 2]") is None
    assert len(layouts.DATASET_TOKENS) == 10 and len(layouts.COMPOSER_TOKENS) == 15
