"""Generate page: pick a checkpoint and a prompt, sample, then look, listen and download.

Results are kept in the session so downloads and other clicks do not lose them; every run writes
into its own new folder under the app's output folder.
"""

from __future__ import annotations

import dataclasses
import math

import streamlit as st

from piano_gpt_jax import pianoroll
from piano_gpt_jax.app import audio, generation, models, prompts, rolls, state
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.app.generation import CONTINUATION, Request
from piano_gpt_jax.app.settings import AppSettings
from piano_gpt_jax.music import layouts

RESULT_KEY = "gen_result"
PROMPT_SOURCES = ("MIDI upload", "dataset piece", "empty")
MAX_COLUMNS = 3


def render() -> None:
    st.title("Generate")
    cfg = state.settings()
    model = checkpoint_picker(cfg)
    if model is None:
        show_results()
        return
    st.subheader("Prompt")
    prompt = prompt_picker(cfg)
    st.subheader("Task and sampling")
    request = request_controls(model, prompt)
    if st.button("Generate", type="primary", key="gen_go", disabled=prompt is None):
        run_generation(cfg, model, prompt, request)
    show_results()


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
    try:
        model = state.model(path)
    except AppError as e:
        st.error(str(e))
        return None
    st.caption(f"Loaded {model.path}: {model.summary}")
    return model


def prompt_picker(cfg: AppSettings) -> prompts.Prompt | None:
    """The prompt after slicing and transforms, or None (a message is already shown)."""
    source = st.radio("Prompt from", PROMPT_SOURCES, horizontal=True, key="gen_prompt_source")
    try:
        if source == "empty":
            st.caption("The model starts from its dataset and composer tokens only.")
            return prompts.empty_prompt()
        raw = _uploaded_prompt(cfg) if source == "MIDI upload" else _dataset_prompt()
        if raw is None:
            return None
        return _sliced(raw)
    except AppError as e:
        st.error(str(e))
        return None


def _uploaded_prompt(cfg: AppSettings) -> prompts.Prompt | None:
    upload = st.file_uploader("MIDI file", type=["mid", "midi"], key="gen_upload")
    if upload is None:
        st.info("Upload a MIDI file whose first notes become the prompt.")
        return None
    with cfg.scratch_dir() as scratch:
        notes = prompts.read_upload(upload.getvalue(), upload.name, scratch)
    return prompts.Prompt(notes, upload.name)


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


def _sliced(raw: prompts.Prompt) -> prompts.Prompt | None:
    c1, c2, c3, c4, c5 = st.columns(5)
    mode = c1.radio("Slice by", prompts.SLICE_MODES, horizontal=True, key="gen_slice_mode")
    if mode == "notes":
        first = c2.number_input("First note", min_value=0, value=0, step=1, key="gen_first_note")
        last = c3.number_input("Up to note", min_value=1, value=64, step=1, key="gen_last_note")
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
    supported = set(generation.supported_tasks(model))
    names = [CONTINUATION, *generation.task_names()]
    c1, c2, c3 = st.columns(3)
    task = c1.selectbox(
        "Task", names, key="gen_task",
        format_func=lambda n: n if n == CONTINUATION or n in supported
        else f"{n} (not in this model's vocabulary)",
        help=f"'continuation' goes on after the prompt; a PIANO task removes notes from the "
             f"prompt and asks for them back. This model knows {len(supported)} of "
             f"{len(names) - 1} tasks.")
    dataset_tokens = list(layouts.DATASET_TOKENS)
    composer_tokens = list(layouts.COMPOSER_TOKENS)
    d_default = prompt.dataset_token if prompt else layouts.FALLBACK_DATASET_TOKEN
    c_default = prompt.composer_token if prompt else layouts.UNKNOWN_COMPOSER_TOKEN
    dataset_token = c2.selectbox("Dataset token", dataset_tokens,
                                 index=dataset_tokens.index(d_default))
    composer_token = c3.selectbox("Composer token", composer_tokens,
                                  index=composer_tokens.index(c_default))
    c1, c2, c3, c4 = st.columns(4)
    temperature = c1.slider("Temperature", 0.0, 2.0, 1.0, 0.05, key="gen_temperature",
                            help="0 = greedy")
    top_k = c2.number_input("Top-k", 0, 10_000, 0, key="gen_top_k", help="0 = off")
    top_p = c3.slider("Top-p", 0.01, 1.0, 1.0, 0.01, key="gen_top_p", help="1 = off")
    min_p = c4.slider("Min-p", 0.0, 0.99, 0.0, 0.01, key="gen_min_p", help="0 = off")
    c1, c2, c3 = st.columns(3)
    seed = c1.number_input("Seed", 0, 2**31 - 1, 0, key="gen_seed")
    num_samples = c2.number_input("Samples", 1, 16, 1, key="gen_num_samples")
    max_new = c3.number_input("Max new tokens", 1, 8192, 256, step=32, key="gen_max_new")
    return Request(task=task, dataset_token=dataset_token, composer_token=composer_token,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   min_p=float(min_p), seed=int(seed), num_samples=int(num_samples),
                   max_new_tokens=int(max_new))


