"""Reading performed MIDI into note tables and writing note tables back as playable MIDI.

Reading uses symusic (a C++ parser, ~1 ms per performance) in tick units; ticks are converted to
seconds here in float64 through the tempo map, so times are as exact as the file allows.

Sustain pedal (CC64, value >= 64 = down), as in the reference "-sustain" datasets: a note whose
key is released while the pedal is down keeps sounding until the pedal is lifted, or until the
same pitch is struck again, whichever comes first. Pedal events of a track apply to that track's
notes. symusic drops tracks without notes, so when no note track carries a pedal, the file is
scanned again with mido and pedal events found in any track (a common type-1 layout keeps them in
a separate track) apply to all notes.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from piano_gpt_jax.music.pieces import NOTE_COLUMNS, clean_notes

SUSTAIN_CC = 64
SUSTAIN_THRESHOLD = 64
DEFAULT_MSPQ = 500_000  # MIDI default tempo: 120 quarter notes per minute


class MidiReadError(Exception):
    """A file that cannot be parsed as MIDI; carries the offending path."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read MIDI file {self.path}: {reason}")


@dataclass
class MidiContents:
    """Notes of a file plus the text found in it (track names, markers) for guessing metadata."""

    notes: pd.DataFrame
    texts: list[str] = field(default_factory=list)
    n_dropped: int = 0


