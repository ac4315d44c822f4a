"""The built-in default piano dataset, rendered offline from the music21 corpus.

Why: the main job must run on a fresh machine with no download. music21 (a PyPI dependency) ships
real scores; we render them to timed notes once and cache the result.

Content: every Johann Sebastian Bach work in the corpus (mostly the four-part chorales), all
string-quartet movements of Mozart, Beethoven and Haydn, and single works by Chopin, Schubert,
Handel, Joplin, Corelli, Weber and Verdi -- 458 pieces, about 220k notes. Six Beethoven files that
hold whole quartets (op. 18 nos. 3-5, op. 74, op. 132, op. 133) are left out to keep the first
build fast (they take seconds each to parse).

Rendering rules (scores carry no performance data, so these are choices):

* tempo: the score's metronome marks (piecewise, each clamped to 40..200 quarter notes per
  minute); a score without any is played at 90 quarter notes per minute;
* velocity: the running dynamic mark of each part (ppp 24, pp 36, p 50, mp 62, mf 74, f 88,
  ff 102, fff 114; other marks such as sf are ignored); a part without marks plays at 70. Each note
  then gets +4 on a beat or -2 off the beat and a deterministic jitter in [-4, 4] seeded by the
  piece, so velocities are not all identical;
* ties are merged into one note; grace notes (zero length) and unpitched notes are skipped;
  repeats are not expanded; all parts (voices, strings) are played as piano notes;
* pitches outside 21..108 are folded by octaves into that range.

Splits are by piece: per composer, pieces are ordered by a hash of their path inside the music21
corpus (never the install location, which differs between machines: builtin-v1 hashed the absolute
path, so its splits and jitter moved with the virtual environment); about 10%
go to validation and 10% to test, with at least one of each for composers with three or more
pieces (so the validation split has Bach and Mozart pieces).

Cache: ``$PIANO_GPT_JAX_CACHE`` or ``$XDG_CACHE_HOME/piano_gpt_jax`` or ``~/.cache/piano_gpt_jax``,
subdirectory ``builtin-v2``; it is built in a temporary sibling directory and renamed into place,
so an interrupted or concurrent build never leaves a half-written dataset.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import warnings
import zlib
from pathlib import Path

import datasets
import numpy as np

from piano_gpt_jax.data.piano_dataset import (
    SPLITS,
    default_cache_root,
    make_piano_dataset,
    save_atomically,
)
from piano_gpt_jax.music.midi import piecewise_time_map
from piano_gpt_jax.music.pieces import PITCH_MAX, PITCH_MIN, clean_notes

BUILTIN_VERSION = "builtin-v2"
DATASET_NAME = "music21-corpus"
DEFAULT_QPM = 90.0
QPM_RANGE = (40.0, 200.0)
DEFAULT_VELOCITY = 70
DYNAMIC_VELOCITY = {
    "ppp": 24, "pp": 36, "p": 50, "mp": 62, "mf": 74, "f": 88, "ff": 102, "fff": 114,
}  # fmt: skip
# corpus directory -> composer full name, as in the reference datasets' `source["composer"]`.
COMPOSER_NAMES = {
    "bach": "Johann Sebastian Bach",
    "mozart": "Wolfgang Amadeus Mozart",
    "beethoven": "Ludwig van Beethoven",
    "haydn": "Joseph Haydn",
    "chopin": "Frédéric Chopin",
    "schubert": "Franz Schubert",
    "handel": "George Frideric Handel",
    "joplin": "Scott Joplin",
    "corelli": "Arcangelo Corelli",
    "weber": "Carl Maria von Weber",
    "verdi": "Giuseppe Verdi",
}
# Whole quartets in one file: slow to parse (several seconds each) and well covered by movements.
EXCLUDED = (
    "beethoven/opus132.mxl",
    "beethoven/opus133.mxl",
    "beethoven/opus74.mxl",
    "beethoven/opus18no3.mxl",
    "beethoven/opus18no4.mxl",
    "beethoven/opus18no5.mxl",
)
_SCORE_SUFFIXES = (".mxl", ".xml", ".musicxml", ".krn")


def builtin_dir(cache_root: Path | None = None) -> Path:
    return (Path(cache_root) if cache_root else default_cache_root()) / BUILTIN_VERSION


def corpus_pieces() -> list[tuple[str, str]]:
    """(corpus path, composer dir) of every score used, one file per work (MusicXML preferred)."""
    from music21 import corpus

    chosen: dict[str, tuple[str, str]] = {}
    for composer in COMPOSER_NAMES:
        for path in corpus.getComposer(composer):
            path = Path(path)
            if path.suffix not in _SCORE_SUFFIXES:
                continue
            rel = path.as_posix().split("/corpus/")[-1]
            if rel in EXCLUDED:
                continue
            stem = rel.rsplit(".", 1)[0]
            if stem in chosen and not rel.endswith((".mxl", ".xml", ".musicxml")):
                continue
            chosen[stem] = (str(path), composer)
    return sorted(chosen.values())


def _seconds_map(marks: list[tuple[float, float]]):
    """Offsets (quarter notes) -> seconds for piecewise-constant tempi [(offset, qpm), ...]."""
    marks = sorted(marks)
    if not marks or marks[0][0] > 0:
        marks = [(0.0, DEFAULT_QPM), *marks]
    offsets = np.array([m[0] for m in marks])
    qpm = np.clip(np.array([m[1] for m in marks]), *QPM_RANGE)
    return piecewise_time_map(offsets, 60.0 / qpm)


def _fold_pitches(pitch: np.ndarray) -> np.ndarray:
    pitch = pitch.copy()
    low = pitch < PITCH_MIN
    pitch[low] += 12 * np.ceil((PITCH_MIN - pitch[low]) / 12).astype(np.int64)
    high = pitch > PITCH_MAX
    pitch[high] -= 12 * np.ceil((pitch[high] - PITCH_MAX) / 12).astype(np.int64)
    return pitch


def render_score(path: str, composer: str) -> tuple[dict, str] | None:
    """Parse one corpus score and render it to a piece; None when it holds no usable notes.

    Steps: parse → tempo map → every part's notes (ties joined, dynamics as velocity levels) →
    a performance (beat accents, seeded jitter, seconds) → cleaned notes and the source JSON.
    """
    from music21 import converter, tempo

    with warnings.catch_warnings():
        # Corpus files trip music21's MusicXML pedantry (overfull measures); the notes are fine.
        warnings.simplefilter("ignore")
        score = converter.parse(path, forceSource=True)
    marks = []
    for mark in score.flatten().getElementsByClass(tempo.MetronomeMark):
        qpm = mark.getQuarterBPM()
        if qpm:
            marks.append((float(mark.offset), float(qpm)))
    onsets, lengths, pitches, levels = [], [], [], []
    for part in list(getattr(score, "parts", [])) or [score]:
        part_onsets, part_lengths, part_pitches, part_levels = _part_notes(part)
        onsets += part_onsets
        lengths += part_lengths
        pitches += part_pitches
        levels.extend(part_levels)
    if not onsets:
        return None
    notes = _perform(path, _seconds_map(marks), onsets, lengths, pitches, levels)
    piece, _ = clean_notes(notes)
    if len(piece["pitch"]) == 0:
        return None
    return piece, _source_json(path, composer, score, marks)


def _part_notes(part) -> tuple[list[float], list[float], list[int], np.ndarray]:
    """(onsets, lengths in quarters, MIDI pitches, dynamic levels) of one part; a tied note is one
    note whose length spans the tie."""
    from music21 import dynamics

    flat = part.flatten()
    dyn = [
        (float(d.offset), DYNAMIC_VELOCITY[d.value])
        for d in flat.getElementsByClass(dynamics.Dynamic)
        if d.value in DYNAMIC_VELOCITY
    ]
    dyn_offsets = np.array([d[0] for d in dyn] or [0.0])
    dyn_levels = np.array([d[1] for d in dyn] or [DEFAULT_VELOCITY])
    onsets: list[float] = []
    lengths: list[float] = []
    pitches: list[int] = []
    open_ties: dict[int, int] = {}  # midi pitch -> index of the note a tie continues
    for element in flat.notes:
        offset = float(element.offset)
        length = float(element.quarterLength)
        if length <= 0:
            continue
        for p in element.pitches:
            midi = int(p.midi)
            tie = element.tie.type if element.tie is not None else None
            if tie in ("stop", "continue") and midi in open_ties:
                idx = open_ties[midi]
                lengths[idx] = offset + length - onsets[idx]
                if tie == "stop":
                    del open_ties[midi]
                continue
            onsets.append(offset)
            lengths.append(length)
            pitches.append(midi)
            if tie in ("start", "continue"):
                open_ties[midi] = len(onsets) - 1
            else:
                open_ties.pop(midi, None)
    part_onsets = np.array(onsets, dtype=np.float64)
    level_index = np.clip(np.searchsorted(dyn_offsets, part_onsets, side="right") - 1, 0, None)
    levels = np.where(part_onsets >= dyn_offsets[0], dyn_levels[level_index], DEFAULT_VELOCITY)
    return onsets, lengths, pitches, levels


def corpus_path(path: str) -> str:
    """A score's path inside the music21 corpus ("bach/bwv1.6.mxl"), the same on every machine."""
    return path.replace("\\", "/").split("/corpus/")[-1]


