"""What survives between clicks: loaded models, opened datasets and the app settings.

Streamlit reruns the page script on every interaction; `st.cache_resource` keeps one loaded model
(keyed by path and modification time) and a few datasets, so a second Generate click samples at
once instead of reloading and re-converting the checkpoint.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from piano_gpt_jax.app import dataset_view, models
from piano_gpt_jax.app.settings import AppSettings


def settings() -> AppSettings:
    return AppSettings.from_env()


@st.cache_resource(max_entries=6, show_spinner="Loading the checkpoint…")
def _model(key: tuple[str, float]) -> models.LoadedModel:
    return models.load_model(key[0])


def model(path: str) -> models.LoadedModel:
    """The loaded checkpoint at `path` (raises AppError); reloaded only when its files change."""
    return _model(models.cache_key(path))


@st.cache_resource(max_entries=3, show_spinner="Opening the dataset (the first time can take a "
                                               "minute: MIDI folders and 'builtin' are imported "
                                               "once and cached)…")
def dataset(name: str) -> Any:
    return dataset_view.load_dataset(name)


@st.cache_resource(max_entries=6, show_spinner=False)
def piece_table(name: str, split: str) -> pd.DataFrame:
    return dataset_view.piece_table(dataset(name)[split])


@st.cache_resource(show_spinner=False)
def default_tokenizer() -> Any:
    return dataset_view.default_tokenizer()
