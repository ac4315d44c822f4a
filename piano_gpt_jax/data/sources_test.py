import json
import shutil

import datasets
import huggingface_hub.constants
import numpy as np
import pytest

from piano_gpt_jax.data import piano_dataset, sources
from piano_gpt_jax.data.sources import DatasetSourceError, load_piano_dataset


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("PIANO_GPT_JAX_CACHE", str(root))
    return root


@pytest.fixture
def midi_folder(maestro_dir, tmp_path):
    """Three real performances in a scratch folder (a copy outside the repository)."""
    folder = tmp_path / "midi"
    (folder / "sub").mkdir(parents=True)
    shutil.copy(maestro_dir / "Maestro_1.mid", folder / "Maestro_1.mid")
    shutil.copy(maestro_dir / "Maestro_3.mid", folder / "sub" / "Maestro_3.MIDI")
    shutil.copy(maestro_dir / "Maestro_10.mid", folder / "Bach_Prelude.mid")
    (folder / "notes.txt").write_text("not midi")
    return folder


def _tiny_dict():
    piece = {
        "pitch": np.array([60, 64]),
        "velocity": np.array([70, 80]),
        "start": np.array([0.0, 0.5]),
        "end": np.array([0.4, 1.0]),
        "duration": np.array([0.4, 0.5]),
    }
    source = json.dumps({"composer": "Johann Sebastian Bach", "title": "t", "dataset": "x"})
    return datasets.DatasetDict(
        {s: piano_dataset.make_piano_dataset([piece], [source]) for s in piano_dataset.SPLITS}
    )


def test_make_piano_dataset_matches_reference_schema():
    ds = _tiny_dict()["train"]
    assert ds.features == piano_dataset.piano_features()
    row = ds[0]
    assert row["notes"]["pitch"] == [60, 64]
    assert row["notes"]["end"] == [0.4, 1.0]
    assert json.loads(row["source"])["composer"] == "Johann Sebastian Bach"
    empty = piano_dataset.make_piano_dataset([], [])
    assert len(empty) == 0 and empty.features == piano_dataset.piano_features()


def test_saved_dataset_directory_round_trips(tmp_path):
    out = piano_dataset.save_atomically(_tiny_dict(), tmp_path / "saved")
    loaded = load_piano_dataset(str(out))
    assert {s: len(loaded[s]) for s in loaded} == {"train": 1, "validation": 1, "test": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # temp dir cleaned up


def test_midi_folder_is_imported_and_cached(midi_folder, cache):
    loaded = load_piano_dataset(str(midi_folder))
    total = sum(len(loaded[s]) for s in loaded)
    assert total == 3 and all(len(loaded[s]) == 1 for s in piano_dataset.SPLITS)
    notes = sum(len(r["notes"]["pitch"]) for s in loaded for r in loaded[s])
    assert notes == 2367 + 3142 + 5323
    composers = {json.loads(r["source"])["composer"] for s in loaded for r in loaded[s]}
    assert composers == {"Unknown", "Johann Sebastian Bach"}
    cached = list((cache / "midi-folders").iterdir())
    assert len(cached) == 1
    again = load_piano_dataset(str(midi_folder))  # served from the cache
    assert again["train"][0]["source"] == loaded["train"][0]["source"]


def test_builtin_name_dispatches_to_builtin(monkeypatch):
    monkeypatch.setattr(sources, "load_builtin_dataset", _tiny_dict)
    assert len(load_piano_dataset("builtin")["validation"]) == 1


def test_missing_path_gives_clear_error(tmp_path):
    with pytest.raises(DatasetSourceError, match="does not exist"):
        load_piano_dataset(str(tmp_path / "nope"))
    with pytest.raises(DatasetSourceError, match="empty"):
        load_piano_dataset("  ")


def test_directory_without_data_or_single_split(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetSourceError, match="neither"):
        load_piano_dataset(str(tmp_path / "empty"))
    _tiny_dict()["train"].save_to_disk(str(tmp_path / "single"))
    with pytest.raises(DatasetSourceError, match="single dataset split"):
        load_piano_dataset(str(tmp_path / "single"))


def test_missing_splits_and_columns_are_named(tmp_path):
    d = _tiny_dict()
    del d["test"]
    d.save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(DatasetSourceError, match=r"\['test'\]"):
        load_piano_dataset(str(tmp_path / "nosplit"))
    assert "test" not in load_piano_dataset(str(tmp_path / "nosplit"), ("train", "validation"))
    bad = datasets.DatasetDict(
        {
            s: datasets.Dataset.from_dict({"notes": [{"pitch": [60]}], "source": ["{}"]})
            for s in piano_dataset.SPLITS
        }
    )
    bad.save_to_disk(str(tmp_path / "nocols"))
    with pytest.raises(DatasetSourceError, match="velocity"):
        load_piano_dataset(str(tmp_path / "nocols"))


def test_hub_name_offline_gives_one_clear_message(monkeypatch):
    # The real datasets.load_dataset path, with the hub client in offline mode (no 20 s of retries).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetSourceError, match="epr-labs/maestro-sustain-v2.*'builtin'"):
        load_piano_dataset("epr-labs/maestro-sustain-v2")
