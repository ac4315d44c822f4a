"""Convert a folder of MIDI files into a piano dataset (train/validation/test, split by file).

Usage::

    python -m piano_gpt_jax.data.import_midi MIDI_DIR OUT_DIR [--val-fraction 0.1]
        [--test-fraction 0.1] [--seed 0] [--no-sustain] [--overwrite]

The split is deterministic: files are ordered by a seeded hash of their path relative to MIDI_DIR,
the first ones go to validation, the next to test, the rest to train; with three or more files each
split gets at least one. Corrupt and note-less files are reported and skipped. Composer and title
are guessed from the file name and the texts in the file (track names, markers): a known composer
surname gives the full name, otherwise "Unknown"; the title is the file name without extension.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np

from piano_gpt_jax.data.piano_dataset import (
    SPLITS,
    list_midi_files,
    make_piano_dataset,
    save_atomically,
)
from piano_gpt_jax.music.layouts import composer_key
from piano_gpt_jax.music.midi import MidiReadError, read_midi_contents

DATASET_NAME = "midi-folder"
COMPOSER_FULL_NAMES = {
    "scriabin": "Alexander Scriabin",
    "franck": "César Franck",
    "mozart": "Wolfgang Amadeus Mozart",
    "chopin": "Frédéric Chopin",
    "mendelssohn": "Felix Mendelssohn",
    "liszt": "Franz Liszt",
    "schubert": "Franz Schubert",
    "brahms": "Johannes Brahms",
    "haydn": "Joseph Haydn",
    "beethoven": "Ludwig van Beethoven",
    "balakirev": "Mily Balakirev",
    "schumann": "Robert Schumann",
    "rachmaninoff": "Sergei Rachmaninoff",
    "bach": "Johann Sebastian Bach",
}


@dataclass
class SplitSummary:
    files: int = 0
    notes: int = 0
    seconds: float = 0.0

    @property
    def hours(self) -> float:
        return self.seconds / 3600.0


@dataclass
class ImportResult:
    dataset: datasets.DatasetDict
    summary: dict[str, SplitSummary]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _guess_composer(texts: list[str]) -> str:
    for text in texts:
        key = composer_key({"composer": text.replace("_", " ")})
        if key is not None:
            return COMPOSER_FULL_NAMES[key]
    return "Unknown"


def assign_splits(
    names: list[str], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """File name -> split; a seeded hash order makes it reproducible and independent of listing."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("--val-fraction and --test-fraction must be in [0, 1) and sum below 1")
    order = sorted(names, key=lambda n: hashlib.sha256(f"{seed}:{n}".encode()).hexdigest())
    count = len(order)
    n_val = int(round(count * val_fraction))
    n_test = int(round(count * test_fraction))
    if count >= 3:  # every split non-empty whenever it was asked for and possible
        n_val = max(n_val, 1 if val_fraction > 0 else 0)
        n_test = max(n_test, 1 if test_fraction > 0 else 0)
    n_val = min(n_val, max(count - 1, 0))
    n_test = min(n_test, max(count - 1 - n_val, 0))
    split_of = {}
    for i, name in enumerate(order):
        split_of[name] = "validation" if i < n_val else "test" if i < n_val + n_test else "train"
    return split_of


