"""Fixtures of the app's tests: a runs folder with a tiny fitted checkpoint, and an environment
that points the app at it and at a fresh output folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from piano_gpt_jax.app import testing_support
from piano_gpt_jax.app.settings import OUT_ENV, RUNS_ENV


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return testing_support.shared_runs_root(tmp_path_factory)


@pytest.fixture
def app_env(runs_root, tmp_path, monkeypatch) -> dict[str, Path]:
    """RUNS/OUT for the page scripts (AppTest runs them in this process) and a private dataset
    cache, so no test writes outside its tmp dir."""
    out = tmp_path / "app-out"
    monkeypatch.setenv(RUNS_ENV, str(runs_root))
    monkeypatch.setenv(OUT_ENV, str(out))
    monkeypatch.setenv("PIANO_GPT_JAX_CACHE", str(tmp_path / "cache"))
    return {"runs": runs_root, "out": out, "tmp": tmp_path}


@pytest.fixture(scope="session")
def arpeggio_midi(tmp_path_factory) -> Path:
    """The tiny model's training arpeggio as a MIDI file: a prompt it continues with notes."""
    from piano_gpt_jax.music.midi import write_midi

    return write_midi(testing_support.arpeggio_notes(16),
                      tmp_path_factory.mktemp("midi") / "arpeggio.mid")


@pytest.fixture(scope="session")
def small_dataset(mini_maestro) -> Path:
    """Real MAESTRO notes (300 per piece) saved as a dataset directory, the save_to_disk format
    the trainer reads."""
    return mini_maestro(300)


@pytest.fixture(scope="session")
def long_midi(tmp_path_factory) -> Path:
    """240 notes of the arpeggio: a prompt far longer than the tiny model's context (96)."""
    from piano_gpt_jax.music.midi import write_midi

    return write_midi(testing_support.arpeggio_notes(240),
                      tmp_path_factory.mktemp("midi") / "long.mid")
