"""Runs page: loss curves of one or more runs (per eval split, against steps or tokens), learning
rate and throughput, and each run's config, latest evaluation and exports."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd
import streamlit as st

from piano_gpt_jax.app import navigation, runs, state

MAX_DEFAULT_RUNS = 4
CHART_HEIGHT = 320


def render() -> None:
    st.title("Runs")
    cfg = state.settings()
    found = [str(p) for p in runs.find_runs(cfg.runs_root)]
    extra = st.text_input("Other run directories (comma-separated)", key="runs_extra")
    candidates = list(found)
    for raw in (extra or "").split(","):
        path = Path(raw.strip()).expanduser()
        if not raw.strip():
            continue
        if not path.is_dir():
            st.error(f"{path} is not a directory")
        elif not runs.is_run(path):
            st.error(f"{path} holds neither metrics.jsonl nor checkpoints")
        elif str(path) not in candidates:
            candidates.append(str(path))
    if not candidates:
        st.info(f"No runs under {cfg.runs_root}/. Train one (python -m piano_gpt_jax.train "
                "--config configs/piano.py:tiny) or type a run directory above.")
        return
    default = [c for c in candidates if c not in found] + found[:MAX_DEFAULT_RUNS]
    chosen = st.multiselect("Runs", candidates, default=default[:MAX_DEFAULT_RUNS],
                            key="runs_chosen")
    if not chosen:
        st.info("Pick at least one run.")
        return
    loaded = [runs.load_run(Path(p)) for p in chosen]
    for run in loaded:
        if run.torn_lines:
            st.caption(f"{run.name}: skipped {run.torn_lines} unreadable line(s) of "
                       "metrics.jsonl (a run killed mid-write, or still writing).")
    curves_section(loaded)
    for run in loaded:
        run_details(run)


def _line_chart(df: pd.DataFrame, x: str, y: str, colour: str, log_y: bool = False,
                dash: str | None = None):
    encodings = dict(
        x=alt.X(f"{x}:Q", title=x),
        y=alt.Y(f"{y}:Q", title=y, scale=alt.Scale(type="log" if log_y else "linear",
                                                   zero=False)),
        color=alt.Color(f"{colour}:N", title=None, legend=alt.Legend(orient="bottom")),
        tooltip=[colour, x, alt.Tooltip(f"{y}:Q", format=".4g")])
    if dash:
        encodings["strokeDash"] = alt.StrokeDash(f"{dash}:N", title=None, legend=None)
    return alt.Chart(df).mark_line(point=alt.OverlayMarkDef(size=18)).encode(
        **encodings).properties(height=CHART_HEIGHT).interactive()


def curves_section(loaded: list[runs.Run]) -> None:
    c1, c2 = st.columns(2)
    x = c1.radio("x axis", ["step", "tokens"], horizontal=True, key="runs_x")
    log_y = c2.checkbox("log-scale loss", key="runs_log")
    curves = runs.loss_curves(loaded)
    st.subheader("Loss")
    if curves.empty:
        st.info("No train or eval events in metrics.jsonl yet.")
    else:
        curves = curves.dropna(subset=[x]).assign(
            series=lambda d: d["run"] + " · " + d["curve"],
            kind=lambda d: d["curve"].str.split(" ").str[0])
        st.altair_chart(_line_chart(curves, x, "loss", "series", log_y, dash="kind"),
                        width="stretch")
    c1, c2 = st.columns(2)
    for col, key, title in ((c1, "lr", "Learning rate"), (c2, "tokens_per_s", "Tokens/s")):
        series = (runs.lr_series(loaded) if key == "lr"
                  else runs.train_series(loaded, key)).dropna(subset=[x])
        with col:
            st.subheader(title)
            if series.empty:
                st.caption("not logged")
            else:
                st.altair_chart(_line_chart(series, x, key, "run"), width="stretch")


def run_details(run: runs.Run) -> None:
    with st.expander(f"{run.name} — {run.path}", expanded=False):
        evals = runs.latest_eval(run)
        if evals is not None:
            st.markdown(f"**Latest evaluation** (step {evals.attrs['step']})")
            st.dataframe(evals, width="content")
        else:
            st.caption("No evaluation logged yet.")
        task_evals = runs.latest_task_eval(run)
        if task_evals is not None:
            st.markdown("**PIANO-task metrics** (newest `python -m piano_gpt_jax.evaluate`)")
            st.dataframe(task_evals, width="stretch")
        st.markdown("**Config**")
        if run.config is None:
            st.caption("not available (no checkpoint meta or JSON config in this directory)")
        else:
            config = runs.flat_config(run.config)
            flat = pd.DataFrame({"value": [str(v) for v in config.values()]},
                                index=pd.Index(list(config), name="key"))
            st.caption(f"from {run.config_source}")
            st.dataframe(flat, height=260, width="stretch")
        st.markdown("**Exports**")
        if not run.exports:
            st.caption("none (.pt files appear at the end of training)")
        for k, path in enumerate(run.exports):
            c1, c2, c3 = st.columns([3, 1, 1])
            c1.code(str(path), language=None)
            c2.download_button(f"Download ({path.stat().st_size / 1e6:.1f} MB)",
                               data=lambda p=path: p.read_bytes(), file_name=path.name,
                               mime="application/octet-stream", on_click="ignore",
                               key=f"runs_dl_{run.path}_{k}")
            if c3.button("Open in Generate", key=f"runs_gen_{run.path}_{k}"):
                st.session_state["gen_ckpt_path"] = str(path)
                navigation.go_to(navigation.GENERATE)
