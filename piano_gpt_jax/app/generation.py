"""One click of Generate: the prompt as the model was trained to read it, the cached jitted
sampler, and the outputs (MIDI, token ids) written to a fresh folder of the app's own.

Prompt building is `generate.prompt_for_task` / `generate.prompt_for_continuation`, and prompt
fitting `generate.fit_prompt`: the same code the CLI uses, so the app and `python -m
piano_gpt_jax.generate` give the same tokens for the same input, and a prompt longer than the
context keeps its first notes (with its task tokens), never a silently cut-off front.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from piano_gpt_jax import piano_metrics, sampling
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.app.models import LoadedModel
from piano_gpt_jax.app.prompts import Prompt, frame
from piano_gpt_jax.evaluate import crop_to_target
from piano_gpt_jax.generate import (
    GenerateError,
    fit_prompt,
    prompt_for_continuation,
    prompt_for_task,
    resolve_task,
)
from piano_gpt_jax.music import layouts
from piano_gpt_jax.music.midi import write_midi
from piano_gpt_jax.music.tasks import resolve_tasks
from piano_gpt_jax.sampling_settings import SamplingSettings, user_settings

CONTINUATION = "continuation"


@dataclass(frozen=True)
class Request:
    """One click: the prompt's task and tokens, how many samples, and the sampler's settings
    (passed whole to the sampler, with sampling_settings.py's defaults)."""

    task: str = CONTINUATION  # a PIANO task name such as high_notes_masking-x5, or continuation
    dataset_token: str = "<PIANO_FOR_AI>"
    composer_token: str = "<UNKNOWN_COMPOSER>"
    num_samples: int = 1
    sampling: SamplingSettings = field(default_factory=SamplingSettings)

    @classmethod
    def make(cls, **values) -> Request:
        """A request from flat values (the page's controls): the sampling settings' names go to
        `sampling`; AppError for a value the sampler refuses."""
        names = {f.name for f in dataclasses.fields(SamplingSettings)}
        try:
            draws = SamplingSettings(**{k: v for k, v in values.items() if k in names})
        except ValueError as e:
            raise AppError(str(e)) from None
        return cls(**{k: v for k, v in values.items() if k not in names}, sampling=draws)

    def with_sampling(self, **changes) -> Request:
        """The same request with other sampling settings (a grid cell's seed, say)."""
        return dataclasses.replace(self, sampling=self.sampling.replace(**changes))

    def as_record(self) -> dict:
        """Flat, as tokens.json, the History and the blind judgements store a request."""
        own = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name != "sampling"}
        return {**own, **{f.name: getattr(self.sampling, f.name) for f in user_settings()}}


@dataclass
class Sample:
    ids: np.ndarray  # new token ids (with <EOGENAI> when the model stopped)
    notes: pd.DataFrame  # decoded, on the prompt's clock
    stopped: bool

    @property
    def seconds(self) -> float:
        return float(self.notes["end"].max() - self.notes["start"].min()) if len(self.notes) \
            else 0.0


@dataclass(frozen=True)
class BuiltPrompt:
    """What the model is given: ids (never longer than its context), the notes they hold."""

    ids: np.ndarray
    shown: pd.DataFrame  # the notes in the prompt (a task's source notes)
    target: pd.DataFrame | None  # the notes a PIANO task removed
    offset: float  # seconds after which new notes start (continuation)
    fit_note: str | None  # how the notes were cut to fit the context, if they were
    context: int

    @property
    def sees(self) -> str:
        return f"prompt {len(self.ids)} tokens of context {self.context}"


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
    fit_note: str | None = None
    context: int = 0

    @property
    def n_new_tokens(self) -> int:
        return int(sum(len(s.ids) for s in self.samples))


def task_names() -> list[str]:
    """Every task of the reference's default set, in its order."""
    return [t.task_name for t in resolve_tasks("piano_default")]


def supported_tasks(model: LoadedModel) -> list[str]:
    """The tasks this checkpoint was trained on (its run's `tasks`, whatever the set, custom
    parameters included; the default set for a checkpoint that does not say) whose prompt
    tokens its vocabulary holds."""
    if not model.has_tokens([layouts.GENAI]):
        return []
    candidates = model.trained_tasks or tuple(task_names())
    return [n for n in candidates if model.has_tokens(list(resolve_task(n).prefix_tokens))]


