"""Generate page: pick a checkpoint and a prompt, sample, then look, listen and download; or
judge models side by side (a grid of composers x seeds, several checkpoints on one prompt, blind
A/B pairs) and go back to earlier generations.

What the model will see ("prompt N tokens of context C") is shown before any button, computed by
the code that builds it. Results are kept in the session so downloads and other clicks do not
lose them, and a new error clears the previous result (it would pass for the new one); every run
writes into its own new folder under the app's output folder.
"""

from __future__ import annotations

import dataclasses
import math
import re
import secrets
from pathlib import Path

import pandas as pd
import streamlit as st

from piano_gpt_jax import out_dir as out_dir_lib
from piano_gpt_jax import pianoroll
from piano_gpt_jax.app import audio, blind_ab, generation, history, models, prompts, rolls, state
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.app.generation import CONTINUATION, Generation, Request
from piano_gpt_jax.app.settings import AppSettings
from piano_gpt_jax.music import layouts
from piano_gpt_jax.sampling_settings import user_settings

MODES = ("Generate", "Grid", "Compare checkpoints", "Blind A/B", "History")
RESULT_KEY, GRID_KEY, COMPARE_KEY, PAIR_KEY = ("gen_result", "gen_grid_result",
                                               "gen_cmp_result", "gen_ab_pair")
RUNNING_KEY = "gen_running"  # set while sampling: still set at the next run = it was stopped
PROMPT_SOURCES = ("MIDI upload", "dataset piece", "empty")
LISTEN = ("new notes with lead-in", "new notes alone", "prompt + new notes")
MAX_COLUMNS = 3
MAX_GRID_CELLS = 24
DEFAULT_LAST_NOTE = 64  # when the checkpoint does not say its run's notes_per_record


def _tolerate_nul_in_upload_names() -> None:
    """Streamlit checks an upload's name while restoring widget state, before the page runs, and
    a NUL byte in it replaced the whole page with Streamlit's exception box until a reload. The
    check now sees the name without NUL bytes, and the page refuses such a file itself (above):
    its name is never used as a path here (uploads are written as scratch/upload.mid)."""
    from streamlit.elements.widgets import file_uploader

    check = file_uploader.enforce_filename_restriction
    if getattr(check, "tolerates_nul", False):
        return

    def without_nul(filename: str, allowed_types) -> None:
        return check(filename.replace("\0", ""), allowed_types)

    without_nul.tolerates_nul = True
    file_uploader.enforce_filename_restriction = without_nul


_tolerate_nul_in_upload_names()


def render() -> None:
    st.title("Generate")
    cfg = state.settings()
    if st.session_state.pop(RUNNING_KEY, None):
        st.warning("The last generation was stopped before it finished; it is not shown (grid "
                   "cells finished before the stop stay in the output folder).")
    mode = st.radio("Mode", MODES, horizontal=True, key="gen_mode")
    if mode == "History":
        show_history(cfg)
        return
    several = mode in ("Compare checkpoints", "Blind A/B")
    loaded = checkpoints_picker(cfg, mode) if several else [checkpoint_picker(cfg)]
    loaded = [m for m in loaded if m is not None]
    if not loaded or (several and len(loaded) < 2):
        if mode == "Generate":
            show_results()
        if mode == "Blind A/B":
            show_tally(cfg)
        return
    model = loaded[0]
    st.subheader("Prompt")
    prompt = prompt_picker(cfg, model)
    st.subheader("Task and sampling")
    request = request_controls(model, prompt)
    grid = grid_controls(request) if mode == "Grid" else None
    ready = prompt is not None and what_the_model_sees(loaded, prompt, request)
    listen = listen_controls()
    if mode == "Generate":
        if _go("Generate", "gen_go", ready):
            run_generation(cfg, model, prompt, request)
        show_results(listen)
    elif mode == "Grid":
        if _go(f"Generate the grid ({len(grid[0])} x {len(grid[1])})", "gen_grid_go", ready):
            run_grid(cfg, model, prompt, request, *grid)
        show_grid(listen)
    elif mode == "Compare checkpoints":
        if _go(f"Generate with each of the {len(loaded)} checkpoints", "gen_cmp_go", ready):
            run_compare(cfg, loaded, prompt, request)
        show_compare(listen)
    else:
        if _go("New blind pair", "gen_ab_go", ready):
            run_pair(cfg, loaded[:2], prompt, request)
        show_pair(cfg, listen)
        show_tally(cfg)


