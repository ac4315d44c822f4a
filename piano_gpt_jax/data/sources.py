"""Where piano datasets come from: the built-in set, a saved dataset, a MIDI folder or the hub.

Every source yields the format of piano_dataset.py (the reference datasets' shape), checked here
before anything downstream reads it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import datasets

from piano_gpt_jax.data.builtin import load_builtin_dataset
from piano_gpt_jax.data.import_midi import import_midi_folder
from piano_gpt_jax.data.piano_dataset import (
    MIDI_SUFFIXES,
    SPLITS,
    DatasetSourceError,
    default_cache_root,
    list_midi_files,
    save_atomically,
)

BUILTIN_NAME = "builtin"


def _folder_fingerprint(files: Iterable[Path], root: Path) -> str:
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _load_midi_folder(directory: Path, files: list[Path]) -> datasets.DatasetDict:
    """Import a MIDI folder once; later calls reuse the cached import while ``files`` (its
    listing) are unchanged."""
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
