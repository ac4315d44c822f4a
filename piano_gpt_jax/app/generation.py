"""One click of Generate: the prompt as the model was trained to read it, the cached jitted
sampler, and the outputs (MIDI, token ids) written to a fresh folder of the app's own.

Prompt building is `generate.task_prompt` / `generate.continuation_prompt`, the same code the CLI
uses, so the app and `python -m piano_gpt_jax.generate` give the same tokens for the same input.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from piano_gpt_jax import sampling
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.app.models import LoadedModel
from piano_gpt_jax.app.prompts import Prompt, frame
from piano_gpt_jax.generate import GenerateError, continuation_prompt, resolve_task, task_prompt
from piano_gpt_jax.music.midi import write_midi
from piano_gpt_jax.music.tasks import resolve_tasks
from piano_gpt_jax.sampling import SamplingSettings

CONTINUATION = "continuation"


@dataclass(frozen=True)
class Request:
    task: str = CONTINUATION  # a PIANO task name such as high_notes_masking-x5, or continuation
    dataset_token: str = "<PIANO_FOR_AI>"
    composer_token: str = "<UNKNOWN_COMPOSER>"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    num_samples: int = 1
    max_new_tokens: int = 256


@dataclass
class Sample:
    ids: np.ndarray  # new token ids (with <EOGENAI> when the model stopped)
    notes: pd.DataFrame  # decoded, on the prompt's clock
    stopped: bool

    @property
    def seconds(self) -> float:
        return float(self.notes["end"].max() - self.notes["start"].min()) if len(self.notes) \
            else 0.0


@dataclass
class Generation:
    request: Request
    prompt: pd.DataFrame  # what the model was shown (the task's source for a PIANO task)
    target: pd.DataFrame | None  # the notes a PIANO task removed, for comparison
    prompt_ids: np.ndarray
    samples: list[Sample]
    tokens_per_second: float
    decode_seconds: float
    compile_seconds: float
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def n_new_tokens(self) -> int:
        return int(sum(len(s.ids) for s in self.samples))


def task_names() -> list[str]:
    """Every task of the reference's default set, in its order."""
    return [t.task_name for t in resolve_tasks("piano_default")]


def supported_tasks(model: LoadedModel) -> list[str]:
    """Tasks whose prompt tokens this checkpoint's vocabulary holds (it was trained on them)."""
    if not model.has_tokens(["<GENAI>"]):
        return []
    return [n for n in task_names() if model.has_tokens(list(resolve_task(n).prefix_tokens))]


def build_prompt(model: LoadedModel, prompt: Prompt, request: Request,
                 ) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame | None, float]:
    """(prompt ids, shown prompt notes, removed target or None, time offset of new notes)."""
    tok = model.tokenizer
    try:
        if request.task != CONTINUATION:
            task = resolve_task(request.task)
            if len(prompt.notes) == 0:
                raise AppError(f"task {request.task} splits prompt notes into what the model "
                               "sees and what it must write: choose a prompt with notes, or "
                               "'continuation'")
            ids, source, target = task_prompt(tok, task, prompt.notes, request.dataset_token,
                                              request.composer_token, model.layout)
            return ids, frame(source), frame(target), 0.0
        ids = continuation_prompt(tok, prompt.notes, request.dataset_token,
                                  request.composer_token)
    except GenerateError as e:
        raise AppError(str(e)) from None
    if len(ids) == 0:
        raise AppError("this checkpoint's vocabulary has no dataset or composer tokens to start "
                       "from; give it a prompt with notes")
    # New notes follow the prompt's last event: the seconds its time tokens cover.
    offset = int(model.tables.time_increment[ids].sum()) * tok.time_unit
    return ids, prompt.notes, None, offset


def check_request(request: Request) -> SamplingSettings:
    """The sampler's settings for a request (the page's widgets are flat fields); AppError if the
    request asks for something the sampler refuses."""
    if not 1 <= request.num_samples <= 16:
        raise AppError("number of samples must be between 1 and 16")
    try:
        return SamplingSettings(temperature=request.temperature, top_k=request.top_k,
                                top_p=request.top_p, min_p=request.min_p,
                                max_new_tokens=request.max_new_tokens, seed=request.seed)
    except ValueError as e:
        raise AppError(str(e)) from None


def generate(model: LoadedModel, prompt: Prompt, request: Request) -> Generation:
    """Sample `request.num_samples` continuations in one batch with the cached jitted sampler."""
    settings = check_request(request)
    ids, shown, target, offset = build_prompt(model, prompt, request)
    result = sampling.generate(model.model_config, model.params, [ids] * request.num_samples,
                               settings, model.tables)
    samples = []
    for k, new in enumerate(result.new_tokens):
        notes = frame(model.tokenizer.decode(new))
        notes = notes.assign(start=notes["start"] + offset, end=notes["end"] + offset)
        samples.append(Sample(np.asarray(new), notes, bool(result.stopped[k])))
    return Generation(request, shown, target, ids, samples, result.tokens_per_second,
                      result.seconds, result.compile_seconds)


def combined(gen: Generation, k: int) -> pd.DataFrame:
    """Prompt and sample k as one piece (what the listener hears)."""
    new = gen.samples[k].notes
    return frame(pd.concat([gen.prompt, new], ignore_index=True)) if len(new) else gen.prompt


def write_outputs(gen: Generation, directory: Path, checkpoint: str) -> dict[str, Path]:
    """prompt.mid, target.mid, generation_<k>.mid, combined_<k>.mid and tokens.json (prompt and
    new token ids, settings) into `directory`, which the caller created fresh."""
    files = {"prompt": write_midi(gen.prompt, directory / "prompt.mid")}
    if gen.target is not None:
        files["target"] = write_midi(gen.target, directory / "target.mid")
    for k, s in enumerate(gen.samples):
        files[f"generation_{k}"] = write_midi(s.notes, directory / f"generation_{k}.mid")
        files[f"combined_{k}"] = write_midi(combined(gen, k), directory / f"combined_{k}.mid")
    tokens = {"checkpoint": checkpoint, "request": dataclasses.asdict(gen.request),
              "prompt_ids": [int(t) for t in gen.prompt_ids],
              "samples": [{"ids": [int(t) for t in s.ids], "notes": int(len(s.notes)),
                           "stopped": s.stopped} for s in gen.samples],
              "tokens_per_second": gen.tokens_per_second
              if np.isfinite(gen.tokens_per_second) else None}
    files["tokens"] = directory / "tokens.json"
    files["tokens"].write_text(json.dumps(tokens, indent=1))
    gen.files = files
    return files