def _go(label: str, key: str, ready: bool) -> bool:
    left, right = st.columns([3, 1])
    clicked = left.button(label, type="primary", key=key, disabled=not ready)
    right.button("Stop", key=f"{key}_stop", help="Stops a running generation (nothing of it "
                                                 "is kept); the page stays as it was.")
    return clicked


# ---------------------------------------------------------------------------------- inputs
def checkpoint_picker(cfg: AppSettings) -> models.LoadedModel | None:
    found = [str(p) for p in models.list_checkpoints(cfg.runs_root)]
    left, right = st.columns(2)
    choice = left.selectbox(
        "Checkpoint", found, index=None, key="gen_ckpt_choice",
        placeholder=f"Choose one of {len(found)} under {cfg.runs_root}/" if found
        else f"No runs under {cfg.runs_root}/: type a path",
        help="Run directories (with checkpoints/ or best/) and .pt files of this trainer or of "
             "piano-gpt. .pt files are read by a safe loader that refuses code in pickles.")
    typed = right.text_input("…or the path of a run directory or .pt file", key="gen_ckpt_path")
    path = (typed or "").strip() or choice
    if not path:
        st.info("Choose a checkpoint to start.")
        return None
    return _load(path)


def _load(path: str) -> models.LoadedModel | None:
    try:
        model = state.model(path)
    except AppError as e:
        st.error(str(e))
        return None
    st.caption(f"Loaded {model.path}: {model.summary}")
    return model


def checkpoints_picker(cfg: AppSettings, mode: str) -> list[models.LoadedModel | None]:
    found = [str(p) for p in models.list_checkpoints(cfg.runs_root)]
    blind = mode == "Blind A/B"
    chosen = st.multiselect(
        "Checkpoints to compare" if not blind else "The two checkpoints to judge blind",
        found, key="gen_ab_ckpts" if blind else "gen_cmp_ckpts",
        max_selections=2 if blind else 6,
        help="Each generates from the same prompt, task and sampling settings.")
    if len(chosen) < 2:
        st.info("Choose two checkpoints." if blind else "Choose two or more checkpoints.")
        return []
    return [_load(path) for path in chosen]


def prompt_picker(cfg: AppSettings, model: models.LoadedModel) -> prompts.Prompt | None:
    """The prompt after slicing and transforms, or None (a message is already shown)."""
    source = st.radio("Prompt from", PROMPT_SOURCES, horizontal=True, key="gen_prompt_source")
    try:
        if source == "empty":
            st.caption("The model starts from its dataset and composer tokens only.")
            return prompts.empty_prompt()
        raw = _uploaded_prompt(cfg) if source == "MIDI upload" else _dataset_prompt()
        if raw is None:
            return None
        return _sliced(raw, model)
    except AppError as e:
        st.error(str(e))
        return None


def _uploaded_prompt(cfg: AppSettings) -> prompts.Prompt | None:
    upload = st.file_uploader("MIDI file", type=["mid", "midi"], key="gen_upload")
    if upload is None:
        st.info("Upload a MIDI file whose first notes become the prompt.")
        return None
    if "\0" in upload.name:
        raise AppError(f"the name of the uploaded file {prompts.display_name(upload.name)!r} "
                       "contains a NUL byte, so it cannot be used; rename the file and upload "
                       "it again")
    name = prompts.display_name(upload.name)
    with cfg.scratch_dir() as scratch:
        notes = prompts.read_upload(upload.getvalue(), name, scratch)
    return prompts.Prompt(notes, name)


