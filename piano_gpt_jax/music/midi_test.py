import mido
import numpy as np
import pandas as pd
import pytest

from piano_gpt_jax.music.midi import MidiReadError, apply_sustain, read_midi, write_midi


def _write_raw(path, events, ticks_per_beat=480):
    """events: (abs_tick, mido.Message) at 120 qpm, so 960 ticks = 1 s."""
    track = mido.MidiTrack()
    prev = 0
    for tick, message in sorted(events, key=lambda e: e[0]):
        track.append(message.copy(time=tick - prev))
        prev = tick
    midi = mido.MidiFile(ticks_per_beat=ticks_per_beat)
    midi.tracks.append(track)
    midi.save(path)


def _on(p, v=80):
    return mido.Message("note_on", note=p, velocity=v)


def _off(p):
    return mido.Message("note_off", note=p, velocity=0)


def _cc(v):
    return mido.Message("control_change", control=64, value=v)


def test_sustain_extends_note_to_pedal_release_or_next_strike(tmp_path):
    path = tmp_path / "pedal.mid"
    s = 960  # ticks per second
    _write_raw(
        path,
        [
            (0, _cc(100)),  # pedal down 0..2 s
            (0, _on(60)),
            (s // 2, _off(60)),  # released under pedal -> ends at 2.0
            (0, _on(64)),
            (s // 4, _off(64)),  # re-struck at 1.0 -> ends at 1.0
            (s, _on(64)),
            (s + s // 4, _off(64)),  # -> ends at pedal release 2.0
            (2 * s, _cc(0)),
            (3 * s, _on(67)),
            (3 * s + s // 2, _off(67)),  # pedal up: unchanged
        ],
    )
    notes = read_midi(path)
    assert list(notes.columns) == ["pitch", "velocity", "start", "end", "duration"]
    assert notes.pitch.tolist() == [60, 64, 64, 67]
    np.testing.assert_allclose(notes.start, [0.0, 0.0, 1.0, 3.0])
    np.testing.assert_allclose(notes.end, [2.0, 1.0, 2.0, 3.5])
    np.testing.assert_allclose(notes.duration, notes.end - notes.start)
    dry = read_midi(path, sustain=False)
    np.testing.assert_allclose(dry.end, [0.5, 0.25, 1.25, 3.5])


def test_apply_sustain_pedal_still_down_at_end():
    ends = apply_sustain(np.array([60]), np.array([0.0]), np.array([1.0]), np.array([[0.5, 4.0]]))
    assert ends.tolist() == [4.0]


def test_tempo_changes_are_honoured(tmp_path):
    path = tmp_path / "tempo.mid"
    _write_raw(
        path,
        [
            (0, mido.MetaMessage("set_tempo", tempo=1_000_000)),  # 60 qpm: 480 ticks = 1 s
            (0, _on(60)),
            (480, _off(60)),
            (480, mido.MetaMessage("set_tempo", tempo=250_000)),  # 240 qpm: 480 ticks = 0.25 s
            (960, _on(62)),
            (1440, _off(62)),
        ],
    )
    notes = read_midi(path)
    np.testing.assert_allclose(notes.start, [0.0, 1.25])
    np.testing.assert_allclose(notes.end, [1.0, 1.5])


def test_real_performance_round_trips_through_write_midi(maestro_dir, tmp_path):
    notes = read_midi(maestro_dir / "Maestro_3.mid")
    assert len(notes) == 3142
    assert notes.start.is_monotonic_increasing
    assert notes.pitch.between(21, 108).all() and (notes.end > notes.start).all()
    dry = read_midi(maestro_dir / "Maestro_3.mid", sustain=False)
    assert (notes.end >= dry.end).all() and (notes.end > dry.end).mean() > 0.3
    out = write_midi(notes, tmp_path / "copy.mid")
    back = read_midi(out, sustain=False)
    assert back.pitch.tolist() == notes.pitch.tolist()
    assert back.velocity.tolist() == notes.velocity.tolist()
    assert np.abs(back.start.to_numpy() - notes.start.to_numpy()).max() < 1e-3
    assert np.abs(back.end.to_numpy() - notes.end.to_numpy()).max() < 1e-3


def test_write_midi_is_atomic_and_handles_same_pitch_overlap(tmp_path):
    target = tmp_path / "out.mid"
    target.write_bytes(b"old")
    notes = pd.DataFrame(
        {"pitch": [60, 60], "velocity": [70, 90], "start": [0.0, 0.5], "end": [1.0, 1.5]}
    )
    write_midi(notes, target)
    back = read_midi(target, sustain=False)
    np.testing.assert_allclose(back.start, [0.0, 0.5])
    np.testing.assert_allclose(back.end, [0.5, 1.5])  # first note cut at the re-strike
    assert [p.name for p in tmp_path.iterdir()] == ["out.mid"]  # no temp file left behind


@pytest.mark.parametrize("content", [b"", b"MThd garbage", bytes(range(256)) * 4])
def test_corrupt_files_raise_midi_read_error(tmp_path, content):
    path = tmp_path / "bad.mid"
    path.write_bytes(content)
    with pytest.raises(MidiReadError) as info:
        read_midi(path)
    assert str(path) in str(info.value)


def test_truncated_real_file_is_refused_not_half_read(maestro_dir, tmp_path):
    """A file cut mid-track would silently lose its second half if read; it is refused instead,
    with the path in the message (importers count and skip it)."""
    data = (maestro_dir / "Maestro_1.mid").read_bytes()
    assert len(read_midi(maestro_dir / "Maestro_1.mid")) == 2367  # whole, it reads
    path = tmp_path / "cut.mid"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MidiReadError) as info:
        read_midi(path)
    assert str(path) in str(info.value)


def test_missing_file_raises_midi_read_error(tmp_path):
    with pytest.raises(MidiReadError, match="no such file"):
        read_midi(tmp_path / "nope.mid")


def test_pedal_in_a_separate_track_applies_to_note_tracks(tmp_path):
    notes_track, pedal_track = mido.MidiTrack(), mido.MidiTrack()
    notes_track += [_on(60).copy(time=0), _off(60).copy(time=480)]  # 0.5 s at 480 tpq
    pedal_track += [_cc(127).copy(time=0), _cc(0).copy(time=1920)]  # pedal up at 2.0 s
    midi = mido.MidiFile(type=1, ticks_per_beat=480)
    midi.tracks += [notes_track, pedal_track]
    midi.save(tmp_path / "type1.mid")
    notes = read_midi(tmp_path / "type1.mid")
    np.testing.assert_allclose(notes.end, [2.0])


def test_notes_of_one_pitch_on_one_tick_all_reach_the_file(tmp_path):
    """The app showed 7 notes and its MIDI download held 6: two notes of one pitch starting on
    one tick were merged. Each now sounds on its own channel, so file and table agree."""
    import pandas as pd

    from piano_gpt_jax.music.midi import read_midi, write_midi

    table = pd.DataFrame({"pitch": [60, 60, 64, 60, 62, 62, 62],
                          "velocity": [80, 70, 60, 50, 40, 41, 42],
                          "start": [0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0],
                          "end": [0.4, 0.3, 0.9, 1.5, 1.2, 1.3, 1.4]})
    back = read_midi(write_midi(table, tmp_path / "unison.mid"))
    key = lambda df: sorted(zip(df.pitch, df.velocity, df.start.round(6), df.end.round(6),
                                strict=True))
    assert key(back) == key(table)