# ------------------------------------------------------------------------------ generation
def run_generation(cfg: AppSettings, model: models.LoadedModel, prompt: prompts.Prompt,
                   request: Request) -> None:
    progress = st.progress(0.0, text="Building the prompt…")
    try:
        generation.check_request(request)
        ids = generation.build_prompt(model, prompt, request)[0]
        progress.progress(0.1, text=f"Sampling {request.num_samples} x up to "
                                    f"{request.max_new_tokens} tokens after a {len(ids)}-token "
                                    "prompt (a new shape compiles first)…")
        gen = generation.generate(model, prompt, request)
        progress.progress(0.6, text=f"{gen.n_new_tokens} tokens at {_rate(gen)}; drawing and "
                                    "rendering audio…")
        out_dir = cfg.new_output_dir("generations")
        generation.write_outputs(gen, out_dir, model.path)
        samples = []
        for k, sample in enumerate(gen.samples):
            layers = [("prompt", gen.prompt, pianoroll.PROMPT_COLOUR)]
            if gen.target is not None:
                layers.append(("original target", gen.target, pianoroll.TARGET_COLOUR))
            layers.append(("generated", sample.notes, pianoroll.GENERATED_COLOUR))
            png = rolls.pianoroll_png(out_dir / f"pianoroll_{k}.png", layers,
                                      f"{request.task} | T={request.temperature} "
                                      f"seed={request.seed} sample {k}")
            with cfg.scratch_dir() as scratch:
                wav, engine = audio.render_wav(generation.combined(gen, k), scratch)
            (out_dir / f"combined_{k}.wav").write_bytes(wav)
            samples.append({
                "png": png, "wav": wav, "engine": engine, "notes": len(sample.notes),
                "tokens": len(sample.ids), "seconds": sample.seconds, "stopped": sample.stopped,
                "midi": gen.files[f"generation_{k}"].read_bytes(),
                "combined": gen.files[f"combined_{k}"].read_bytes()})
        progress.progress(1.0, text=f"Done: {gen.n_new_tokens} tokens at {_rate(gen)}")
    except AppError as e:
        progress.empty()
        st.error(str(e))
        return
    except Exception as e:  # noqa: BLE001 — keep the page alive and say what happened
        progress.empty()
        st.error(f"Generation failed ({type(e).__name__}): {str(e)[:500]}")
        return
    st.session_state[RESULT_KEY] = {
        "samples": samples, "out_dir": str(out_dir), "task": request.task,
        "checkpoint": model.path, "rate": _rate(gen), "compile_s": gen.compile_seconds,
        "prompt_notes": len(gen.prompt), "prompt_tokens": len(gen.prompt_ids),
        "target_notes": None if gen.target is None else len(gen.target),
        "prompt_midi": gen.files["prompt"].read_bytes(),
        "tokens_json": gen.files["tokens"].read_bytes()}


def _rate(gen: generation.Generation) -> str:
    tps = gen.tokens_per_second
    rate = f"{tps:,.0f} tokens/s" if math.isfinite(tps) else "n/a tokens/s"
    return rate + (f" (compile {gen.compile_seconds:.1f} s)" if gen.compile_seconds else "")


def show_results() -> None:
    res = st.session_state.get(RESULT_KEY)
    if not res:
        return
    st.subheader("Result")
    line = (f"{res['task']} with {res['checkpoint']}: prompt {res['prompt_notes']} notes / "
            f"{res['prompt_tokens']} tokens")
    if res["target_notes"] is not None:
        line += f", original target {res['target_notes']} notes"
    st.caption(f"{line}; decoding {res['rate']}. Files in {res['out_dir']}")
    c1, c2 = st.columns(2)
    c1.download_button("Prompt MIDI", res["prompt_midi"], "prompt.mid", "audio/midi",
                       key="gen_dl_prompt", on_click="ignore")
    c2.download_button("Token ids (JSON)", res["tokens_json"], "tokens.json", "application/json",
                       key="gen_dl_tokens", on_click="ignore")
    samples = res["samples"]
    if all(s["notes"] == 0 for s in samples):
        st.warning("The model wrote no notes. Try more new tokens, another seed, a higher "
                   "temperature, or a longer prompt.")
    for row in range(0, len(samples), MAX_COLUMNS):
        columns = st.columns(min(MAX_COLUMNS, len(samples)))
        for col, k in zip(columns, range(row, min(row + MAX_COLUMNS, len(samples))),
                          strict=False):
            with col:
                _show_sample(k, samples[k], res["target_notes"] is not None)


def _show_sample(k: int, s: dict, has_target: bool) -> None:
    end = "stopped at <EOGENAI>" if s["stopped"] else "token budget reached"
    st.markdown(f"**Sample {k}**: {s['tokens']} tokens → {s['notes']} notes, "
                f"{s['seconds']:.1f} s ({end})")
    st.image(s["png"], caption="prompt (blue), generated (orange)"
             + (", original target (grey)" if has_target else ""))
    st.audio(s["wav"], format="audio/wav")
    st.caption(f"prompt + generation, {s['engine']}")
    if s["notes"] == 0:
        st.warning(f"Sample {k} holds no notes: its {s['tokens']} tokens never closed a note.")
    c1, c2 = st.columns(2)
    c1.download_button("Generation MIDI", s["midi"], f"generation_{k}.mid", "audio/midi",
                       key=f"gen_dl_gen_{k}", on_click="ignore")
    c2.download_button("Prompt + generation", s["combined"], f"combined_{k}.mid", "audio/midi",
                       key=f"gen_dl_comb_{k}", on_click="ignore")