def _dataset_prompt() -> prompts.Prompt | None:
    left, mid, right = st.columns([2, 1, 3])
    name = left.text_input("Dataset", value="builtin", key="gen_dataset",
                           help="'builtin', a folder written by save_to_disk, or a MIDI folder")
    name = (name or "").strip()
    dd = state.dataset(name)
    splits = list(dd)
    split = mid.selectbox("Split", splits, key="gen_split",
                          index=splits.index("validation") if "validation" in splits else 0)
    table = state.piece_table(name, split)
    if len(table) == 0:
        raise AppError(f"split {split!r} of {name!r} holds no pieces")
    index = right.selectbox(
        "Piece", range(len(table)), key="gen_piece",
        format_func=lambda i: f"{i}: {table.composer[i]} — {table.title[i]} "
                              f"({table.notes[i]} notes)")
    return prompts.prompt_from_record(dd[split][int(index)], f"{name} {split}[{index}]")


def _sliced(raw: prompts.Prompt, model: models.LoadedModel) -> prompts.Prompt | None:
    # The default slice is as many notes as the run's records held (what the model was trained
    # to read), set again whenever another checkpoint is chosen.
    default = model.notes_per_record or DEFAULT_LAST_NOTE
    if (st.session_state.get("gen_slice_for") != model.path
            or "gen_last_note" not in st.session_state):  # new checkpoint, or widget cleared
        st.session_state["gen_slice_for"] = model.path
        st.session_state["gen_last_note"] = default
    c1, c2, c3, c4, c5 = st.columns(5)
    mode = c1.radio("Slice by", prompts.SLICE_MODES, horizontal=True, key="gen_slice_mode")
    if mode == "notes":
        first = c2.number_input("First note", min_value=0, value=0, step=1, key="gen_first_note")
        last = c3.number_input("Up to note", min_value=1, step=1, key="gen_last_note",
                               help=f"default: {default}, the notes per record of the run "
                                    "that trained this checkpoint" if model.notes_per_record
                               else f"default: {DEFAULT_LAST_NOTE}")
    else:
        first = c2.number_input("From second", min_value=0.0, value=0.0, step=1.0,
                                key="gen_first_s")
        last = c3.number_input("To second", min_value=0.1, value=10.0, step=1.0,
                               key="gen_last_s")
    shift = c4.number_input("Pitch shift", min_value=-24, max_value=24, value=0, step=1,
                            key="gen_shift")
    speed = c5.number_input("Speed factor", min_value=0.25, max_value=4.0, value=1.0, step=0.05,
                            key="gen_speed", help="> 1 plays faster, as the trainer's "
                                                  "speed augmentation")
    notes = prompts.transform(prompts.slice_notes(raw.notes, mode, first, last), shift, speed)
    if len(notes) == 0:
        st.warning(f"This slice of {raw.description} holds no notes; widen it.")
        return None
    st.caption(f"Prompt: {len(notes)} notes, {prompts.duration_s(notes):.1f} s of "
               f"{raw.description} ({len(raw.notes)} notes in all)")
    return dataclasses.replace(raw, notes=notes)


def request_controls(model: models.LoadedModel, prompt: prompts.Prompt | None) -> Request:
    trained = generation.supported_tasks(model)
    supported = set(trained)
    names = [CONTINUATION, *trained, *(n for n in generation.task_names() if n not in supported)]
    c1, c2, c3 = st.columns(3)
    task = c1.selectbox(
        "Task", names, key="gen_task",
        format_func=lambda n: n if n == CONTINUATION or n in supported
        else f"{n} (not in this model's vocabulary)",
        help=f"'continuation' goes on after the prompt; a PIANO task removes notes from the "
             f"prompt and asks for them back. This model knows {len(supported)} of the "
             f"{len(names) - 1} tasks listed (its run's tasks first).")
    dataset_tokens = list(layouts.DATASET_TOKENS)
    composer_tokens = list(layouts.COMPOSER_TOKENS)
    d_default = prompt.dataset_token if prompt else layouts.FALLBACK_DATASET_TOKEN
    c_default = prompt.composer_token if prompt else layouts.UNKNOWN_COMPOSER_TOKEN
    dataset_token = c2.selectbox("Dataset token", dataset_tokens,
                                 index=dataset_tokens.index(d_default))
    composer_token = c3.selectbox("Composer token", composer_tokens,
                                  index=composer_tokens.index(c_default))
    # Every sampling setting has a control: what decides each draw on one row, the rest (seed,
    # budget) beside the number of samples.
    draws = {}
    drawn = [f for f in user_settings() if f.metadata["drawn_as"]]
    others = [f for f in user_settings() if not f.metadata["drawn_as"]]
    for column, f in zip(st.columns(len(drawn)), drawn, strict=True):
        draws[f.name] = _setting_control(column, f)
    *columns, last = st.columns(len(others) + 1)
    for column, f in zip(columns, others, strict=True):
        draws[f.name] = _setting_control(column, f)
    num_samples = last.number_input("Samples", 1, 16, 1, key="gen_num_samples")
    return Request.make(task=task, dataset_token=dataset_token, composer_token=composer_token,
                        num_samples=int(num_samples), **draws)