def _perform(path: str, to_sec, onsets: list[float], lengths: list[float], pitches: list[int],
             levels: list) -> dict[str, np.ndarray]:
    """Score notes played: accents on the beat and a jitter seeded by the file's path, so the
    built-in dataset is the same on every machine."""
    onset_q = np.asarray(onsets, dtype=np.float64)
    end_q = onset_q + np.asarray(lengths, dtype=np.float64)
    rng = np.random.default_rng(zlib.crc32(corpus_path(path).encode()))
    on_beat = np.isclose(onset_q, np.round(onset_q))
    velocity = np.asarray(levels, dtype=np.int64) + np.where(on_beat, 4, -2)
    velocity = velocity + rng.integers(-4, 5, size=len(onset_q))
    start = to_sec(onset_q)
    return {
        "pitch": _fold_pitches(np.asarray(pitches, dtype=np.int64)),
        "velocity": velocity,
        "start": start - start.min(),
        "end": to_sec(end_q) - start.min(),
    }


def _source_json(path: str, composer: str, score, marks: list[tuple[float, float]]) -> str:
    rel = corpus_path(path)
    title = None
    if score.metadata is not None:  # music21 puts the file name in `title` when there is none
        names = (score.metadata.title, score.metadata.movementName)
        title = next((t for t in names if t and not str(t).endswith(_SCORE_SUFFIXES)), None)
    source = {
        "composer": COMPOSER_NAMES[composer],
        "title": str(title) if title else rel.rsplit(".", 1)[0],
        "dataset": DATASET_NAME,
        "corpus_path": rel,
        "tempo_qpm": round(float(marks[0][1]), 2) if marks else DEFAULT_QPM,
    }
    return json.dumps(source, ensure_ascii=False)


