"""The Generate page as the place to judge models (AppTest): what the model sees before the
click, a composer x seed grid, checkpoints side by side, blind A/B judgements with their tally,
the history of earlier generations, and the page's behaviour after errors and a Stop."""

from __future__ import annotations

import io
import json
import wave
import zipfile

import pytest
from streamlit.testing.v1 import AppTest

from piano_gpt_jax.app import generate_page, generation
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.app.testing_support import app_script

pytestmark = pytest.mark.slow


def _page() -> AppTest:
    at = AppTest.from_string(app_script("generate_page"), default_timeout=120)
    return at.run()


def _upload(at: AppTest, midi, name: str = "arpeggio.mid") -> None:
    at.file_uploader(key="gen_upload").set_value((name, midi.read_bytes(), "audio/midi")).run()


def _one(at: AppTest, app_env, midi) -> None:
    at.selectbox(key="gen_ckpt_choice").set_value(str(app_env["runs"] / "tiny")).run()
    _upload(at, midi)
    at.number_input(key="gen_max_new_tokens").set_value(16)


def _seconds(wav: bytes) -> float:
    with wave.open(io.BytesIO(wav)) as w:
        return w.getnframes() / w.getframerate()


def test_what_the_model_sees_is_said_before_generating(app_env, long_midi):
    at = _page()
    at.selectbox(key="gen_ckpt_choice").set_value(str(app_env["runs"] / "tiny")).run()
    _upload(at, long_midi, "long.mid")
    # the default slice is the run's notes_per_record (24), not a fixed 64
    assert at.number_input(key="gen_last_note").value == 24
    assert any("Prompt: 24 notes" in c.value for c in at.caption)
    at.number_input(key="gen_last_note").set_value(200).run()
    sees = next(c.value for c in at.caption if c.value.startswith("The model sees"))
    tokens = int(sees.split("prompt ")[1].split(" tokens")[0])
    assert tokens < 96 and "of context 96" in sees
    assert any("the prompt of 200 notes is" in i.value and "kept the first" in i.value
               for i in at.info)


def test_a_new_error_clears_the_previous_result(app_env, arpeggio_midi, monkeypatch):
    at = _page()
    _one(at, app_env, arpeggio_midi)
    at.button(key="gen_go").click().run()
    assert [m for m in at.markdown if m.value.startswith("**Sample 0")]

    def refuse(*args, **kwargs):
        raise AppError("the sampler refused this request")

    monkeypatch.setattr(generation, "run_request", refuse)
    at.button(key="gen_go").click().run()
    assert [e.value for e in at.error] == ["the sampler refused this request"]
    assert not [m for m in at.markdown if m.value.startswith("**Sample")]


def test_a_stopped_generation_is_said_and_an_odd_upload_name_is_harmless(app_env,
                                                                         arpeggio_midi):
    at = _page()
    at.session_state[generate_page.RUNNING_KEY] = True  # what a Stop click leaves behind
    at.run()
    assert any("stopped before it finished" in w.value for w in at.warning)
    at.run()
    assert not any("stopped" in w.value for w in at.warning)  # said once
    at.selectbox(key="gen_ckpt_choice").set_value(str(app_env["runs"] / "tiny")).run()
    _upload(at, arpeggio_midi, "bad\x00name\x07.mid")
    assert not at.exception
    assert any("contains a NUL byte" in e.value and "rename the file" in e.value
               for e in at.error)


def test_listening_where_the_new_notes_are(app_env, arpeggio_midi):
    at = _page()
    _one(at, app_env, arpeggio_midi)
    at.number_input(key="gen_max_new_tokens").set_value(48)
    at.button(key="gen_go").click().run()
    lead = _seconds(at.get("audio")[0].proto.url and _audio_bytes(at, 0))
    at.radio(key="gen_listen").set_value("prompt + new notes").run()
    whole = _seconds(_audio_bytes(at, 0))
    at.radio(key="gen_listen").set_value("new notes alone").run()
    alone = _seconds(_audio_bytes(at, 0))
    assert alone < lead < whole  # 3 s of lead-in by default, the 4 s prompt in the whole


def _audio_bytes(at: AppTest, k: int) -> bytes:
    """The WAV a player plays: the page renders it into the session's media cache."""
    media = at.session_state["gen_media"]
    listen = at.radio(key="gen_listen").value
    seconds = {"new notes with lead-in": at.slider(key="gen_leadin").value,
               "new notes alone": 0.0, "prompt + new notes": None}[listen]
    res = at.session_state[generate_page.RESULT_KEY]
    return media[(res["out_dir"], k, "wav", seconds)][0]