def _setting_control(column, f):
    """A sampling setting's control, drawn from its declaration (label, range, default, help)."""
    c, default, key = f.metadata["control"], f.default, f"gen_{f.name}"
    kind = type(default)
    if c.slider:
        value = column.slider(c.label, kind(c.low), kind(c.high), default, kind(c.step), key=key,
                              help=f.metadata["help"])
    else:
        value = column.number_input(c.label, kind(c.low), kind(c.high), default,
                                    step=kind(c.step), key=key, help=f.metadata["help"])
    return kind(value)


def grid_controls(request: Request) -> tuple[list[str], list[int]]:
    """(composer tokens, seeds) of a grid, as the reference's prompt_practice dashboard."""
    left, right = st.columns([3, 2])
    composers = left.multiselect("Composer tokens (grid rows)", list(layouts.COMPOSER_TOKENS),
                                 default=[request.composer_token], key="gen_grid_composers")
    text = right.text_input("Seeds (grid columns)", value="0, 1, 2", key="gen_grid_seeds",
                            help="comma-separated integers")
    try:
        seeds = list(dict.fromkeys(int(x) for x in re.split(r"[,\s]+", text.strip()) if x))
    except ValueError:
        st.error(f"seeds must be integers separated by commas, got {text!r}")
        seeds = []
    if len(composers) * len(seeds) > MAX_GRID_CELLS:
        st.error(f"{len(composers)} x {len(seeds)} cells: at most {MAX_GRID_CELLS} per grid")
        seeds = []
    return composers, seeds


def what_the_model_sees(loaded: list[models.LoadedModel], prompt: prompts.Prompt,
                        request: Request) -> bool:
    """Say, before any click, how many tokens each model is given out of its context and what
    was cut to fit; False (and the reason) when the prompt cannot be built."""
    ok = True
    for model in loaded:
        who = f"{Path(model.path).name}: " if len(loaded) > 1 else ""
        try:
            built = generation.build_prompt(model, prompt, request)
        except AppError as e:
            st.error(f"{who}{e}")
            ok = False
            continue
        st.caption(f"{who}The model sees {built.sees} ({len(built.shown)} notes"
                   + (f"; {len(built.target)} removed for the task to write back"
                      if built.target is not None else "") + ").")
        if built.fit_note:
            st.info(f"{who}{built.fit_note}, so that the task and prefix tokens stay in front "
                    "and the model has room to write.")
    return ok


def listen_controls() -> tuple[str, float]:
    left, right = st.columns([3, 2])
    what = left.radio("Listen to", LISTEN, horizontal=True, key="gen_listen")
    seconds = right.slider("Lead-in (seconds of prompt before the new notes)", 0.0, 15.0, 3.0,
                           0.5, key="gen_leadin", disabled=what != LISTEN[0])
    return what, float(seconds)


def _lead_in_seconds(listen: tuple[str, float]) -> float | None:
    what, seconds = listen
    return {LISTEN[0]: seconds, LISTEN[1]: 0.0, LISTEN[2]: None}[what]


