"""Notes to WAV bytes a browser can play.

A real piano sound needs FluidSynth and a General-MIDI soundfont (Debian: `fluidsynth` plus
`fluid-soundfont-gm` or `timgm6mb-soundfont`). Without them a small additive synthesizer renders a
plucked-string tone in numpy, so every machine can still listen to what the model wrote.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np

from piano_gpt_jax.music.midi import write_midi

SAMPLE_RATE = 22_050
RELEASE_S = 0.25  # fade after a note's end, so notes do not click off
MAX_NOTE_S = 8.0  # a held note's tone has long decayed by then; caps the work per note
MAX_AUDIO_S = 600.0  # longer pieces are cut: a 10-minute WAV is already 26 MB
HARMONICS = (1.0, 0.45, 0.22, 0.12, 0.06)
SOUNDFONT_ENV = "PIANO_GPT_SOUNDFONT"
SOUNDFONT_CANDIDATES = (
    "/usr/share/sounds/sf2/FluidR3_GM.sf2",
    "/usr/share/soundfonts/FluidR3_GM.sf2",
    "/usr/share/sounds/sf2/default-GM.sf2",
    "/usr/share/soundfonts/default.sf2",
    "/usr/share/sounds/sf2/TimGM6mb.sf2",
)


def _columns(notes: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    if notes is None or len(notes) == 0:
        z = np.zeros(0)
        return z, z, z, z
    return tuple(np.asarray(notes[k], np.float64) for k in ("pitch", "velocity", "start", "end"))


def synthesize(notes: Any, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Mono float32 samples in [-1, 1]: a decaying sum of harmonics per note, louder with
    velocity. Silence (a few samples) when there are no notes."""
    pitch, velocity, start, end = _columns(notes)
    if len(pitch) == 0:
        return np.zeros(int(0.1 * sample_rate), np.float32)
    start = np.clip(start, 0.0, MAX_AUDIO_S)
    end = np.clip(np.maximum(end, start + 0.01), 0.0, MAX_AUDIO_S)
    total = int((float(end.max()) + RELEASE_S) * sample_rate) + 1
    out_T = np.zeros(total, np.float64)
    nyquist = sample_rate / 2
    for p, v, s, e in zip(pitch, velocity, start, end, strict=True):
        held = min(e - s, MAX_NOTE_S)
        n = int((held + RELEASE_S) * sample_rate)
        t_N = np.arange(n) / sample_rate
        freq = 440.0 * 2.0 ** ((p - 69.0) / 12.0)
        tone_N = np.zeros(n)
        for h, amp in enumerate(HARMONICS, start=1):
            if h * freq < nyquist:
                tone_N += amp * np.sin(2 * np.pi * h * freq * t_N)
        # Higher strings ring shorter, as on a piano; a 5 ms attack avoids a click.
        envelope_N = np.exp(-t_N * (1.0 + freq / 300.0)) * np.minimum(1.0, t_N / 0.005)
        envelope_N *= np.clip((held + RELEASE_S - t_N) / RELEASE_S, 0.0, 1.0)
        gain = 0.25 * (np.clip(v, 1, 127) / 127.0) ** 1.5
        first = int(s * sample_rate)
        last = min(first + n, total)
        out_T[first:last] += (gain * tone_N * envelope_N)[: last - first]
    peak = float(np.abs(out_T).max())
    if peak > 0.95:
        out_T *= 0.95 / peak
    return out_T.astype(np.float32)


def wav_bytes(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """16-bit mono PCM WAV of float samples in [-1, 1]."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return buffer.getvalue()


def find_soundfont() -> Path | None:
    """$PIANO_GPT_SOUNDFONT, else the first General-MIDI soundfont a Debian package installs."""
    override = os.environ.get(SOUNDFONT_ENV)
    candidates = [override] if override else list(SOUNDFONT_CANDIDATES)
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    return None


def fluidsynth_available() -> bool:
    return shutil.which("fluidsynth") is not None and find_soundfont() is not None


def render_fluidsynth(notes: Any, scratch: Path, sample_rate: int = SAMPLE_RATE) -> bytes:
    """WAV bytes from FluidSynth; `scratch` is a directory the caller owns and removes."""
    soundfont = find_soundfont()
    if soundfont is None or shutil.which("fluidsynth") is None:
        raise RuntimeError("fluidsynth or a General-MIDI soundfont is not installed")
    midi, wav = scratch / "audio.mid", scratch / "audio.wav"
    write_midi(notes, midi)
    # -n: no MIDI input driver, -i: no shell; -F renders to a file as fast as possible.
    subprocess.run(["fluidsynth", "-ni", "-q", "-g", "0.8", "-r", str(sample_rate), "-F",
                    str(wav), str(soundfont), str(midi)], check=True, capture_output=True,
                   timeout=120)
    return wav.read_bytes()


def render_wav(notes: Any, scratch: Path | None = None) -> tuple[bytes, str]:
    """(WAV bytes, the engine that made them): FluidSynth when installed and `scratch` is given,
    else the built-in synthesizer (also when FluidSynth fails: sound beats no sound)."""
    if scratch is not None and fluidsynth_available():
        try:
            return render_fluidsynth(notes, scratch), f"FluidSynth ({find_soundfont().name})"
        except (RuntimeError, OSError, subprocess.SubprocessError):
            pass
    return wav_bytes(synthesize(notes)), "built-in synthesizer"
