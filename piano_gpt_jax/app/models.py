"""Checkpoints for the Generate page: which ones exist under the runs folder, and loading one into
everything sampling needs (params, tokenizer, token tables, prompt layout).

Loading goes through `checkpoints.load_any_checkpoint` only, so `.pt` files are read by the safe
loader (a malicious pickle is refused, never run) and every failure becomes one readable message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from piano_gpt_jax import generate, sampling
from piano_gpt_jax.app.errors import AppError
from piano_gpt_jax.checkpoints import (
    BEST_SUBDIR,
    CHECKPOINTS_SUBDIR,
    CheckpointError,
    holds_checkpoints,
    is_model_folder,
    load_any_checkpoint,
)
from piano_gpt_jax.music import layouts
from piano_gpt_jax.music.tasks import resolve_tasks

CHECKPOINT_SUBDIRS = (CHECKPOINTS_SUBDIR, BEST_SUBDIR)


@dataclass(frozen=True)
class LoadedModel:
    path: str
    model_config: Any  # piano_gpt_jax.model.ModelConfig
    params: Any
    tokenizer: Any  # ExponentialTimeTokenizer
    tables: Any  # sampling.TokenTables
    layout: str  # "annotated" or "plain" (music/layouts.py): this vocabulary's task prompts
    step: int | None
    notes_per_record: int | None = None  # of the run that trained it: the prompts it knows
    trained_tasks: tuple[str, ...] | None = None  # its run's PIANO tasks, when it says

    def has_tokens(self, tokens: list[str] | tuple[str, ...]) -> bool:
        return all(t in self.tokenizer.token_to_id for t in tokens)

    @property
    def summary(self) -> str:
        c = self.model_config
        return (f"{c.n_layer} layers x {c.n_embd}, {c.n_head} heads, context {c.context_size}, "
                f"vocab {c.vocab_size}, step {self.step}, {self.layout} prompt layout"
                + (", music-time embedding" if c.use_time_embedding else ""))


def is_run_dir(path: Path) -> bool:
    return holds_checkpoints(path)


def list_checkpoints(runs_root: Path) -> list[Path]:
    """Run directories, `.pt` files and model folders (safetensors) directly under `runs_root`
    and one level below (the trainer's exports sit in their run directory)."""
    if not runs_root.is_dir():
        return []
    found: list[Path] = []
    for run in sorted(p for p in runs_root.iterdir() if not p.name.startswith(".")):
        if run.is_dir():
            if is_run_dir(run) or is_model_folder(run):
                found.append(run)
            found += sorted(p for p in run.glob("*.pt") if p.is_file())
            found += sorted(p for p in run.iterdir() if is_model_folder(p))  # RUN/final/
        elif run.suffix == ".pt" and run.is_file():
            found.append(run)
    return found


def load_model(path: str | Path) -> LoadedModel:
    """Everything sampling needs from a run directory or a `.pt`; raises AppError."""
    path = Path(str(path).strip()).expanduser()
    if not str(path) or not path.exists():
        raise AppError(f"checkpoint {str(path)!r} does not exist: give a run directory (with "
                       "checkpoints/ or best/) or a .pt file")
    try:
        record = load_any_checkpoint(path)
    except Exception as e:  # noqa: BLE001 — orbax/torch raise many types; all mean "unusable"
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        message = message.removeprefix(f"{path}: ")  # said once, in front
        raise AppError(f"cannot load checkpoint {path}: {message[:500]}") from None
    try:
        tokenizer = record.tokenizer(str(path))
    except CheckpointError as e:
        raise AppError(str(e)) from None
    return LoadedModel(str(path), record.model_config, record.params, tokenizer,
                       sampling.token_tables(tokenizer),
                       layouts.checkpoint_layout(record.meta.prompt_layout, tokenizer.token_to_id),
                       record.step,
                       generate.trained_notes_per_record(record.meta), _trained_tasks(record))


def _trained_tasks(record) -> tuple[str, ...] | None:
    spec = (record.meta.config or {}).get("tasks")
    if not spec:
        return None
    try:
        return tuple(t.task_name for t in resolve_tasks(spec))
    except (ValueError, TypeError, KeyError):
        return None


def cache_key(path: str | Path) -> tuple[str, float]:
    """(resolved path, newest mtime): a checkpoint re-written in place is loaded again."""
    p = Path(str(path).strip()).expanduser()
    try:
        resolved = p.resolve()
        mtimes = [resolved.stat().st_mtime]
        for sub in CHECKPOINT_SUBDIRS:
            if (resolved / sub).is_dir():
                mtimes += [c.stat().st_mtime for c in (resolved / sub).iterdir()]
        return str(resolved), max(mtimes)
    except OSError:
        return str(p), 0.0
