"""Reading run directories for the Runs page: `metrics.jsonl` events, the run's config and its
exports.

Everything is read defensively: a run that is still being written (a torn last line), a run
without checkpoints, or a config in an unexpected shape shows what is there and says what is not.
The checkpoint meta file is read as plain JSON (`<run>/{checkpoints,best}/<step>/meta/metadata`)
instead of restoring a checkpoint, so listing runs never loads parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from piano_gpt_jax.checkpoints.errors import CheckpointError
from piano_gpt_jax.checkpoints.record import RunMeta, finite_or_none
from piano_gpt_jax.checkpoints.run_dir import holds_checkpoints, newest_meta
from piano_gpt_jax.config import ConfigError, build_train_config, flatten, nest
from piano_gpt_jax.optim import make_schedule
from piano_gpt_jax.run_log import METRICS_FILE, read_log

EXPORT_SUFFIXES = (".pt",)


@dataclass
class Run:
    path: Path
    events: list[dict] = field(default_factory=list)
    torn_lines: int = 0  # lines that are not JSON (a run killed mid-write)
    config: dict | None = None
    config_source: str | None = None
    exports: list[Path] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def of_kind(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("event") == kind]


def is_run(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() or holds_checkpoints(path)


def find_runs(root: Path) -> list[Path]:
    """`root` itself when it is a run, and its sub-directories that are runs."""
    if not root.is_dir():
        return []
    found = [root] if is_run(root) else []
    found += sorted(p for p in root.iterdir()
                    if p.is_dir() and not p.name.startswith(".") and is_run(p))
    return found


def read_metrics(path: Path) -> tuple[list[dict], int]:
    """(events in file order, number of unreadable lines): run_log.read_log."""
    return read_log(path)


def latest_meta(run_dir: Path) -> tuple[dict | None, Path | None]:
    """The meta item of the newest checkpoint step and its file (checkpoints/run_dir.py reads
    it, through orbax, as every tool does)."""
    meta, step_dir = newest_meta(run_dir)
    return meta, (step_dir / "meta" if step_dir is not None else None)


def find_config(run_dir: Path) -> tuple[dict | None, str | None]:
    """(run config, where it came from): the newest checkpoint's config in our vocabulary
    (RunMeta reads every schema version, piano-gpt's translated), else a JSON file in the run
    directory holding an object."""
    meta, meta_file = latest_meta(run_dir)
    if meta is not None:
        try:
            run_meta = RunMeta.from_json(meta.get("metadata"))
        except CheckpointError:
            run_meta = None
        config = run_meta and (run_meta.config or run_meta.reference_run_config)
        if config:
            return config, str(meta_file)
    for candidate in sorted(run_dir.glob("*.json")):
        try:
            value = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(value, dict) and value:
            return value, str(candidate)
    return None, None


def load_run(path: Path) -> Run:
    path = Path(path)
    events, torn = read_metrics(path / METRICS_FILE)
    config, source = find_config(path)
    exports = sorted(p for p in path.iterdir() if p.suffix in EXPORT_SUFFIXES and p.is_file()) \
        if path.is_dir() else []
    return Run(path, events, torn, config, source, exports)


def config_value(config: dict | None, dotted: str) -> Any:
    """A value from a flat ("data.context_size", ours) or nested ({"data": {...}}) config."""
    if not config:
        return None
    if dotted in config:
        return config[dotted]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def flat_config(config: dict) -> dict[str, Any]:
    """Nested configs (ours, the reference's Hydra run_config) as dotted keys."""
    return flatten(config)


def _finite(value: Any) -> bool:
    return finite_or_none(value) is not None


def loss_curves(runs: list[Run]) -> pd.DataFrame:
    """Long table run, curve, step, tokens, loss: the train loss of train events and one
    validation curve per eval split (val_loss/<split>) of eval events."""
    rows = []
    for run in runs:
        for e in run.events:
            kind = e.get("event")
            if kind == "train" and _finite(e.get("train_loss")):
                rows.append((run.name, "train", e["step"], e.get("tokens"), e["train_loss"]))
            elif kind == "eval":
                for key, value in e.items():
                    if key.startswith("val_loss/") and _finite(value):
                        rows.append((run.name, f"val {key[9:]}", e["step"], e.get("tokens"),
                                     value))
    df = pd.DataFrame(rows, columns=["run", "curve", "step", "tokens", "loss"])
    df["tokens"] = pd.to_numeric(df["tokens"], errors="coerce")
    return df


def train_series(runs: list[Run], key: str) -> pd.DataFrame:
    """Long table run, step, tokens, <key> of the train events (lr, tokens_per_s, ...)."""
    rows = [(run.name, e["step"], e.get("tokens"), e[key]) for run in runs
            for e in run.of_kind("train") if _finite(e.get(key))]
    df = pd.DataFrame(rows, columns=["run", "step", "tokens", key])
    df["tokens"] = pd.to_numeric(df["tokens"], errors="coerce")
    return df


MAX_LR_POINTS = 400


def lr_series(runs: list[Run]) -> pd.DataFrame:
    """Long table run, step, tokens, lr of every run from update 1: the schedule of the run's
    own config (optim.lr_at, what the trainer runs), so warmup shows even when the first logged
    step is past it; the logged values where the config cannot be read."""
    pairs = [(run, _schedule(run)) for run in runs]
    frames = [f for _, f in pairs if f is not None]
    logged = train_series([run for run, f in pairs if f is None], "lr")
    return pd.concat([*frames, logged], ignore_index=True) if frames else logged


def _schedule(run: Run) -> pd.DataFrame | None:
    if not run.config or not run.events:
        return None
    try:
        optim = build_train_config(nest(flat_config(run.config))).optim
    except (ConfigError, ValueError, TypeError, KeyError, AttributeError):
        return None
    last = int(max(e["step"] for e in run.events))
    if last < 1:
        return None
    steps = np.unique(np.linspace(1, last, min(last, MAX_LR_POINTS)).round().astype(int))
    lr = np.asarray(make_schedule(optim)(steps - 1), np.float64)
    per_step = [e["tokens"] / e["step"] for e in run.of_kind("train")
                if e.get("step") and _finite(e.get("tokens"))]
    tokens = steps * per_step[-1] if per_step else np.full(len(steps), np.nan)
    return pd.DataFrame({"run": run.name, "step": steps, "tokens": tokens, "lr": lr})


def latest_eval(run: Run) -> pd.DataFrame | None:
    """Loss per eval split at the last evaluation, with its step."""
    evals = run.of_kind("eval")
    if not evals:
        return None
    last = evals[-1]
    rows = [(key[9:], value) for key, value in last.items()
            if key.startswith("val_loss/") and _finite(value)]
    if _finite(last.get("train_loss")):
        rows.append(("train (mean since previous eval)", last["train_loss"]))
    df = pd.DataFrame(rows, columns=["split", "loss"]).set_index("split")
    df.attrs["step"] = last["step"]
    return df


def latest_task_eval(run: Run) -> pd.DataFrame | None:
    """PIANO-task metrics of the newest `evaluate` run logged here (split x task rows)."""
    rows = run.of_kind("task_eval")
    if not rows:
        return None
    step = max(r["step"] for r in rows)
    keep = [r for r in rows if r["step"] == step]
    df = pd.DataFrame(keep).drop(columns=["event", "checkpoint"], errors="ignore")
    return df.set_index(["split", "task"]) if {"split", "task"} <= set(df.columns) else df