# ------------------------------------------------------------------------------ generation
class _Progress:
    """A progress bar moving with the decoded tokens (each update also lets Stop interrupt)."""

    def __init__(self, what: str, cells: int = 1):
        self.bar = st.progress(0.0, text=f"{what}: building the prompt…")
        self.what, self.cells, self.cell = what, cells, 0

    def __call__(self, done: int, total: int) -> None:
        share = (self.cell + min(done / max(total, 1), 1.0)) / self.cells
        cell = f" (cell {self.cell + 1} of {self.cells})" if self.cells > 1 else ""
        self.bar.progress(share, text=f"{self.what}{cell}: {done:,} of up to {total:,} new "
                                      "tokens (a new shape compiles first)")

    def next_cell(self) -> None:
        self.cell += 1

    def done(self, text: str) -> None:
        self.bar.progress(1.0, text=text)


def _run(keys: tuple[str, ...], work) -> None:
    """Run `work()` (which stores its result) with errors shown in one line; a new error clears
    the previous results, which would otherwise pass for the new one."""
    st.session_state[RUNNING_KEY] = True  # left set when Stop interrupts (a BaseException)
    try:
        work()
    except AppError as e:
        for key in keys:
            st.session_state.pop(key, None)
        st.error(str(e))
    except Exception as e:  # noqa: BLE001 — keep the page alive and say what happened
        for key in keys:
            st.session_state.pop(key, None)
        st.error(f"Generation failed ({type(e).__name__}): {str(e)[:500]}")
    st.session_state.pop(RUNNING_KEY, None)


def _generate(model: models.LoadedModel, prompt: prompts.Prompt, request: Request,
              out_dir: Path, progress: _Progress) -> Generation:
    gen = generation.run_request(model, prompt, request, progress=progress)
    generation.write_outputs(gen, out_dir, model.path)
    cfg = state.settings()
    for k in range(len(gen.samples)):  # what the History lists and plays
        with cfg.scratch_dir() as scratch:
            wav, _ = audio.render_wav(generation.combined(gen, k), scratch)
        (out_dir / f"combined_{k}.wav").write_bytes(wav)
    return gen


def run_generation(cfg: AppSettings, model: models.LoadedModel, prompt: prompts.Prompt,
                   request: Request) -> None:
    def work() -> None:
        progress = _Progress(f"Sampling {request.num_samples} x up to "
                             f"{request.sampling.max_new_tokens} tokens")
        generation.check_request(request)
        out_dir = cfg.new_output_dir("generations")
        try:
            gen = _generate(model, prompt, request, out_dir, progress)
        except BaseException:
            out_dir_lib.remove_if_empty(out_dir)
            raise
        for k in range(len(gen.samples)):  # drawn once, shown below from the cache
            _cached((str(out_dir), k, "roll"), lambda k=k: _full_roll(gen, k, out_dir))
        progress.done(f"Done: {gen.n_new_tokens} tokens at {_rate(gen)}")
        st.session_state[RESULT_KEY] = {"gen": gen, "out_dir": str(out_dir),
                                        "checkpoint": model.path}

    _run((RESULT_KEY,), work)


def run_grid(cfg: AppSettings, model: models.LoadedModel, prompt: prompts.Prompt,
             request: Request, composers: list[str], seeds: list[int]) -> None:
    def work() -> None:
        progress = _Progress("Grid", len(composers) * len(seeds))
        out_dir = cfg.new_output_dir("grids")
        cells = []
        for composer in composers:
            for seed in seeds:
                cell_request = dataclasses.replace(request.with_sampling(seed=seed),
                                                   composer_token=composer, num_samples=1)
                cell_dir = out_dir / f"{composer.strip('<>').lower()}-seed{seed}"
                cell_dir.mkdir()
                gen = _generate(model, prompt, cell_request, cell_dir, progress)
                cells.append({"composer": composer, "seed": seed, "gen": gen,
                              "out_dir": str(cell_dir)})
                progress.next_cell()
        progress.done(f"Done: {len(cells)} cells in {out_dir}")
        st.session_state[GRID_KEY] = {"cells": cells, "out_dir": str(out_dir),
                                      "composers": composers, "seeds": seeds}

    _run((GRID_KEY,), work)


