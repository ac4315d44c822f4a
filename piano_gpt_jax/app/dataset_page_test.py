"""The Dataset review page in Streamlit's headless test harness."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from piano_gpt_jax.app.testing_support import app_script


def _page() -> AppTest:
    return AppTest.from_string(app_script("dataset_page"), default_timeout=60)


@pytest.mark.slow
def test_pieces_rolls_histograms_and_task_split(app_env, small_dataset):
    at = _page().run()
    assert not at.exception and at.title[0].value == "Dataset review"
    assert at.info[0].value == "Type a dataset and press Open."
    at.text_input(key="ds_name").set_value(str(small_dataset))
    at.button(key="ds_open").click().run()
    assert not at.exception and not at.error
    assert at.selectbox(key="ds_split").options == ["train", "validation", "test"]
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == 2
    assert at.metric[0].value == "300"
    assert len(at.image) == 2  # the piece, and its task split
    assert len(at.get("vega_lite_chart")) == 3  # pitch, velocity, duration
    at.text_input(key="ds_filter").set_value("bach").run()
    assert at.selectbox(key="ds_piece").options == ["1: Johann Sebastian Bach — " +
                                                    at.dataframe[0].value.title.iloc[0]]
    at.selectbox(key="ds_task").set_value("top_line_masking-x1").run()
    assert "fits" in at.success[0].value and "context size 2048" in at.success[0].value
    # the run's record size: context 96 cannot hold 24 notes of a task record
    at.selectbox(key="ds_run").set_value(str(app_env["runs"] / "tiny")).run()
    assert not at.exception and at.number_input(key="ds_context").value == 96
    assert at.number_input(key="ds_n_notes").value == 24
    assert "too long" in at.warning[0].value


def test_missing_dataset_shows_an_error(app_env):
    at = _page().run()
    at.text_input(key="ds_name").set_value(str(app_env["tmp"] / "no-such-dataset"))
    at.button(key="ds_open").click().run()
    assert not at.exception and "does not exist" in at.error[0].value