def import_midi_folder(
    directory: str | Path,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    sustain: bool = True,
    progress: bool = True,
) -> ImportResult:
    """Read every .mid/.midi file below ``directory`` into an in-memory DatasetDict."""
    directory = Path(directory).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"MIDI folder {directory} does not exist or is not a directory")
    files = list_midi_files(directory)
    if not files:
        raise FileNotFoundError(
            f"no .mid or .midi files found in {directory} (searched sub-folders too)"
        )
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, desc="reading MIDI", unit="file", file=sys.stderr)
    else:
        iterator = files

    read = []
    skipped: list[tuple[str, str]] = []
    for path in iterator:
        rel = path.relative_to(directory).as_posix()
        try:
            contents = read_midi_contents(path, sustain=sustain)
        except MidiReadError as err:
            skipped.append((rel, err.reason))
            continue
        if len(contents.notes) == 0:
            skipped.append((rel, "no piano notes"))
            continue
        piece = {c: contents.notes[c].to_numpy() for c in contents.notes.columns}
        source = {
            "composer": _guess_composer([path.stem, *contents.texts]),
            "title": path.stem.replace("_", " "),
            "dataset": DATASET_NAME,
            "filename": rel,
        }
        read.append((rel, piece, json.dumps(source, ensure_ascii=False)))
    if not read:
        raise ValueError(
            f"none of the {len(files)} MIDI files in {directory} could be used "
            f"(e.g. {skipped[0][0]}: {skipped[0][1]})"
        )

    split_of = assign_splits([r[0] for r in read], val_fraction, test_fraction, seed)
    placements = [(rel, piece, source, split_of[rel]) for rel, piece, source in read]
    notes = []
    if len(read) < 3:
        # Disjoint splits need 3 files, and an empty split is a dataset no one can load
        # (datasets.load_from_disk fails on it): everything trains, one file also validates/tests.
        shared = min(read, key=lambda r: split_of[r[0]] != "train")  # the hash order's first
        placements = [(rel, piece, source, "train") for rel, piece, source in read]
        placements += [(shared[0], shared[1], shared[2], split) for split in ("validation",
                                                                               "test")]
        notes.append(f"only {len(read)} usable file(s): all are in train, and {shared[0]} is "
                     "also copied to validation and test (with 3 or more files the splits are "
                     "disjoint)")
    parts: dict[str, tuple[list, list]] = {s: ([], []) for s in SPLITS}
    summary = {s: SplitSummary() for s in SPLITS}
    for _, piece, source, split in placements:
        parts[split][0].append(piece)
        parts[split][1].append(source)
        summary[split].files += 1
        summary[split].notes += len(piece["pitch"])
        summary[split].seconds += float(np.max(piece["end"]))
    dataset = datasets.DatasetDict(
        {s: make_piano_dataset(pieces, sources) for s, (pieces, sources) in parts.items()}
    )
    return ImportResult(dataset=dataset, summary=summary, skipped=skipped, notes=notes)


def format_summary(result: ImportResult) -> str:
    lines = [f"{'split':<11}{'files':>7}{'notes':>10}{'hours':>8}"]
    for split, s in result.summary.items():
        lines.append(f"{split:<11}{s.files:>7}{s.notes:>10}{s.hours:>8.2f}")
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} file(s):")
        lines += [f"  {name}: {reason}" for name, reason in result.skipped]
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m piano_gpt_jax.data.import_midi",
        description="Convert a folder of MIDI files into a piano dataset (save_to_disk format).",
    )
    parser.add_argument("midi_dir", type=Path, help="folder searched recursively for .mid/.midi")
    parser.add_argument("out_dir", type=Path, help="where the dataset is written")
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0, help="seed of the file-to-split assignment")
    parser.add_argument("--no-sustain", action="store_true", help="ignore the sustain pedal")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    args = parser.parse_args(argv)

    out_dir = args.out_dir.expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"error: {out_dir} exists and is not a directory; choose another OUT_DIR")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not args.overwrite:
        raise SystemExit(
            f"error: {out_dir} already exists and is not empty; choose another OUT_DIR "
            "or pass --overwrite"
        )
    if args.overwrite and out_dir.is_dir() and any(out_dir.iterdir()) and not (
            out_dir / "dataset_dict.json").is_file():
        # --overwrite replaces a dataset we wrote; never a folder of other files
        raise SystemExit(
            f"error: {out_dir} holds files that are not a dataset written by save_to_disk (no "
            "dataset_dict.json); --overwrite only replaces a dataset. Choose another OUT_DIR."
        )
    try:
        result = import_midi_folder(
            args.midi_dir,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            seed=args.seed,
            sustain=not args.no_sustain,
        )
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    save_atomically(result.dataset, out_dir, overwrite=args.overwrite)
    print(format_summary(result))
    print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
