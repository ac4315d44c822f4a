"""The Runs page in Streamlit's headless test harness."""

from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest

from piano_gpt_jax.app.testing_support import app_script


def _page() -> AppTest:
    return AppTest.from_string(app_script("runs_page"), default_timeout=30)


def _chart_specs(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def test_loss_curves_config_and_latest_eval(app_env):
    at = _page().run()
    assert not at.exception and at.title[0].value == "Runs"
    assert at.multiselect(key="runs_chosen").value == [str(app_env["runs"] / "other"),
                                                       str(app_env["runs"] / "tiny"),
                                                       str(app_env["runs"] / "tiny-b")]
    specs = _chart_specs(at)
    assert len(specs) == 3  # loss, learning rate, tokens/s
    assert specs[0]["encoding"]["y"]["field"] == "loss"
    assert any("unreadable line" in c.value for c in at.caption)  # the torn last line
    # the tiny run's config comes from its checkpoint meta; the other run has none
    assert any(c.value.startswith("from ") and "meta" in c.value for c in at.caption)
    assert any("not available" in c.value for c in at.caption)
    evals = [d.value for d in at.dataframe if "loss" in d.value.columns]
    assert len(evals) == 2 and "bach" in evals[0].index
    at.radio(key="runs_x").set_value("tokens")
    at.checkbox(key="runs_log").check().run()
    spec = _chart_specs(at)[0]
    assert spec["encoding"]["x"]["field"] == "tokens"
    assert spec["encoding"]["y"]["scale"]["type"] == "log"


def test_bad_paths_and_empty_selection(app_env, tmp_path):
    at = _page().run()
    at.text_input(key="runs_extra").set_value(f"{tmp_path / 'nope'}, {tmp_path}").run()
    assert [e.value for e in at.error] == [f"{tmp_path / 'nope'} is not a directory",
                                           f"{tmp_path} holds neither metrics.jsonl nor "
                                           "checkpoints"]
    at.multiselect(key="runs_chosen").set_value([]).run()
    assert at.info[0].value == "Pick at least one run." and not at.exception