def test_a_grid_of_composers_and_seeds(app_env, arpeggio_midi):
    at = _page()
    at.radio(key="gen_mode").set_value("Grid").run()
    _one(at, app_env, arpeggio_midi)
    at.multiselect(key="gen_grid_composers").set_value(["<BACH>", "<CHOPIN>"])
    at.text_input(key="gen_grid_seeds").set_value("0, 7")
    at.button(key="gen_grid_go").click().run()
    assert not at.exception and not at.error
    assert [m.value for m in at.markdown if m.value.startswith("####")] == ["#### <BACH>",
                                                                           "#### <CHOPIN>"]
    assert len(at.get("audio")) == 4 and len(at.image) == 4
    res = at.session_state[generate_page.GRID_KEY]
    tokens = [json.loads(generation_file(c["out_dir"])) for c in res["cells"]]
    assert [(t["request"]["composer_token"], t["request"]["seed"]) for t in tokens] == [
        ("<BACH>", 0), ("<BACH>", 7), ("<CHOPIN>", 0), ("<CHOPIN>", 7)]
    vocab_bach = tokens[0]["prompt_ids"][1] != tokens[2]["prompt_ids"][1]
    assert vocab_bach  # the composer token differs in the prompt itself


def generation_file(folder: str) -> str:
    from pathlib import Path

    return (Path(folder) / "tokens.json").read_text()


def test_checkpoints_side_by_side_and_blind_judgements(app_env, arpeggio_midi):
    at = _page()
    at.radio(key="gen_mode").set_value("Compare checkpoints").run()
    runs = [str(app_env["runs"] / "tiny"), str(app_env["runs"] / "tiny-b")]
    at.multiselect(key="gen_cmp_ckpts").set_value(runs).run()
    _upload(at, arpeggio_midi)
    at.number_input(key="gen_max_new_tokens").set_value(16)
    at.button(key="gen_cmp_go").click().run()
    assert not at.exception and not at.error
    titles = [m.value for m in at.markdown if m.value.startswith("**tiny")]
    assert len(titles) == 2 and titles[0].startswith("**tiny (step 100)")
    assert titles[1].startswith("**tiny-b (step 40)")

    at.radio(key="gen_mode").set_value("Blind A/B").run()
    at.multiselect(key="gen_ab_ckpts").set_value(runs).run()
    _upload(at, arpeggio_midi)  # the prompt widgets appear once two checkpoints are chosen
    assert at.number_input(key="gen_last_note").value == 24  # the default again, not 1
    at.number_input(key="gen_max_new_tokens").set_value(16)
    at.button(key="gen_ab_go").click().run()
    assert not at.exception and not at.error
    shown = [m.value for m in at.markdown if m.value.startswith("**")]
    assert [s.split(":")[0] for s in shown] == ["**Sample 1**", "**Sample 2**"]  # no names
    at.button(key="gen_ab_first").click().run()
    assert any("Recorded in" in s.value and "Sample 1 was tiny" in s.value for s in at.success)
    lines = (app_env["out"] / "ab" / "judgements.jsonl").read_text().splitlines()
    (judgement,) = map(json.loads, lines)
    assert judgement["choice"] == "first" and judgement["winner"] == judgement["played"][0]
    assert sorted(judgement["played"]) == runs
    tally = at.dataframe[-1].value
    assert tally["judgements"].tolist() == [1] and "95% CI" in tally.iloc[0, -1]


def test_history_lists_plays_and_zips_earlier_generations(app_env, arpeggio_midi):
    at = _page()
    _one(at, app_env, arpeggio_midi)
    at.button(key="gen_go").click().run()
    at.radio(key="gen_mode").set_value("History").run()
    assert not at.exception
    assert len(at.expander) == 1 and "continuation" in at.expander[0].label
    assert len(at.get("audio")) == 1
    zipped = at.get("download_button")[0]
    assert zipped.proto.label == "All files (zip)"
    folder = next((app_env["out"] / "generations").iterdir())
    names = zipfile.ZipFile(io.BytesIO(_zip_of(folder))).namelist()
    assert {"tokens.json", "prompt.mid", "combined_0.wav", "pianoroll_0.png"} <= set(names)


def _zip_of(folder) -> bytes:
    from piano_gpt_jax.app import history

    return history.zip_bytes(folder)
