"""Dataset review page: browse the pieces of a dataset, look at one, and see how a PIANO task
splits a record of it (what the model is shown, what it must write, how many tokens that is)."""

from __future__ import annotations

from typing import Any

import pandas as pd
import streamlit as st

from piano_gpt_jax import pianoroll
from piano_gpt_jax.app import dataset_view, generation, prompts, rolls, runs, state
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.app.settings import AppSettings
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

OPENED_KEY = "ds_opened"
DEFAULTS_LABEL = "defaults of a new run"


def render() -> None:
    st.title("Dataset review")
    cfg = state.settings()
    left, right = st.columns([4, 1])
    name = left.text_input("Dataset", value="builtin", key="ds_name",
                           help="'builtin', a folder written by save_to_disk, a folder of MIDI "
                                "files, or a Hugging Face hub name (needs network)")
    right.markdown("&nbsp;")
    if right.button("Open", key="ds_open", type="primary"):
        st.session_state[OPENED_KEY] = (name or "").strip()
    opened = st.session_state.get(OPENED_KEY)
    if not opened:
        st.info("Type a dataset and press Open.")
        return
    try:
        dd = state.dataset(opened)
        splits = list(dd)
        split = st.selectbox("Split", splits, key="ds_split")
        table = state.piece_table(opened, split)
    except AppError as e:
        st.error(str(e))
        return
    st.caption(f"{opened}: " + ", ".join(f"{s} {len(dd[s])} pieces" for s in splits))
    index = piece_list(table)
    if index is None:
        return
    try:
        notes, source = dataset_view.piece(dd[split], index)
        show_piece(cfg, notes, source, index)
        show_task_split(cfg, notes, source)
    except AppError as e:
        st.error(str(e))


def piece_list(table: pd.DataFrame) -> int | None:
    query = st.text_input("Filter by composer or title", key="ds_filter").strip().lower()
    shown = table
    if query:
        text = (table["composer"] + " " + table["title"]).str.lower()
        shown = table[text.str.contains(query, regex=False)]
    st.dataframe(shown, height=min(240, 36 * (len(shown) + 1) + 3), width="stretch")
    if len(shown) == 0:
        st.warning("No piece matches the filter.")
        return None
    return st.selectbox("Piece", shown.index.tolist(), key="ds_piece",
                        format_func=lambda i: f"{i}: {table.composer[i]} — {table.title[i]}")


def show_piece(cfg: AppSettings, notes: pd.DataFrame, source: dict, index: int) -> None:
    st.subheader(f"{source.get('composer', '?')} — {source.get('title', '?')}")
    c1, c2, c3 = st.columns(3)
    c1.metric("Notes", f"{len(notes):,}")
    c2.metric("Duration", f"{prompts.duration_s(notes):.1f} s")
    c3.metric("Pitch range", f"{int(notes['pitch'].min())}–{int(notes['pitch'].max())}"
              if len(notes) else "–")
    with cfg.scratch_dir() as scratch:
        png = rolls.pianoroll_png(scratch / "piece.png", [("piece", notes,
                                                           pianoroll.PROMPT_COLOUR)],
                                  f"piece {index}")
    st.image(png)
    charts = dataset_view.histograms(notes)
    for col, (label, df) in zip(st.columns(3), charts.items(), strict=True):
        col.markdown(f"**{label}**")
        col.bar_chart(df, height=200)


def _run_choice(cfg: AppSettings) -> tuple[int, int, Any, str]:
    """(context size, notes per record, tokenizer, where they came from) of the chosen run."""
    found = runs.find_runs(cfg.runs_root)
    labels = [DEFAULTS_LABEL, *(str(p) for p in found)]
    choice = st.selectbox("Record size from", labels, key="ds_run", on_change=_forget_sizes,
                          help="A run's data.context_size, data.notes_per_record and vocabulary")
    context = dataset_view.DEFAULT_CONTEXT_SIZE
    n_notes = dataset_view.DEFAULT_NOTES_PER_RECORD
    tokenizer = state.default_tokenizer()
    if choice != DEFAULTS_LABEL:
        run = runs.load_run(found[labels.index(choice) - 1])
        context = int(runs.config_value(run.config, "data.context_size")
                      or runs.config_value(run.config, "model.context_size") or context)
        n_notes = int(runs.config_value(run.config, "data.notes_per_record") or n_notes)
        meta, _ = runs.latest_meta(run.path)
        desc = (meta or {}).get("tokenizer_desc")
        if desc:
            try:
                tokenizer = ExponentialTimeTokenizer.from_dict(desc)
            except (ValueError, KeyError, TypeError) as e:
                raise AppError(f"the tokenizer of {run.path} cannot be rebuilt: {e}") from None
        else:
            st.caption("This run has no checkpoint with a tokenizer yet; counting with a new "
                       "run's vocabulary.")
    return context, n_notes, tokenizer, choice


def _forget_sizes() -> None:
    """A newly chosen run brings its own record size: drop the numbers typed for the last one."""
    for key in ("ds_context", "ds_n_notes"):
        st.session_state.pop(key, None)


def show_task_split(cfg: AppSettings, notes: pd.DataFrame, source: dict) -> None:
    st.subheader("PIANO task split")
    c1, c2 = st.columns(2)
    with c1:
        context, default_notes, tokenizer, _ = _run_choice(cfg)
    task = c2.selectbox("Task", generation.task_names(), key="ds_task")
    c1, c2, c3 = st.columns(3)
    st.session_state.setdefault("ds_n_notes", default_notes)
    st.session_state.setdefault("ds_context", context)
    n_notes = c1.number_input("Notes per record", 1, 4096, key="ds_n_notes")
    context = c2.number_input("Context size", 16, 65536, key="ds_context")
    first = c3.number_input("First note", 0, max(len(notes) - 1, 0), 0, key="ds_first")
    view = dataset_view.task_view(notes, source, task, first, n_notes, context, tokenizer)
    with cfg.scratch_dir() as scratch:
        png = rolls.pianoroll_png(scratch / "split.png", [
            ("source (the model is shown)", view.source, pianoroll.PROMPT_COLOUR),
            ("target (the model writes)", view.target, pianoroll.GENERATED_COLOUR)],
            f"{task}, notes {first}..{first + len(view.source) + len(view.target) - 1}")
    st.image(png)
    text = (f"Record: {view.total_tokens} tokens (prompt {view.prompt_tokens} incl. <GENAI>, "
            f"target {view.target_tokens}) at context size {view.context_size}")
    if view.fits:
        st.success(text + ": fits.")
    else:
        st.warning(text + f": {view.total_tokens - view.context_size - 1} tokens too long, the "
                          "trainer cuts the end of the target.")
