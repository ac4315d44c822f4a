"""The Generate page in Streamlit's headless test harness: a generation with the tiny checkpoint
shows notes, a piano roll and audio; bad input shows a message and the page keeps working."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import matplotlib.image
import pytest
from streamlit.testing.v1 import AppTest

from piano_gpt_jax.app.testing_support import app_script, make_tiny_run


def _page() -> AppTest:
    return AppTest.from_string(app_script("generate_page"), default_timeout=90)


def _errors(at: AppTest) -> list[str]:
    return [e.value for e in at.error]


def test_renders_without_a_checkpoint(app_env):
    at = _page().run()
    assert not at.exception
    assert at.title[0].value == "Generate"
    assert [i.value for i in at.info] == ["Choose a checkpoint to start."]
    assert at.selectbox(key="gen_ckpt_choice").options == [str(app_env["runs"] / "tiny"),
                                                            str(app_env["runs"] / "tiny-b")]


@pytest.mark.slow
def test_generation_shows_notes_pianoroll_and_audio(app_env, arpeggio_midi, monkeypatch):
    from piano_gpt_jax.app import models

    loads = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda p: loads.append(p) or real_load(p))
    at = _page().run()
    at.selectbox(key="gen_ckpt_choice").set_value(str(app_env["runs"] / "tiny")).run()
    at.file_uploader(key="gen_upload").set_value(
        ("arpeggio.mid", arpeggio_midi.read_bytes(), "audio/midi")).run()
    assert any("Prompt: 16 notes" in c.value for c in at.caption)
    at.number_input(key="gen_max_new_tokens").set_value(32)
    at.number_input(key="gen_num_samples").set_value(2)
    at.button(key="gen_go").click().run()
    assert not at.exception and not _errors(at)
    texts = [m.value for m in at.markdown if m.value.startswith("**Sample")]
    assert len(texts) == 2
    n_notes = [int(t.split("→ ")[1].split(" notes")[0]) for t in texts]
    assert sum(n_notes) > 0
    # per sample: the whole roll and one zoomed on the new notes, and one player
    assert len(at.image) == 4 and len(at.get("audio")) == 2
    assert any(c.value.startswith("The model sees prompt ") and "of context 96" in c.value
               for c in at.caption)
    assert any("tokens/s" in c.value for c in at.caption)
    # the files behind the page: a decodable PNG per sample and WAVs as long as the music
    out = next((app_env["out"] / "generations").iterdir())
    png = matplotlib.image.imread(out / "pianoroll_0.png")
    assert png.shape[0] > 300 and png.shape[1] > 1000
    k = n_notes.index(max(n_notes))
    with wave.open(io.BytesIO((out / f"combined_{k}.wav").read_bytes())) as w:
        seconds = w.getnframes() / w.getframerate()
    from piano_gpt_jax.music.midi import read_midi

    music_end = read_midi(out / f"combined_{k}.mid")["end"].max()
    builtin = any("built-in synthesizer" in c.value for c in at.caption)
    tail = 0.3 if builtin else 6.0  # FluidSynth renders its reverb tail too
    assert music_end - 0.05 <= seconds <= music_end + tail
    assert {f"generation_{k}.mid", "prompt.mid", "tokens.json"} <= {p.name for p in
                                                                      out.iterdir()}
    assert len(at.get("download_button")) == 2 + 2 * 2
    # the loaded model is cached: a second click samples without reloading it
    at.number_input(key="gen_seed").set_value(5)
    at.button(key="gen_go").click().run()
    assert not at.exception and len(list((app_env["out"] / "generations").iterdir())) == 2
    assert len(loads) <= 1  # loaded at most once (an earlier test may have cached it already)


@pytest.mark.slow
def test_bad_input_shows_messages_and_the_page_keeps_working(app_env, arpeggio_midi,
                                                             tmp_path):
    at = _page().run()
    at.text_input(key="gen_ckpt_path").set_value(str(tmp_path / "nope")).run()
    assert "does not exist" in _errors(at)[0]
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x80\x04 not a checkpoint")
    at.text_input(key="gen_ckpt_path").set_value(str(junk)).run()
    assert "cannot load checkpoint" in _errors(at)[0] and not at.exception

    # a checkpoint whose vocabulary lacks the chosen task's tokens
    narrow = make_tiny_run(tmp_path / "top-line-only", tasks="top_line", steps=0)
    at.text_input(key="gen_ckpt_path").set_value(str(narrow)).run()
    at.file_uploader(key="gen_upload").set_value(
        ("arpeggio.mid", arpeggio_midi.read_bytes(), "audio/midi")).run()
    at.selectbox(key="gen_task").set_value("high_notes_masking-x5")
    at.button(key="gen_go").click().run()
    assert "vocabulary has no" in _errors(at)[0] and not at.exception
    at.selectbox(key="gen_task").set_value("continuation")

    at.text_input(key="gen_ckpt_path").set_value(str(app_env["runs"] / "tiny")).run()
    assert not _errors(at)
    for name, data, message in [("broken.mid", b"MThd garbage" * 20, "not a readable MIDI"),
                                ("empty.mid", b"", "is empty")]:
        at.file_uploader(key="gen_upload").set_value((name, data, "audio/midi")).run()
        assert message in _errors(at)[0] and not at.exception
        assert at.button(key="gen_go").disabled
    at.file_uploader(key="gen_upload").set_value(
        ("arpeggio.mid", arpeggio_midi.read_bytes(), "audio/midi")).run()
    assert not _errors(at)
    # a generation that writes no notes (one token cannot open and close one) says so
    at.number_input(key="gen_max_new_tokens").set_value(1)
    at.button(key="gen_go").click().run()
    assert any("wrote no notes" in w.value for w in at.warning)
    # a task that slices every note away from the prompt, and an impossible slice
    at.radio(key="gen_slice_mode").set_value("seconds").run()
    at.number_input(key="gen_first_s").set_value(100.0).run()
    assert any("holds no notes" in w.value for w in at.warning)
    assert not at.exception
    assert Path(app_env["out"]).is_dir()


@pytest.mark.slow
def test_dataset_piece_prompt_with_a_task(app_env, small_dataset):
    at = _page().run()
    at.selectbox(key="gen_ckpt_choice").set_value(str(app_env["runs"] / "tiny")).run()
    at.session_state["gen_dataset"] = str(small_dataset)  # not 'builtin': no 30 s build here
    at.radio(key="gen_prompt_source").set_value("dataset piece").run()
    assert not _errors(at), _errors(at)
    assert at.selectbox(key="gen_split").value == "validation"
    assert at.selectbox(key="gen_piece").options[1].startswith("1: Frédéric Chopin")
    composer = next(s for s in at.selectbox if s.label == "Composer token")
    assert composer.value == "<LISZT>"  # from the piece's source
    at.number_input(key="gen_last_note").set_value(24)
    at.number_input(key="gen_shift").set_value(-3)
    at.selectbox(key="gen_task").set_value("high_notes_masking-x5")
    at.number_input(key="gen_max_new_tokens").set_value(24)
    at.button(key="gen_go").click().run()
    assert not at.exception and not _errors(at)
    # 24 notes make 120 tokens, more than the context (96): before, the model silently got the
    # last 96 (its dataset, composer and task tokens cut off) while the page said 19 notes
    assert any("prompt 16 notes / 93 tokens of context 96, original target 5 notes" in c.value
               for c in at.caption)
    assert any(c.value.startswith("the prompt of 24 notes is 120 tokens") for c in at.caption)
    assert len(at.image) == 2  # the whole roll and the zoomed one
    # a task generation is scored against the notes the task removed
    table = at.dataframe[0].value
    assert "confusion metrics/weighted_f1" in table.index and len(table) == 18
    at.text_input(key="gen_dataset").set_value(str(app_env["tmp"] / "missing")).run()
    assert "does not exist" in _errors(at)[0]


def test_the_sampling_controls_start_at_the_settings_one_set_of_defaults(app_env):
    """The page draws a control per sampling setting from its declaration: the same defaults
    as the generate CLI (the page once offered 256 new tokens where the CLI gave 512)."""
    from piano_gpt_jax.sampling_settings import SamplingSettings, user_settings

    at = _page().run()
    at.selectbox(key="gen_ckpt_choice").set_value(str(app_env["runs"] / "tiny")).run()
    assert not at.exception
    defaults = SamplingSettings()
    for f in user_settings():
        control = at.slider if f.metadata["control"].slider else at.number_input
        widget = control(key=f"gen_{f.name}")
        assert widget.value == getattr(defaults, f.name), f.name
        assert widget.label == f.metadata["control"].label
