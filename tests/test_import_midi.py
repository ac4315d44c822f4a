"""End to end: `python -m piano_gpt_jax.data.import_midi` on the ten real MAESTRO performances."""

import json
import os
import shutil
import subprocess
import sys
import time

import datasets
import mido
import numpy as np
import pytest

from piano_gpt_jax.data import import_midi
from piano_gpt_jax.data.sources import load_piano_dataset
from piano_gpt_jax.music.midi import read_midi

MAESTRO_NOTES = 101_901  # all ten files, after sustain; zero-length and out-of-range notes dropped


def _all_notes(ds):
    return sum(len(r["notes"]["pitch"]) for split in ds for r in ds[split])


def test_import_maestro_folder(maestro_dir, tmp_path, capsys):
    out = tmp_path / "maestro-ds"
    began = time.perf_counter()
    assert import_midi.main([str(maestro_dir), str(out)]) == 0
    elapsed = time.perf_counter() - began
    assert elapsed < 20
    printed = capsys.readouterr().out
    assert "train" in printed and "validation" in printed and "hours" in printed

    ds = load_piano_dataset(str(out))
    sizes = {s: len(ds[s]) for s in ds}
    assert sizes == {"train": 8, "validation": 1, "test": 1}
    assert _all_notes(ds) == MAESTRO_NOTES
    sources = [json.loads(r) for s in ds for r in ds[s]["source"]]
    assert sorted(s["filename"] for s in sources) == sorted(
        p.name for p in maestro_dir.glob("*.mid")
    )
    assert all(s["dataset"] == "midi-folder" and s["composer"] == "Unknown" for s in sources)

    # Pedal-extended ends: the stored notes equal a sustained read, and are longer than a dry read.
    row = next(
        r for s in ds for r in ds[s] if json.loads(r["source"])["filename"] == "Maestro_1.mid"
    )
    dry = read_midi(maestro_dir / "Maestro_1.mid", sustain=False)
    end = np.asarray(row["notes"]["end"])
    assert len(end) == len(dry) == 2367
    assert np.all(end >= dry.end.to_numpy() - 1e-9)
    assert np.mean(end > dry.end.to_numpy() + 1e-6) > 0.5
    np.testing.assert_allclose(row["notes"]["duration"], end - np.asarray(row["notes"]["start"]))

    # Same input, same seed -> same split; another run refuses to overwrite.
    with pytest.raises(SystemExit, match="--overwrite"):
        import_midi.main([str(maestro_dir), str(out)])
    again = tmp_path / "again"
    import_midi.main([str(maestro_dir), str(again)])
    assert datasets.load_from_disk(str(again))["validation"]["source"] == ds["validation"]["source"]


def test_corrupt_and_empty_files_are_skipped_with_a_count(maestro_dir, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("Maestro_1.mid", "Maestro_3.mid", "Maestro_10.mid"):
        shutil.copy(maestro_dir / name, folder / name)
    (folder / "random.mid").write_bytes(np.random.default_rng(0).bytes(2000))
    empty = mido.MidiFile()
    empty.tracks.append(mido.MidiTrack())
    empty.save(folder / "empty.mid")
    out = tmp_path / "out"
    assert import_midi.main([str(folder), str(out), "--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 file(s)" in printed
    assert "random.mid" in printed and "empty.mid: no piano notes" in printed
    ds = datasets.load_from_disk(str(out))
    assert {s: len(ds[s]) for s in ds} == {"train": 1, "validation": 1, "test": 1}


def test_split_assignment_is_deterministic_and_non_empty():
    names = [f"piece_{i}.mid" for i in range(10)]
    split = import_midi.assign_splits(names, 0.1, 0.1, seed=0)
    assert split == import_midi.assign_splits(list(reversed(names)), 0.1, 0.1, seed=0)
    assert sorted(split.values()).count("validation") == 1
    assert sorted(split.values()).count("test") == 1
    assert import_midi.assign_splits(names, 0.1, 0.1, seed=1) != split
    assert set(import_midi.assign_splits(["a.mid"], 0.1, 0.1, 0).values()) == {"train"}
    with pytest.raises(ValueError):
        import_midi.assign_splits(names, 0.6, 0.5, 0)


def test_cli_empty_folder_exits_non_zero_without_traceback(tmp_path):
    (tmp_path / "in").mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "piano_gpt_jax.data.import_midi", str(tmp_path / "in"),
         str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert result.returncode != 0
    assert "no .mid or .midi files found" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_cli_options_no_sustain_fractions_and_seed(maestro_dir, tmp_path):
    """--no-sustain stores the dry note ends; --val-fraction/--test-fraction size the splits;
    --seed picks which files go where (the same order assign_splits gives for that seed)."""
    out = tmp_path / "custom"
    assert import_midi.main([str(maestro_dir), str(out), "--no-sustain", "--val-fraction", "0.3",
                             "--test-fraction", "0.2", "--seed", "1"]) == 0
    ds = load_piano_dataset(str(out))
    assert {s: len(ds[s]) for s in ds} == {"train": 5, "validation": 3, "test": 2}
    got = {json.loads(src)["filename"]: split for split in ds for src in ds[split]["source"]}
    names = sorted(p.name for p in maestro_dir.glob("*.mid"))
    assert got == import_midi.assign_splits(names, 0.3, 0.2, seed=1)
    assert got != import_midi.assign_splits(names, 0.3, 0.2, seed=0)  # the seed decides
    row = next(r for s in ds for r in ds[s]
               if json.loads(r["source"])["filename"] == "Maestro_1.mid")
    dry = read_midi(maestro_dir / "Maestro_1.mid", sustain=False)
    np.testing.assert_array_equal(np.asarray(row["notes"]["end"]), dry.end.to_numpy())
    np.testing.assert_array_equal(np.asarray(row["notes"]["pitch"]), dry.pitch.to_numpy())
    assert _all_notes(ds) == MAESTRO_NOTES  # the pedal moves note ends, never adds or drops


def test_overwrite_never_deletes_a_folder_that_is_not_a_dataset(maestro_dir, tmp_path):
    """--overwrite used to replace any non-empty OUT_DIR, unrelated files included."""
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("months of work")
    with pytest.raises(SystemExit, match="not a dataset written by save_to_disk"):
        import_midi.main([str(maestro_dir), str(out), "--overwrite"])
    assert (out / "thesis.tex").read_text() == "months of work"