def run_compare(cfg: AppSettings, loaded: list[models.LoadedModel], prompt: prompts.Prompt,
                request: Request) -> None:
    def work() -> None:
        progress = _Progress("Comparing", len(loaded))
        out_dir = cfg.new_output_dir("comparisons")
        columns = []
        for i, model in enumerate(loaded):
            model_dir = out_dir / f"{i}-{_slug(Path(model.path).name)}"
            model_dir.mkdir()
            gen = _generate(model, prompt, dataclasses.replace(request, num_samples=1),
                            model_dir, progress)
            columns.append({"checkpoint": model.path, "step": model.step, "gen": gen,
                            "out_dir": str(model_dir)})
            progress.next_cell()
        progress.done(f"Done: {len(columns)} checkpoints in {out_dir}")
        st.session_state[COMPARE_KEY] = {"columns": columns, "out_dir": str(out_dir)}

    _run((COMPARE_KEY,), work)


def run_pair(cfg: AppSettings, loaded: list[models.LoadedModel], prompt: prompts.Prompt,
             request: Request) -> None:
    def work() -> None:
        pair = blind_ab.Pair.draw(loaded[0].path, loaded[1].path, seed=secrets.randbits(24))
        by_path = {m.path: m for m in loaded}
        progress = _Progress("Blind pair", 2)
        out_dir = cfg.new_output_dir("ab")
        gens = []
        for k, path in enumerate(pair.order):
            sample_dir = out_dir / f"sample{k + 1}"
            sample_dir.mkdir()
            gens.append(_generate(by_path[path], prompt, dataclasses.replace(
                request.with_sampling(seed=pair.seed), num_samples=1), sample_dir, progress))
            progress.next_cell()
        progress.done("Listen to both, then choose.")
        st.session_state[PAIR_KEY] = {"pair": pair, "gens": gens, "out_dir": str(out_dir),
                                      "settings": request.as_record()}

    _run((PAIR_KEY,), work)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:60] or "checkpoint"


def _rate(gen: Generation) -> str:
    tps = gen.tokens_per_second
    rate = f"{tps:,.0f} tokens/s" if math.isfinite(tps) else "n/a tokens/s"
    return rate + (f" (compile {gen.compile_seconds:.1f} s)" if gen.compile_seconds else "")


# ------------------------------------------------------------------------------ showing
def _full_roll(gen: Generation, k: int, out_dir: Path) -> bytes:
    layers = [("prompt", gen.prompt, pianoroll.PROMPT_COLOUR)]
    if gen.target is not None:
        layers.append(("original target", gen.target, pianoroll.TARGET_COLOUR))
    layers.append(("generated", gen.samples[k].notes, pianoroll.GENERATED_COLOUR))
    r = gen.request
    return rolls.pianoroll_png(out_dir / f"pianoroll_{k}.png", layers,
                               f"{r.task} | T={r.sampling.temperature} seed={r.sampling.seed} "
                               f"sample {k}")


def _cached(key: tuple, make):
    """Pictures and audio are made once per result and listening choice, then reused."""
    store = st.session_state.setdefault("gen_media", {})
    if key not in store:
        if len(store) > 200:
            store.clear()
        store[key] = make()
    return store[key]


def _zoomed_roll(gen: Generation, k: int, out_dir: Path, seconds: float | None) -> bytes:
    """The new notes (orange) with the lead-in before them (blue); louder notes more opaque."""
    before, new = generation.listening_window(gen, k, seconds)
    layers = [("lead-in", before, pianoroll.PROMPT_COLOUR),
              ("generated", new, pianoroll.GENERATED_COLOUR)]
    tag = "all" if seconds is None else f"{seconds:g}"
    return rolls.pianoroll_png(out_dir / f"zoom_{k}_{tag}.png", layers,
                               f"sample {k}: the new notes")


def _audio(gen: Generation, k: int, seconds: float | None) -> tuple[bytes, str]:
    cfg = state.settings()
    with cfg.scratch_dir() as scratch:
        return audio.render_wav(generation.lead_in(gen, k, seconds), scratch)


