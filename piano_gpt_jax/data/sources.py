"""Where piano datasets come from: the built-in set, a saved dataset, a MIDI folder or the hub.

Every source yields the same shape as the reference datasets (e.g. epr-labs/maestro-sustain-v2):
a ``datasets.DatasetDict`` with ``train``/``validation``/``test`` splits, a ``notes`` column (a
struct of equal-length sequences pitch, velocity, start, end, duration) and a ``source`` column
(a JSON string with at least composer, title and dataset).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa

from piano_gpt_jax.music.pieces import NOTE_COLUMNS, Notes

SPLITS = ("train", "validation", "test")
BUILTIN_NAME = "builtin"
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


def _folder_fingerprint(files: Iterable[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _load_midi_folder(directory: Path, files: list[Path]) -> datasets.DatasetDict:
    """Import a MIDI folder once; later calls reuse the cached import while ``files`` (its
    listing) are unchanged."""
    from piano_gpt_jax.data.import_midi import import_midi_folder

    cache_dir = default_cache_root() / "midi-folders" / _folder_fingerprint(files, directory)
    if (cache_dir / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(cache_dir))
    result = import_midi_folder(directory, progress=False)
    save_atomically(result.dataset, cache_dir)
    return datasets.load_from_disk(str(cache_dir))


def _looks_like_path(name: str) -> bool:
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or name.lower().endswith(MIDI_SUFFIXES)
        or os.sep != "/"
        and os.sep in name
    )


def _load_from_hub(name: str) -> datasets.DatasetDict:
    try:
        loaded = datasets.load_dataset(name)
    except Exception as err:  # the hub client raises many types; all mean "not available here"
        detail = str(err).splitlines()[0][:200] if str(err) else ""
        raise DatasetSourceError(
            f"could not load the dataset {name!r}: it is not a local directory and the Hugging "
            f"Face hub did not provide it ({type(err).__name__}: {detail}). Use a directory "
            "written by save_to_disk, a folder of .mid/.midi files, or 'builtin'."
        ) from None
    if not isinstance(loaded, datasets.DatasetDict):
        raise DatasetSourceError(f"hub dataset {name!r} has no named splits")
    return loaded


def _load_directory(path: Path) -> datasets.DatasetDict:
    if (path / "dataset_dict.json").is_file():
        return datasets.load_from_disk(str(path))
    if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
        raise DatasetSourceError(
            f"{path} holds a single dataset split; save a DatasetDict with train, validation and "
            "test splits instead (DatasetDict({...}).save_to_disk)"
        )
    files = list_midi_files(path)
    if files:
        return _load_midi_folder(path, files)
    raise DatasetSourceError(
        f"{path} is neither a dataset written by save_to_disk (no dataset_dict.json) nor a folder "
        "containing .mid/.midi files"
    )


def check_piano_dataset(
    dataset: datasets.DatasetDict, name: str, required_splits: Sequence[str] = SPLITS
) -> datasets.DatasetDict:
    """Fail early, naming what is missing, instead of deep inside record building."""
    missing_splits = [s for s in required_splits if s not in dataset]
    if missing_splits:
        raise DatasetSourceError(
            f"dataset {name!r} lacks the split(s) {missing_splits} (it has {list(dataset)}); "
            "a piano dataset needs train, validation and test"
        )
    for split in required_splits:
        features = dataset[split].features
        missing = [c for c in ("notes", "source") if c not in features]
        if missing:
            raise DatasetSourceError(
                f"dataset {name!r} split {split!r} lacks the column(s) {missing} "
                f"(it has {list(features)})"
            )
        notes = features["notes"]
        fields = set(notes) if isinstance(notes, dict) else set()
        lacking = [c for c in ("pitch", "velocity", "start", "end") if c not in fields]
        if lacking:
            raise DatasetSourceError(
                f"dataset {name!r} split {split!r}: the notes column lacks {lacking}; it must be a "
                "struct of sequences pitch, velocity, start, end (duration optional)"
            )
    return dataset


def load_piano_dataset(name: str, required_splits: Sequence[str] = SPLITS) -> datasets.DatasetDict:
    """Load a piano dataset by name: 'builtin', a saved dataset dir, a MIDI folder or a hub name."""
    if not isinstance(name, str) or not name.strip():
        raise DatasetSourceError(
            "dataset name is empty; give 'builtin', a local path or a hub name"
        )
    name = name.strip()
    if name == BUILTIN_NAME:
        from piano_gpt_jax.data.builtin import load_builtin_dataset

        loaded = load_builtin_dataset()
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            loaded = _load_directory(path)
        elif path.exists():
            raise DatasetSourceError(
                f"{path} is a file; give a directory (saved dataset or folder of MIDI files)"
            )
        elif _looks_like_path(name):
            raise DatasetSourceError(
                f"dataset path {path} does not exist; check the path, or use 'builtin'"
            )
        else:
            loaded = _load_from_hub(name)
    return check_piano_dataset(loaded, name, required_splits)


def split_sizes(dataset: datasets.DatasetDict) -> dict[str, int]:
    return {split: len(dataset[split]) for split in dataset}
