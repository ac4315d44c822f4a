"""Audio: WAV bytes of the right length with sound in them, from either engine."""

from __future__ import annotations

import io
import wave

import numpy as np
import pandas as pd
import pytest

from piano_gpt_jax.app import audio


def _notes() -> pd.DataFrame:
    return pd.DataFrame({"pitch": [60, 64, 67, 108], "velocity": [90, 70, 50, 127],
                         "start": [0.0, 0.5, 1.0, 1.5], "end": [0.4, 0.9, 1.4, 2.0]})


def _read(data: bytes) -> tuple[np.ndarray, int]:
    with wave.open(io.BytesIO(data)) as w:
        assert w.getnchannels() in (1, 2) and w.getsampwidth() == 2
        frames = np.frombuffer(w.readframes(w.getnframes()), "<i2")
        return frames.reshape(-1, w.getnchannels())[:, 0], w.getframerate()


def test_builtin_synthesizer_duration_level_and_silence():
    samples = audio.synthesize(_notes())
    assert samples.dtype == np.float32
    assert len(samples) == pytest.approx((2.0 + audio.RELEASE_S) * audio.SAMPLE_RATE, abs=2)
    assert 0.05 < np.abs(samples).max() <= 0.95
    # each note sounds while it is held, and the tail after the release is silent
    for t in (0.2, 0.7, 1.2, 1.7):
        window = samples[int(t * audio.SAMPLE_RATE):int((t + 0.05) * audio.SAMPLE_RATE)]
        assert np.abs(window).max() > 1e-3, t
    assert np.abs(samples[-10:]).max() < 1e-3
    assert np.abs(audio.synthesize(_notes().iloc[:0])).max() == 0  # no notes: silence, no error


def test_wav_bytes_round_trip_and_render_fallback(tmp_path, monkeypatch):
    wav, engine = audio.render_wav(_notes())  # no scratch dir: always the built-in synth
    assert engine == "built-in synthesizer"
    frames, rate = _read(wav)
    assert rate == audio.SAMPLE_RATE
    assert len(frames) / rate == pytest.approx(2.0 + audio.RELEASE_S, abs=0.01)
    assert np.count_nonzero(frames) > 0.5 * len(frames)
    # FluidSynth missing or failing: sound from the built-in synth rather than an error
    monkeypatch.setattr(audio, "fluidsynth_available", lambda: True)
    monkeypatch.setattr(audio, "render_fluidsynth",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("no audio")))
    assert audio.render_wav(_notes(), tmp_path)[1] == "built-in synthesizer"


@pytest.mark.skipif(not audio.fluidsynth_available(),
                    reason="fluidsynth and a GM soundfont are not installed (apt-get install "
                           "fluidsynth timgm6mb-soundfont); the built-in synth is tested above")
def test_fluidsynth_renders_a_piano(tmp_path):
    wav, engine = audio.render_wav(_notes(), tmp_path)
    assert engine.startswith("FluidSynth")
    frames, rate = _read(wav)
    assert len(frames) / rate >= 2.0 and np.abs(frames).max() > 100
