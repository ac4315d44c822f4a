"""The three pages and their URLs, in one place so a page can send the user to another."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

GENERATE, DATASET, RUNS = "generate", "dataset", "runs"
SCRIPTS = Path(__file__).with_name("page_scripts")


def pages() -> dict[str, st.Page]:
    return {
        GENERATE: st.Page(SCRIPTS / "generate.py", title="Generate", icon=":material/piano:",
                          url_path=GENERATE, default=True),
        DATASET: st.Page(SCRIPTS / "dataset.py", title="Dataset review",
                         icon=":material/library_music:", url_path=DATASET),
        RUNS: st.Page(SCRIPTS / "runs.py", title="Runs", icon=":material/monitoring:",
                      url_path=RUNS),
    }


def go_to(name: str) -> None:
    st.switch_page(pages()[name])
