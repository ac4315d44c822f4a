"""Generate music with a trained model: MIDI files, a piano roll and a short summary.

    python -m piano_gpt_jax.generate --checkpoint RUN_DIR_OR.pt --out OUT_DIR
        (--prompt-midi FILE [--prompt-seconds N] | --prompt-dataset SPLIT:INDEX [--dataset NAME])
        [--prompt-notes N] [--task NAME] [--temperature T] [--top-k K] [--top-p P] [--min-p P]
        [--seed S] [--max-new-tokens N] [--num-samples K] [--overwrite]

Without --task the model continues the prompt: `[dataset, composer] + ET(prompt)`, and the new
notes are placed after the prompt's last event. With --task (a PIANO task name such as
top_line_masking-x1) the prompt notes are split by the task as in training, the prompt is
`[dataset, composer, <N_NOTES_k>] + task tokens + [<MUSIC_TIME_a>, <MUSIC_TIME_b>] + ET(source)
+ <GENAI>` (the annotated layout), or `[dataset, composer] + task tokens + ET(source) + <GENAI>`
for a checkpoint whose vocabulary has no <MUSIC_TIME_*> tokens (the plain layout, piano-gpt
f37ac14's, it was trained on) — music/layouts.py builds both, for training and generation alike,
and the generated notes share the prompt's clock (the task's answer is laid over the source); the
removed target notes are written too, for comparison. Continuation prompts are the same in both
layouts.

Writes into OUT_DIR: prompt.mid, generation.mid (generation_<k>.mid for several samples),
combined.mid (prompt + generation), for --task also target.mid, and pianoroll.png
(pianoroll_<k>.png). Existing files are never replaced unless --overwrite is given.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from piano_gpt_jax import out_dir as out_dir_lib
from piano_gpt_jax import pianoroll, sampling, sampling_settings
from piano_gpt_jax.checkpoints import CheckpointError, load_any_checkpoint
from piano_gpt_jax.data.settings import settings_for_checkpoint
from piano_gpt_jax.data.sources import load_piano_dataset
from piano_gpt_jax.music import layouts, pieces
from piano_gpt_jax.music.midi import MidiReadError, read_midi, write_midi
from piano_gpt_jax.music.tasks import resolve_tasks
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer


class GenerateError(ValueError):
    """A problem the user can fix; main() turns it into a message and exit status 1."""


# ----------------------------------------------------------------------------------- prompts
def crop_notes(notes: Any, seconds: float | None, max_notes: int | None) -> pd.DataFrame:
    """The first notes (by start) within `seconds` and at most `max_notes`, shifted to t = 0."""
    df = pieces.to_frame(notes)
    if seconds is not None:
        df = df[df["start"] - df["start"].min() < seconds] if len(df) else df
    if max_notes is not None:
        df = df.iloc[:max_notes]
    return pieces.shift_to_zero(df).reset_index(drop=True)


def _in_vocab(tokenizer, token: str) -> str | None:
    """A dataset/composer token if this vocabulary has it (every one we build does)."""
    return token if token in tokenizer.token_to_id else None


def prompt_for_continuation(tokenizer, notes: pd.DataFrame, dataset_token: str,
                        composer_token: str) -> np.ndarray:
    return layouts.continuation_prompt(tokenizer, notes, _in_vocab(tokenizer, dataset_token),
                                       _in_vocab(tokenizer, composer_token))


def prompt_for_task(tokenizer, task, notes: pd.DataFrame, dataset_token: str,
                composer_token: str, layout: str | None = None,
                ) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame]:
    """(prompt ids ending in <GENAI>, source notes, target notes), built by the same
    music/layouts.py builder as training records; `layout` None = the vocabulary's
    (layouts.checkpoint_layout)."""
    split = task.split(pieces.as_notes(notes))
    if split.n_target_notes == 0:
        raise GenerateError(f"task {task.task_name} leaves no target notes in this prompt; use "
                            "more prompt notes or another task")
    try:
        layout = layout or layouts.checkpoint_layout(None, tokenizer.token_to_id)
        ids = layouts.task_prompt(tokenizer, layout, split,
                                  _in_vocab(tokenizer, dataset_token),
                                  _in_vocab(tokenizer, composer_token))
    except layouts.MissingTokens as e:
        raise GenerateError(f"task {task.task_name}: the checkpoint's vocabulary has no "
                            f"{e.missing}; this model was not trained with them") from None
    return ids, pieces.to_frame(split.source), pieces.to_frame(split.target)


def fit_prompt(build, notes: pd.DataFrame, context_size: int, explicit: bool):
    """(build(notes) with a prompt shorter than the context, a note or None).

    A prompt must leave the model room to generate: cutting it from the front would drop the
    task and prefix tokens it was trained to read. When the notes were not asked for explicitly
    (--prompt-notes), the prompt keeps the most notes that fit; otherwise GenerateError says how
    many would.
    """
    built = build(notes)
    if len(built[0]) < context_size:
        return built, None
    fits = 0  # the most notes whose prompt fits (prompt length grows with the notes)
    lo, hi = 1, len(notes) - 1
    while lo <= hi:
        mid = (lo + hi) // 2
        try:
            ok = len(build(notes.iloc[:mid])[0]) < context_size
        except GenerateError:  # e.g. a task that leaves these few notes no target
            ok = False
        if ok:
            fits, lo = mid, mid + 1
        else:
            hi = mid - 1
    what = (f"the prompt of {len(notes)} notes is {len(built[0])} tokens but the model's "
            f"context is {context_size}")
    if fits == 0:
        raise GenerateError(f"{what}, and not even one note fits with its prefix tokens")
    if explicit:
        raise GenerateError(f"{what}; at most {fits} of these notes fit (--prompt-notes {fits})")
    return build(notes.iloc[:fits]), f"{what}: kept the first {fits} notes"


def resolve_task(name: str):
    try:
        tasks = resolve_tasks(name)
    except ValueError as e:
        raise GenerateError(str(e)) from None
    if len(tasks) != 1:
        raise GenerateError(f"--task needs one task name such as top_line_masking-x1, not the "
                            f"task set {name!r}")
    return tasks[0]


def trained_notes_per_record(meta) -> int | None:
    """notes_per_record of the run that made a checkpoint (`RunMeta`): prompts longer than the
    records a model trained on push it past the contexts it has seen."""
    value = (meta.config.get("data") or {}).get("notes_per_record") if meta.config else None
    return value if isinstance(value, int) and value > 0 else None


def load_prompt_notes(args, checkpoint) -> tuple[pd.DataFrame, str, str, str]:
    """(notes, description, dataset token, composer token) of --prompt-midi / --prompt-dataset."""
    if args.prompt_midi:
        try:
            notes = read_midi(args.prompt_midi)
        except MidiReadError as e:
            raise GenerateError(str(e)) from None
        composer = args.composer_token or layouts.UNKNOWN_COMPOSER_TOKEN
        return notes, str(args.prompt_midi), layouts.FALLBACK_DATASET_TOKEN, composer
    split, _, index = args.prompt_dataset.partition(":")
    if not split or not index.lstrip("-").isdigit():
        raise GenerateError(f"--prompt-dataset must be SPLIT:INDEX such as validation:3, got "
                            f"{args.prompt_dataset!r}")

    name = args.dataset or settings_for_checkpoint(checkpoint).base_dataset_name
    try:
        dd = load_piano_dataset(name)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise GenerateError(f"cannot load dataset {name!r}: {e}") from None
    if split not in dd:
        raise GenerateError(f"dataset {name!r} has no split {split!r}; it has {list(dd)}")
    i = int(index)
    if not 0 <= i < len(dd[split]):
        raise GenerateError(f"index {i} is out of range: {name}:{split} has {len(dd[split])} "
                            "records")
    row = dd[split][i]
    notes = pieces.notes_from_record(row)
    source = row.get("source")
    composer = args.composer_token or layouts.composer_token(source)
    return (pd.DataFrame({k: notes[k] for k in ("pitch", "velocity", "start", "end")}),
            f"{name} {split}[{i}]", layouts.dataset_token(source), composer)


# -------------------------------------------------------------------------------------- main
def build_parser(prog: str = "python -m piano_gpt_jax.generate") -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description="Generate piano music from a checkpoint.")
    ap.add_argument("--checkpoint", required=True, help="run directory, step directory or .pt")
    ap.add_argument("--out", required=True, help="output directory")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt-midi", help="a MIDI file whose first notes are the prompt")
    src.add_argument("--prompt-dataset", help="SPLIT:INDEX of a dataset record")
    ap.add_argument("--dataset", help="dataset for --prompt-dataset (default: the run's)")
    ap.add_argument("--prompt-seconds", type=float, default=None,
                    help="keep the notes starting in the first N seconds")
    ap.add_argument("--prompt-notes", type=int, default=None,
                    help="keep at most N notes (default: the run's data.notes_per_record, the "
                         "length of the records it trained on, else 128)")
    ap.add_argument("--composer-token", help="e.g. <CHOPIN> (default: from the record, or "
                                             "<UNKNOWN_COMPOSER>)")
    ap.add_argument("--task", help="a PIANO task name, e.g. top_line_masking-x1")
    sampling_settings.add_arguments(ap)
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return ap


def _outputs(out: Path, n: int, task: bool) -> dict[str, Path]:
    names = {"prompt": "prompt.mid", "ids": "generation.json"}
    if task:
        names["target"] = "target.mid"
    for k in range(n):
        sfx = "" if n == 1 else f"_{k}"
        names[f"generation{sfx}"] = f"generation{sfx}.mid"
        names[f"combined{sfx}"] = f"combined{sfx}.mid"
        names[f"pianoroll{sfx}"] = f"pianoroll{sfx}.png"
    return {k: out / v for k, v in names.items()}


def jax_sampler(record, prompts, settings, tables) -> sampling.GenerationResult:
    return sampling.sample(record.model_config, record.params, prompts, settings, tables)


def run(args: argparse.Namespace, sampler=jax_sampler, load_checkpoint=None) -> dict[str, Any]:
    """Everything but printing; `sampler(record, prompts, settings, tables)` and `load_checkpoint`
    are swappable so the PyTorch twin can reuse the prompt and output handling.

    Steps: check the request (before any loading, so a bad flag costs nothing) → load the model and
    its tokenizer → build the prompt → sample → write MIDI, piano rolls and the ids file.
    """
    settings = _sampling_settings(args)
    task = resolve_task(args.task) if args.task else None
    paths = _output_paths(args, task is not None)
    record, tokenizer = _load_model(args, load_checkpoint or load_any_checkpoint)
    prompt = _build_prompt(args, record, tokenizer, task)
    try:
        result = sampler(record, [prompt.ids] * args.num_samples, settings, prompt.tables)
    except ValueError as e:  # a request the sampler refuses up front (e.g. memory)
        raise GenerateError(str(e)) from None
    with _written_or_removed(Path(args.out), paths):
        samples = _write_outputs(args, paths, prompt, result, tokenizer, task)
        summary = _summary(args, record, prompt, result, samples, task, paths)
        # The token ids themselves, so two samplers (JAX, PyTorch) can be compared exactly.
        paths["ids"].write_text(json.dumps({**summary,
                                            "prompt_ids": [int(t) for t in prompt.ids]}))
    return summary


@contextlib.contextmanager
def _written_or_removed(out: Path, paths: dict[str, Path]):
    """All of this request's files, or none: on a write error (full disk, a folder made
    read-only meanwhile) the files it created are removed, and the folders it made."""
    created = out_dir_lib.outermost_missing(out)  # the folder this request creates, if any
    existed = {p for p in paths.values() if p.exists()}
    try:
        yield
    except OSError as e:
        for p in paths.values():
            if p not in existed:
                p.unlink(missing_ok=True)
        if created is not None:
            out_dir_lib.remove_if_empty(created)
        raise GenerateError(f"cannot write the outputs to {out} "
                            f"({out_dir_lib.os_error_reason(e)}); nothing of this request was "
                            "kept. Free some space or choose another --out.") from None


def _summary(args: argparse.Namespace, record, prompt, result, samples: list,
             task, paths: dict[str, Path]) -> dict[str, Any]:
    summary = {"checkpoint": str(args.checkpoint), "step": record.step, "prompt": prompt.described,
               "prompt_note": prompt.fit_note,
               "task": task.task_name if task else None,
               "prompt_layout": prompt.layout, "prompt_tokens": int(len(prompt.ids)),
               "prompt_notes": int(len(prompt.shown)),
               "tokens_per_second": result.tokens_per_second,
               "compile_seconds": result.compile_seconds, "samples": samples,
               "files": {name: str(path) for name, path in paths.items()}}
    if prompt.target is not None:
        summary["target_notes"] = int(len(prompt.target))
    return summary


def _sampling_settings(args: argparse.Namespace) -> sampling.SamplingSettings:
    if args.num_samples < 1:
        raise GenerateError("--num-samples must be at least 1")
    if args.prompt_notes is not None and args.prompt_notes < 1:
        raise GenerateError("--prompt-notes must be at least 1")
    try:
        return sampling_settings.from_arguments(args)
    except ValueError as e:
        raise GenerateError(str(e)) from None


def _output_paths(args: argparse.Namespace, has_target: bool) -> dict[str, Path]:
    """The files this request writes; refuses to overwrite earlier output unless asked."""
    paths = _outputs(Path(args.out), args.num_samples, has_target)
    existing = [str(p) for p in paths.values() if p.exists()]
    if existing and not args.overwrite:
        raise GenerateError(f"{existing[0]} exists (and {len(existing) - 1} more); pass "
                            "--overwrite or choose another --out")
    try:
        out_dir_lib.check_writable(args.out, "--out")
    except out_dir_lib.OutDirError as e:
        raise GenerateError(str(e)) from None
    if args.prompt_midi and not Path(args.prompt_midi).is_file():
        raise GenerateError(f"--prompt-midi {args.prompt_midi}: no such file")
    return paths


def _load_model(args: argparse.Namespace, load_checkpoint) -> tuple[Any, ExponentialTimeTokenizer]:
    try:
        record = load_checkpoint(args.checkpoint)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        raise GenerateError(f"cannot load checkpoint {args.checkpoint}: {e}") from None
    try:
        tokenizer = record.tokenizer(str(args.checkpoint))
    except CheckpointError as e:
        raise GenerateError(str(e)) from None
    return record, tokenizer


@dataclasses.dataclass(frozen=True)
class _Prompt:
    ids: np.ndarray  # the tokens the model is given
    shown: pd.DataFrame  # the prompt's notes as written to prompt.mid
    target: pd.DataFrame | None  # the notes a task hid, when there is a task
    described: str  # where the notes came from, for the summary
    fit_note: str | None  # how the prompt was cropped to fit the context, if it was
    layout: str
    tables: sampling.TimeTables
    offset_seconds: float  # where generated notes start: after the prompt's last event


def _build_prompt(args: argparse.Namespace, record, tokenizer: ExponentialTimeTokenizer,
                  task) -> _Prompt:
    raw, described, dataset_token, composer_token = load_prompt_notes(args, record)
    max_notes = args.prompt_notes or trained_notes_per_record(record.meta) or 128
    notes = crop_notes(raw, args.prompt_seconds, max_notes)
    if len(notes) == 0:
        raise GenerateError(f"the prompt from {described} has no notes; check --prompt-seconds")
    # Nothing is added to the vocabulary here (a token without trained embeddings would only
    # confuse the model), so an f37ac14-era vocabulary always means the plain layout.
    layout = layouts.checkpoint_layout(record.meta.prompt_layout, tokenizer.token_to_id)
    tables = sampling.token_tables(tokenizer)
    if task is not None:
        build = lambda n: prompt_for_task(tokenizer, task, n, dataset_token, composer_token, layout)
    else:
        build = lambda n: (prompt_for_continuation(tokenizer, n, dataset_token, composer_token),
                           n, None)
    (prompt_ids, shown, target), fit_note = fit_prompt(
        build, notes, record.model_config.context_size, explicit=args.prompt_notes is not None)
    offset = 0.0
    if task is None:
        # New notes go after the prompt's last event: the seconds its time tokens cover.
        offset = int(tables.time_increment[prompt_ids].sum()) * tokenizer.time_unit
    return _Prompt(prompt_ids, shown, target, described, fit_note, layout, tables, offset)


def _write_outputs(args: argparse.Namespace, paths: dict[str, Path], prompt: _Prompt, result,
                   tokenizer: ExponentialTimeTokenizer, task) -> list[dict[str, Any]]:
    """MIDI and piano rolls for every sample; the per-sample lines of the summary."""
    Path(args.out).mkdir(parents=True, exist_ok=True)
    write_midi(prompt.shown, paths["prompt"])
    if prompt.target is not None:
        write_midi(prompt.target, paths["target"])
    samples = []
    for index, new in enumerate(result.new_tokens):
        suffix = "" if args.num_samples == 1 else f"_{index}"
        generated = tokenizer.decode(new)  # keeps its columns when empty
        generated = generated.assign(start=generated["start"] + prompt.offset_seconds,
                                     end=generated["end"] + prompt.offset_seconds)
        write_midi(generated, paths[f"generation{suffix}"])
        combined = pd.concat([prompt.shown, generated], ignore_index=True) if len(generated) \
            else prompt.shown
        write_midi(combined, paths[f"combined{suffix}"])
        title = (f"{task.task_name if task else 'continuation'} | T={args.temperature} "
                 f"seed={args.seed} sample {index}")
        pianoroll.prompt_and_generation(paths[f"pianoroll{suffix}"], prompt.shown, generated,
                                        prompt.target, title)
        seconds = float(generated["end"].max() - generated["start"].min()) if len(generated) \
            else 0.0
        samples.append({"ids": [int(t) for t in new], "tokens": int(len(new)),
                        "notes": int(len(generated)), "seconds": seconds,
                        "stopped": bool(result.stopped[index])})
    return samples


def print_summary(s: dict[str, Any]) -> None:
    what = f"task {s['task']}" if s["task"] else "continuation"
    print(f"{what} of {s['prompt']} with {s['checkpoint']} (step {s['step']})")
    if s.get("prompt_note"):
        print(s["prompt_note"])
    line = f"prompt: {s['prompt_notes']} notes, {s['prompt_tokens']} tokens"
    if "target_notes" in s:
        line += f"; original target: {s['target_notes']} notes"
    print(line)
    for k, smp in enumerate(s["samples"]):
        end = "stopped at <EOGENAI>" if smp["stopped"] else "token budget reached"
        print(f"sample {k}: {smp['tokens']} tokens -> {smp['notes']} notes, "
              f"{smp['seconds']:.1f} s of music ({end})")
    print(f"decoding: {s['tokens_per_second']:.1f} tokens/s (compile {s['compile_seconds']:.1f} s)")
    print("wrote " + ", ".join(sorted({str(Path(p).parent) for p in s["files"].values()})) + ": "
          + ", ".join(Path(p).name for p in s["files"].values()))


def main(argv: Sequence[str] | None = None, prog: str = "python -m piano_gpt_jax.generate",
         sampler=jax_sampler, load_checkpoint=None) -> int:
    """The CLI; converters.torch_generate reuses it with the PyTorch sampler and loader."""
    args = build_parser(prog).parse_args(argv)
    try:
        summary = run(args, sampler=sampler, load_checkpoint=load_checkpoint)
    except GenerateError as e:
        raise SystemExit(f"error: {e}") from None
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