def piecewise_time_map(positions: np.ndarray, sec_per_unit: np.ndarray):
    """A vectorised position -> seconds function for piecewise-constant rates.

    ``positions`` (sorted, the first at 0) are where each rate of ``sec_per_unit`` starts; of
    several rates at one position the last one wins. Shared by MIDI tempo maps (ticks) and the
    built-in dataset's metronome marks (quarter notes)."""
    positions = np.asarray(positions, dtype=np.float64)
    sec_per_unit = np.asarray(sec_per_unit, dtype=np.float64)
    last = np.append(positions[1:] != positions[:-1], True)
    positions, sec_per_unit = positions[last], sec_per_unit[last]
    seg_start_sec = np.concatenate([[0.0], np.cumsum(np.diff(positions) * sec_per_unit[:-1])])

    def convert(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        k = np.clip(np.searchsorted(positions, x, side="right") - 1, 0, len(positions) - 1)
        return seg_start_sec[k] + (x - positions[k]) * sec_per_unit[k]

    return convert


def _tick_to_seconds(tempo_ticks: np.ndarray, tempo_mspq: np.ndarray, tpq: int):
    """Tick -> seconds through a MIDI tempo map (120 qpm until its first tempo event)."""
    if len(tempo_ticks) == 0 or tempo_ticks[0] > 0:
        tempo_ticks = np.concatenate([[0], tempo_ticks])
        tempo_mspq = np.concatenate([[DEFAULT_MSPQ], tempo_mspq])
    return piecewise_time_map(tempo_ticks, tempo_mspq.astype(np.float64) / 1e6 / tpq)


def _pedal_intervals(times: np.ndarray, values: np.ndarray, end_of_file: float) -> np.ndarray:
    """(n, 2) array of [down, up) seconds from CC64 events sorted by time."""
    if len(times) == 0:
        return np.zeros((0, 2))
    order = np.argsort(times, kind="stable")
    times, down = times[order], values[order] >= SUSTAIN_THRESHOLD
    changes = np.flatnonzero(np.diff(np.concatenate([[False], down]).astype(np.int8)))
    starts = times[changes[0::2]]
    ups = times[changes[1::2]]
    if len(ups) < len(starts):  # pedal still down at the end of the file
        ups = np.append(ups, max(end_of_file, starts[-1]))
    return np.stack([starts, ups], axis=1)


def apply_sustain(
    pitch: np.ndarray, start: np.ndarray, end: np.ndarray, pedal: np.ndarray
) -> np.ndarray:
    """New note ends under the sustain pedal intervals ``pedal`` ((n, 2) [down, up) seconds)."""
    if len(pedal) == 0 or len(pitch) == 0:
        return end.copy()
    k = np.searchsorted(pedal[:, 0], end, side="right") - 1
    held = (k >= 0) & (end < pedal[np.clip(k, 0, None), 1])
    pedal_up = np.where(held, pedal[np.clip(k, 0, None), 1], end)
    # Next onset of the same pitch cuts the sustained tail (the damper lifts when re-struck).
    order = np.lexsort((start, pitch))
    next_same = np.full(len(pitch), np.inf)
    same = pitch[order][1:] == pitch[order][:-1]
    next_same[order[:-1][same]] = start[order][1:][same]
    return np.maximum(end, np.minimum(pedal_up, next_same))


def _mido_pedal_ticks(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """CC64 events (absolute ticks, values) of every track; the slow path, used only as fallback."""
    import mido

    try:
        midi = mido.MidiFile(str(path), clip=True)
    except Exception:  # symusic already read the notes; a pedal we cannot read is dropped
        return np.zeros(0), np.zeros(0)
    ticks, values = [], []
    for track in midi.tracks:
        now = 0
        for message in track:
            now += message.time
            if message.type == "control_change" and message.control == SUSTAIN_CC:
                ticks.append(now)
                values.append(message.value)
    return np.asarray(ticks, dtype=np.float64), np.asarray(values, dtype=np.int64)


def _n_chunks(path: Path) -> int:
    """Number of track chunks announced by the MIDI header (symusic hides note-less tracks)."""
    with open(path, "rb") as handle:
        header = handle.read(14)
    return int.from_bytes(header[10:12], "big") if len(header) == 14 else 0


def _parse(path: Path):
    import symusic

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
    if size == 0:
        raise MidiReadError(path, "the file is empty (0 bytes)")
    if head != b"MThd":
        raise MidiReadError(path, "not a Standard MIDI File (it does not start with the 'MThd' "
                                  "header)")
    try:
        return symusic.Score(str(path), ttype="tick")
    except Exception as err:  # symusic raises RuntimeError/ValueError with a parser message
        raise MidiReadError(path, _parser_reason(str(err), size)) from None


def _parser_reason(message: str, size: int) -> str:
    """symusic's parser message ('MiniMidi: ...: iostream error') as a plain reason."""
    text = re.sub(r"^\s*MiniMidi:\s*", "", message)
    text = re.sub(r":\s*iostream error\s*$", "", text).replace("Invaild", "invalid").strip()
    if "chunk length" in text or "remaining bytes" in text:
        return f"truncated or corrupt: {text} ({size} bytes in the file)"
    if "less than 14" in text:
        return f"too short to hold a MIDI header ({size} bytes)"
    return text or "the MIDI parser rejected it"


def read_midi_contents(path: str | os.PathLike, sustain: bool = True) -> MidiContents:
    """Notes of all tracks merged (sorted by start) and the file's texts; see the module doc."""
    path = Path(path)
    if not path.is_file():
        raise MidiReadError(path, "no such file")
    score = _parse(path)
    tempos = score.tempos.numpy()
    to_sec = _tick_to_seconds(tempos["time"], tempos["mspq"], max(int(score.tpq), 1))

    tracks = []
    texts = [t.name for t in score.tracks if t.name]
    texts += [m.text for m in score.markers if getattr(m, "text", "")]
    for track in score.tracks:
        if len(track.notes) == 0 or track.is_drum:
            continue
        controls = track.controls.numpy()
        is_sustain = controls["number"] == SUSTAIN_CC
        pedal = (to_sec(controls["time"][is_sustain]), controls["value"][is_sustain])
        n = track.notes.numpy()
        on = to_sec(n["time"])
        off = to_sec(n["time"].astype(np.int64) + n["duration"])
        tracks.append((n["pitch"].astype(np.int64), n["velocity"].astype(np.int64), on, off, pedal))

    file_end = max((float(t[3].max()) for t in tracks), default=0.0)
    shared = (np.zeros(0), np.zeros(0))
    if sustain and tracks and not any(len(t[4][0]) for t in tracks) and _n_chunks(path) > 1:
        ticks, values = _mido_pedal_ticks(path)
        shared = (to_sec(ticks), values)
    columns: dict[str, list[np.ndarray]] = {c: [] for c in ("pitch", "velocity", "start", "end")}
    for pitch, velocity, on, off, pedal in tracks:
        if sustain:
            times, values = pedal if len(pedal[0]) else shared
            intervals = _pedal_intervals(times, values, file_end)
            off = apply_sustain(pitch, on, off, intervals)
        columns["pitch"].append(pitch)
        columns["velocity"].append(velocity)
        columns["start"].append(on)
        columns["end"].append(off)
    merged = {k: (np.concatenate(v) if v else np.zeros(0)) for k, v in columns.items()}
    piece, dropped = clean_notes(merged)
    frame = pd.DataFrame({c: piece[c] for c in NOTE_COLUMNS})
    return MidiContents(notes=frame, texts=texts, n_dropped=sum(dropped.values()))


def read_midi(path: str | os.PathLike, sustain: bool = True) -> pd.DataFrame:
    """Notes (pitch, velocity, start, end, duration in seconds) of a MIDI file, sorted by start.

    Notes outside the piano range 21..108 or of zero length are dropped (see pieces.clean_notes);
    drum tracks are ignored. Raises MidiReadError for a missing, corrupt or non-MIDI file.
    """
    return read_midi_contents(path, sustain=sustain).notes


_CHANNELS = np.array([c for c in range(16) if c != 9])  # 9 is General MIDI's drum channel


def _unison_channels(pitch: np.ndarray, on: np.ndarray) -> np.ndarray:
    """Channel per note: 0, or the note's rank among notes of its pitch on its onset tick."""
    order = np.lexsort((on, pitch))
    rank = np.zeros(len(pitch), np.int64)
    for k in range(1, len(order)):
        i, j = order[k], order[k - 1]
        if pitch[i] == pitch[j] and on[i] == on[j]:
            rank[i] = rank[j] + 1
    return _CHANNELS[np.minimum(rank, len(_CHANNELS) - 1)]


def write_midi(
    notes: Any, path: str | os.PathLike, ticks_per_beat: int = 960, program: int = 0
) -> Path:
    """Write notes as a single-track piano MIDI file (120 qpm), replacing ``path`` atomically.

    A note that overlaps the next note of the same pitch is cut at that onset, so every note
    survives playback; note-offs precede note-ons at equal ticks for the same reason. Notes of
    one pitch starting on the same tick cannot share a channel (a reader pairs their note-offs
    into one note), so the second goes on channel 1, the third on 2 and so on (drums' channel 9
    skipped): the file holds every note the table does.
    """
    import mido

    piece, _ = clean_notes(notes)
    path = Path(path)
    ticks_per_second = ticks_per_beat * 1e6 / DEFAULT_MSPQ
    pitch, velocity = piece["pitch"], piece["velocity"]
    on = np.rint(piece["start"] * ticks_per_second).astype(np.int64)
    off = np.rint(piece["end"] * ticks_per_second).astype(np.int64)
    channel = _unison_channels(pitch, on)
    order = np.lexsort((on, pitch, channel))
    same = (pitch[order][1:] == pitch[order][:-1]) & (channel[order][1:] == channel[order][:-1])
    cut = off.copy()
    nxt = order[1:][same]
    cur = order[:-1][same]
    cut[cur] = np.minimum(off[cur], on[nxt])
    off = np.maximum(cut, on + 1)

    times = np.concatenate([off, on])
    kinds = np.concatenate([np.zeros(len(off), np.int64), np.ones(len(on), np.int64)])
    pitches = np.concatenate([pitch, pitch])
    channels = np.concatenate([channel, channel])
    vels = np.concatenate([np.zeros(len(off), np.int64), velocity])
    order = np.lexsort((channels, pitches, kinds, times))
    track = mido.MidiTrack()
    track.append(mido.MetaMessage("set_tempo", tempo=DEFAULT_MSPQ, time=0))
    for c in np.unique(channel).tolist() or [0]:
        track.append(mido.Message("program_change", program=program, channel=int(c), time=0))
    prev = 0
    for i in order.tolist():
        delta = int(times[i]) - prev
        prev = int(times[i])
        kind = "note_on" if kinds[i] else "note_off"
        track.append(mido.Message(kind, note=int(pitches[i]), velocity=int(vels[i]),
                                  channel=int(channels[i]), time=delta))
    track.append(mido.MetaMessage("end_of_track", time=0))
    midi = mido.MidiFile(type=0, ticks_per_beat=ticks_per_beat)
    midi.tracks.append(track)

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            midi.save(file=handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