def show_sample(gen: Generation, k: int, out_dir: str, listen: tuple[str, float],
                title: str, full_roll: bool = False) -> None:
    """One sample: its numbers, the roll zoomed on the new notes, its audio, its task scores."""
    sample = gen.samples[k]
    end = "stopped at <EOGENAI>" if sample.stopped else "token budget reached"
    st.markdown(f"**{title}**: {len(sample.ids)} tokens → {len(sample.notes)} notes, "
                f"{sample.seconds:.1f} s ({end})")
    seconds = _lead_in_seconds(listen)
    folder = Path(out_dir)
    if full_roll:
        st.image(_cached((out_dir, k, "roll"), lambda: _full_roll(gen, k, folder)),
                 caption="prompt (blue), generated (orange)"
                 + (", original target (grey)" if gen.target is not None else ""))
    st.image(_cached((out_dir, k, "zoom", seconds),
                     lambda: _zoomed_roll(gen, k, folder, seconds)),
             caption="zoomed on the new notes; louder notes are more opaque")
    wav, engine = _cached((out_dir, k, "wav", seconds),
                          lambda: _audio(gen, k, seconds))
    st.audio(wav, format="audio/wav")
    st.caption(f"{listen[0]}" + (f" ({seconds:g} s)" if listen[0] == LISTEN[0] else "")
               + f", {engine}")
    if len(sample.notes) == 0:
        st.warning(_no_notes(k, sample))
    scores = generation.scores(gen, k)
    if scores is not None:
        st.caption("PIANO metrics against the notes the task removed (as `evaluate` reports "
                   "them)")
        st.dataframe(_score_table(scores), width="content")


def _no_notes(k: int, sample) -> str:
    if sample.stopped:
        return (f"Sample {k} holds no notes: the model ended it (<EOGENAI>) before closing "
                "one.")
    n = len(sample.ids)
    return (f"Sample {k} holds no notes: its {n} token{'' if n == 1 else 's'} never closed "
            "a note.")


def _score_table(scores: dict[str, float]) -> pd.DataFrame:
    """PIANO metrics against the removed notes, as `evaluate` names them."""
    return pd.DataFrame({"metric": list(scores), "value": list(scores.values())}).set_index(
        "metric")


def show_results(listen: tuple[str, float] = (LISTEN[0], 3.0)) -> None:
    res = st.session_state.get(RESULT_KEY)
    if not res:
        return
    gen: Generation = res["gen"]
    st.subheader("Result")
    line = (f"{gen.request.task} with {res['checkpoint']}: prompt {len(gen.prompt)} notes / "
            f"{len(gen.prompt_ids)} tokens of context {gen.context}")
    if gen.target is not None:
        line += f", original target {len(gen.target)} notes"
    st.caption(f"{line}; decoding {_rate(gen)}. Files in {res['out_dir']}")
    if gen.fit_note:
        st.caption(gen.fit_note)
    c1, c2 = st.columns(2)
    c1.download_button("Prompt MIDI", gen.files["prompt"].read_bytes(), "prompt.mid",
                       "audio/midi", key="gen_dl_prompt", on_click="ignore")
    c2.download_button("Token ids (JSON)", gen.files["tokens"].read_bytes(), "tokens.json",
                       "application/json", key="gen_dl_tokens", on_click="ignore")
    if all(len(s.notes) == 0 for s in gen.samples):
        st.warning("The model wrote no notes. Try more new tokens, another seed, a higher "
                   "temperature, or a longer prompt.")
    n = len(gen.samples)
    for row in range(0, n, MAX_COLUMNS):
        columns = st.columns(min(MAX_COLUMNS, n))
        for col, k in zip(columns, range(row, min(row + MAX_COLUMNS, n)), strict=False):
            with col:
                show_sample(gen, k, res["out_dir"], listen, f"Sample {k}", full_roll=True)
                d1, d2 = st.columns(2)
                d1.download_button("Generation MIDI",
                                   gen.files[f"generation_{k}"].read_bytes(),
                                   f"generation_{k}.mid", "audio/midi", key=f"gen_dl_gen_{k}",
                                   on_click="ignore")
                d2.download_button("Prompt + generation",
                                   gen.files[f"combined_{k}"].read_bytes(),
                                   f"combined_{k}.mid", "audio/midi", key=f"gen_dl_comb_{k}",
                                   on_click="ignore")