def _render_job(job: tuple[str, str]):
    path, composer = job
    try:
        return path, render_score(path, composer), None
    except Exception as err:  # a score music21 cannot parse is skipped, not fatal
        return path, None, f"{type(err).__name__}: {err}"


def split_pieces(paths_by_composer: dict[str, list[str]]) -> dict[str, str]:
    """Corpus path -> split, per composer in hash order; see the module doc."""
    split_of = {}
    for paths in paths_by_composer.values():
        order = sorted(paths, key=lambda p: zlib.crc32(corpus_path(p).encode()))
        n = len(order)
        n_val = max(1, round(0.1 * n)) if n >= 3 else 0
        n_test = max(1, round(0.1 * n)) if n >= 3 else 0
        for i, p in enumerate(order):
            split_of[p] = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
    return split_of


def build_builtin_dataset(
    out_dir: Path, workers: int | None = None, max_pieces: int | None = None
) -> Path:
    """Render the corpus selection and save it to ``out_dir`` (atomically); returns ``out_dir``.

    Scores are parsed in a pool of spawned processes (music21 parsing is pure Python; spawning
    keeps the pool safe when the caller already started JAX threads).
    """
    began = time.perf_counter()
    jobs = corpus_pieces()
    if max_pieces is not None:
        by_composer: dict[str, list] = {}
        for job in jobs:
            by_composer.setdefault(job[1], []).append(job)
        per = max(3, max_pieces // max(len(by_composer), 1))
        jobs = sorted(j for group in by_composer.values() for j in group[:per])
    # Large files first so the pool does not end on one long straggler.
    jobs.sort(key=lambda j: -os.path.getsize(j[0]))
    workers = workers or min(os.cpu_count() or 1, 8)
    print(
        f"building the built-in piano dataset from {len(jobs)} music21 scores "
        f"with {workers} worker(s) (one-time, cached in {out_dir})",
        file=sys.stderr,
    )
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = list(pool.imap_unordered(_render_job, jobs, chunksize=4))
    else:
        results = [_render_job(j) for j in jobs]

    rendered = {path: out for path, out, _ in results if out is not None}
    failures = [(path, err) for path, _, err in results if err is not None]
    composer_of = {path: composer for path, composer in jobs}
    by_composer_paths: dict[str, list[str]] = {}
    for path in rendered:
        by_composer_paths.setdefault(composer_of[path], []).append(path)
    split_of = split_pieces(by_composer_paths)
    parts: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
    for path in sorted(rendered):
        piece, source = rendered[path]
        parts[split_of[path]][0].append(piece)
        parts[split_of[path]][1].append(source)
    dataset = datasets.DatasetDict(
        {s: make_piano_dataset(pieces, sources) for s, (pieces, sources) in parts.items()}
    )
    save_atomically(dataset, Path(out_dir))
    counts = ", ".join(
        f"{s} {len(parts[s][0])} pieces/{sum(len(p['pitch']) for p in parts[s][0])} notes"
        for s in SPLITS
    )
    print(
        f"built-in dataset ready: {counts}; {len(failures)} score(s) skipped; "
        f"{time.perf_counter() - began:.0f} s",
        file=sys.stderr,
    )
    return Path(out_dir)


def load_builtin_dataset(cache_root: Path | None = None) -> datasets.DatasetDict:
    """The built-in dataset, built into the cache on first use (about a minute on two cores)."""
    target = builtin_dir(cache_root)
    if not (target / "dataset_dict.json").is_file():
        build_builtin_dataset(target)
    return datasets.load_from_disk(str(target))
