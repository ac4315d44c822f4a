"""The piano dataset format every source produces, and how one is written to disk.

A ``datasets.DatasetDict`` with ``train``/``validation``/``test`` splits, a ``notes`` column (a
struct of equal-length sequences pitch, velocity, start, end, duration) and a ``source`` column
(a JSON string with at least composer, title and dataset) — the shape of the reference datasets
(e.g. epr-labs/maestro-sustain-v2). Writers (builtin.py, import_midi.py) and the loader
(sources.py) share it from here.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from piano_gpt_jax.music.pieces import NOTE_COLUMNS, Notes

SPLITS = ("train", "validation", "test")
MIDI_SUFFIXES = (".mid", ".midi")
_NOTE_TYPES = {
    "pitch": "int64",
    "velocity": "int64",
    "start": "float64",
    "end": "float64",
    "duration": "float64",
}


class DatasetSourceError(ValueError):
    """A dataset name or path that cannot be turned into a piano dataset; the message says why."""


def piano_features() -> datasets.Features:
    notes = {c: datasets.List(datasets.Value(_NOTE_TYPES[c])) for c in NOTE_COLUMNS}
    return datasets.Features({"notes": notes, "source": datasets.Value("string")})


def make_piano_dataset(pieces: Sequence[Notes], sources: Sequence[str]) -> datasets.Dataset:
    """An in-memory dataset from pieces (dicts of arrays) and their JSON ``source`` strings.

    Built straight from Arrow buffers: one concatenation per column instead of Python lists.
    """
    if len(pieces) != len(sources):
        raise ValueError(f"{len(pieces)} pieces but {len(sources)} sources")
    lengths = np.array([len(p["pitch"]) for p in pieces], dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    children = []
    for column in NOTE_COLUMNS:
        dtype = np.int64 if _NOTE_TYPES[column] == "int64" else np.float64
        if pieces:
            values = np.concatenate([np.asarray(p[column], dtype=dtype) for p in pieces])
        else:
            values = np.zeros(0, dtype)
        children.append(pa.ListArray.from_arrays(offsets, pa.array(values)))
    notes = pa.StructArray.from_arrays(children, names=list(NOTE_COLUMNS))
    table = pa.table({"notes": notes, "source": pa.array(list(sources), pa.string())})
    dataset = datasets.Dataset(table)
    assert dataset.features == piano_features(), dataset.features
    return dataset


def default_cache_root() -> Path:
    """PIANO_GPT_JAX_CACHE, else $XDG_CACHE_HOME/piano_gpt_jax, else ~/.cache/piano_gpt_jax."""
    override = os.environ.get("PIANO_GPT_JAX_CACHE")
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "piano_gpt_jax"


def save_atomically(dataset: datasets.DatasetDict, out_dir: Path, overwrite: bool = False) -> Path:
    """save_to_disk into a sibling temp dir, then rename, so a kill never leaves half a dataset.

    If another process finished the same directory first (and not overwrite), its copy is kept.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        dataset.save_to_disk(str(tmp))
        if out_dir.exists() and overwrite:
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, out_dir)
            except OSError:
                if not (out_dir / "dataset_dict.json").is_file():
                    raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if bars_were_on:
            datasets.enable_progress_bars()
    return out_dir


def list_midi_files(directory: Path) -> list[Path]:
    """Every .mid/.midi file below ``directory`` (sub-folders too), in path order."""
    return sorted(
        p for p in directory.rglob("*") if p.suffix.lower() in MIDI_SUFFIXES and p.is_file()
    )