def show_grid(listen: tuple[str, float]) -> None:
    res = st.session_state.get(GRID_KEY)
    if not res:
        return
    st.subheader("Grid")
    st.caption(f"{len(res['composers'])} composer tokens x {len(res['seeds'])} seeds; files in "
               f"{res['out_dir']}")
    cells = {(c["composer"], c["seed"]): c for c in res["cells"]}
    for composer in res["composers"]:
        st.markdown(f"#### {composer}")
        for col, seed in zip(st.columns(len(res["seeds"])), res["seeds"], strict=True):
            with col:
                cell = cells[(composer, seed)]
                show_sample(cell["gen"], 0, cell["out_dir"], listen, f"seed {seed}")


def show_compare(listen: tuple[str, float]) -> None:
    res = st.session_state.get(COMPARE_KEY)
    if not res:
        return
    st.subheader("Side by side")
    st.caption(f"same prompt, task and seed; files in {res['out_dir']}")
    for col, c in zip(st.columns(len(res["columns"])), res["columns"], strict=True):
        with col:
            show_sample(c["gen"], 0, c["out_dir"], listen,
                        f"{Path(c['checkpoint']).name} (step {c['step']})")


def show_pair(cfg: AppSettings, listen: tuple[str, float]) -> None:
    res = st.session_state.get(PAIR_KEY)
    if not res:
        return
    st.subheader("Which do you prefer?")
    st.caption("Two samples, one from each checkpoint, in a random order; names are shown only "
               "after you choose.")
    for k, col in enumerate(st.columns(2)):
        with col:
            show_sample(res["gens"][k], 0, str(Path(res["out_dir"]) / f"sample{k + 1}"), listen,
                        f"Sample {k + 1}")
    c1, c2, c3 = st.columns(3)
    choice = None
    if c1.button("Sample 1 is better", key="gen_ab_first"):
        choice = "first"
    if c2.button("Sample 2 is better", key="gen_ab_second"):
        choice = "second"
    if c3.button("About the same", key="gen_ab_same"):
        choice = "same"
    if choice is not None:
        pair: blind_ab.Pair = res["pair"]
        path = blind_ab.record(cfg.out_dir, pair, choice, res["settings"])
        st.session_state.pop(PAIR_KEY, None)
        st.success(f"Recorded in {path}. Sample 1 was {Path(pair.order[0]).name}, sample 2 "
                   f"was {Path(pair.order[1]).name}.")


def show_tally(cfg: AppSettings) -> None:
    tallies = blind_ab.tally(blind_ab.read(cfg.out_dir))
    if not tallies:
        return
    st.subheader("Blind judgements so far")
    rows = []
    for t in tallies:
        lo, hi = t.interval
        share = ("n/a" if math.isnan(t.a_share)
                 else f"{t.a_share:.0%} (95% CI {lo:.0%}–{hi:.0%})")
        rows.append({"checkpoint A": t.a, "checkpoint B": t.b, "judgements": t.judgements,
                     "A better": t.a_wins, "B better": t.b_wins, "same": t.same,
                     "A preferred (of decisive)": share})
    st.dataframe(pd.DataFrame(rows), width="stretch", hide_index=True)


def show_history(cfg: AppSettings) -> None:
    found = history.entries(cfg.out_dir)
    if not found:
        st.info(f"No generations under {cfg.out_dir}/ yet.")
        return
    st.caption(f"{len(found)} most recent generations under {cfg.out_dir}/")
    for i, entry in enumerate(found):
        with st.expander(entry.title, expanded=i == 0):
            st.json(entry.request, expanded=False)
            for wav in entry.files(".wav"):
                st.caption(wav.name)
                st.audio(wav.read_bytes(), format="audio/wav")
            for png in entry.files(".png"):
                if png.name.startswith("pianoroll_"):
                    st.image(png.read_bytes(), caption=png.name)
            st.download_button("All files (zip)", history.zip_bytes(entry.path),
                               f"{entry.path.name}.zip", "application/zip",
                               key=f"hist_zip_{i}", on_click="ignore")