def build_prompt(model: LoadedModel, prompt: Prompt, request: Request) -> BuiltPrompt:
    """The prompt exactly as the model will see it; AppError when it cannot be built."""
    tok = model.tokenizer
    context = model.model_config.context_size
    try:
        if request.task != CONTINUATION:
            task = resolve_task(request.task)
            if len(prompt.notes) == 0:
                raise AppError(f"task {request.task} splits prompt notes into what the model "
                               "sees and what it must write: choose a prompt with notes, or "
                               "'continuation'")
            build = lambda n: prompt_for_task(tok, task, n, request.dataset_token,
                                              request.composer_token, model.layout)
        else:
            build = lambda n: (prompt_for_continuation(tok, n, request.dataset_token,
                                                       request.composer_token), n, None)
        (ids, shown, target), fit_note = fit_prompt(build, prompt.notes, context,
                                                    explicit=False)
    except GenerateError as e:
        raise AppError(str(e)) from None
    if len(ids) == 0:
        raise AppError("this checkpoint's vocabulary has no dataset or composer tokens to start "
                       "from; give it a prompt with notes")
    offset = 0.0
    if request.task == CONTINUATION:
        # New notes follow the prompt's last event: the seconds its time tokens cover.
        offset = int(model.tables.time_increment[ids].sum()) * tok.time_unit
    return BuiltPrompt(ids, frame(shown), None if target is None else frame(target), offset,
                       fit_note, context)


def check_request(request: Request) -> None:
    """AppError for a request the page should not send (its sampling settings checked
    themselves when they were made)."""
    if not 1 <= request.num_samples <= 16:
        raise AppError("number of samples must be between 1 and 16")


def run_request(model: LoadedModel, prompt: Prompt, request: Request,
             progress: Callable[[int, int], None] | None = None) -> Generation:
    """Sample `request.num_samples` continuations in one batch with the cached jitted sampler;
    `progress(tokens, max_new_tokens)` as in sampling.sample."""
    check_request(request)
    built = build_prompt(model, prompt, request)
    result = sampling.sample(model.model_config, model.params,
                             [built.ids] * request.num_samples, request.sampling, model.tables,
                             progress=progress)
    samples = []
    for k, new in enumerate(result.new_tokens):
        notes = frame(model.tokenizer.decode(new))
        notes = notes.assign(start=notes["start"] + built.offset,
                             end=notes["end"] + built.offset)
        samples.append(Sample(np.asarray(new), notes, bool(result.stopped[k])))
    return Generation(request, built.shown, built.target, built.ids, samples,
                      result.tokens_per_second, result.seconds, result.compile_seconds,
                      fit_note=built.fit_note, context=built.context)


def scores(gen: Generation, k: int) -> dict[str, float] | None:
    """PIANO metrics of sample k against the notes the task removed (None for a continuation):
    the numbers `evaluate` reports, computed the same way (generation cropped to the target)."""
    if gen.target is None:
        return None
    generated = crop_to_target(gen.samples[k].notes, gen.target)
    return _metrics().calculate_flat(gen.target, generated)


@functools.lru_cache(maxsize=1)
def _metrics() -> piano_metrics.MetricsManager:
    return piano_metrics.MetricsManager.load_default()


def listening_window(gen: Generation, k: int, seconds: float | None,
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(prompt notes still sounding in the last `seconds` before sample k's new notes, the new
    notes), shifted so the window starts at 0. None: the whole prompt; 0: the new notes alone.
    What to listen to for the new notes: the full prompt can be minutes long."""
    new = gen.samples[k].notes
    begin = float(new["start"].min()) if len(new) else duration_end(gen.prompt)
    if seconds is None:
        before, t0 = gen.prompt, 0.0
    else:
        before = gen.prompt[gen.prompt["end"] > begin - seconds] if seconds > 0 \
            else gen.prompt[:0]
        t0 = max(begin - seconds, 0.0)
    shift = lambda df: frame(df).assign(start=lambda d: (d["start"] - t0).clip(lower=0.0),
                                        end=lambda d: d["end"] - t0)
    return shift(before), shift(new)


def lead_in(gen: Generation, k: int, seconds: float | None) -> pd.DataFrame:
    """listening_window as one piece (what the player plays)."""
    before, new = listening_window(gen, k, seconds)
    return frame(pd.concat([before, new], ignore_index=True)) if len(new) else before


def duration_end(notes: pd.DataFrame) -> float:
    return float(notes["end"].max()) if len(notes) else 0.0


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
    tokens = {"checkpoint": checkpoint, "request": gen.request.as_record(),
              "prompt_ids": [int(t) for t in gen.prompt_ids],
              "samples": [{"ids": [int(t) for t in s.ids], "notes": int(len(s.notes)),
                           "stopped": s.stopped} for s in gen.samples],
              "tokens_per_second": gen.tokens_per_second
              if np.isfinite(gen.tokens_per_second) else None}
    files["tokens"] = directory / "tokens.json"
    files["tokens"].write_text(json.dumps(tokens, indent=1))
    gen.files = files
    return files
