"""The model card (README.md) of a model folder, written from the run that made the model.

Every figure comes from the run's own records, never retyped: validation losses per split and
PIANO metrics from its `metrics.jsonl` (the evaluation at the exported step; `evaluate`'s newest
rows for that step), steps and tokens from the checkpoint's metadata, the command from its
config (the keys that differ from the defaults). Without a run directory (a bare `.pt`), the
losses the checkpoint itself carries are used and the card says so.
"""

from __future__ import annotations

import importlib.util
import math
import shlex
from pathlib import Path
from typing import Any

from piano_gpt_jax import config as config_lib
from piano_gpt_jax.checkpoints.record import CheckpointRecord
from piano_gpt_jax.model import count_params
from piano_gpt_jax.run_log import METRICS_FILE, read_events

F1_KEYS = ("confusion metrics/weighted_f1", "confusion metrics/weighted_recall",
           "confusion metrics/weighted_precision")


def validation_losses(events: list[dict], step: int) -> dict[str, float]:
    """{split: loss} of the evaluation logged at `step` (empty when none was)."""
    at = [e for e in events if e.get("event") == "eval" and e.get("step") == step]
    if not at:
        return {}
    return {k.split("/", 1)[1]: float(v) for k, v in at[-1].items()
            if k.startswith("val_loss/") and isinstance(v, (int, float)) and math.isfinite(v)}


def piano_metrics(events: list[dict], step: int) -> list[dict]:
    """`evaluate`'s rows (split, task, metrics) for `step`: the newest evaluation of it."""
    rows = [e for e in events if e.get("event") == "task_eval" and e.get("step") == step]
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[(row.get("split"), row.get("task"))] = row
    return list(latest.values())


RECIPE = Path(__file__).resolve().parents[1] / "configs" / "piano.py"


def _recipe_values() -> dict[str, Any]:
    """Every key of configs/piano.py's default recipe (in a checkout), else the defaults."""
    if RECIPE.is_file():
        spec = importlib.util.spec_from_file_location("_piano_recipe", RECIPE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return config_lib.flatten(config_lib.complete(module.get_config(None).to_dict()))
    return config_lib.flatten(config_lib.complete({}))


def training_command(run_config: dict | None) -> str:
    """The trainer command: the recipe plus every key in which the run differed from it."""
    if not run_config:
        return "(not recorded: this checkpoint carries no run config)"
    defaults = _recipe_values()
    ours = config_lib.flatten(config_lib.complete(run_config))
    implied = {"lr.lr_decay_iters": ours.get("optimizer.max_iters")}  # its default follows
    overrides = [f"--config.{k}={_cli(v)}" for k, v in sorted(ours.items())
                 if k in defaults and defaults[k] != v and implied.get(k, object()) != v]
    return " \\\n    ".join(["python -m piano_gpt_jax.train --config configs/piano.py",
                             *overrides])


def _cli(value: Any) -> str:
    return shlex.quote(str(value)) if not isinstance(value, bool) else str(value)


def write_card(record: CheckpointRecord, run_dir: str | Path | None, folder_name: str) -> str:
    """The README.md text."""
    cfg, meta = record.model_config, record.meta
    events = read_events(Path(run_dir) / METRICS_FILE) if run_dir else []
    losses = validation_losses(events, meta.step)
    source = f"`{Path(run_dir) / METRICS_FILE}`" if losses else "the checkpoint's own metadata"
    losses = losses or dict(meta.val_losses or {})
    conf = config_lib.complete(meta.config or {})
    data = conf.get("dataset", {})
    datasets = [data.get("base_dataset_name")] + list(data.get("extra_datasets") or [])
    n_params = count_params(record.params, include_position=False) / 1e6
    lines = [
        "---", "library_name: piano-gpt-jax", "tags: [music, midi, piano, gpt, safetensors]",
        "---", "",
        f"# {meta.run_name or folder_name}: a piano GPT (~{n_params:.1f}M parameters)", "",
        "A decoder-only transformer over piano performances tokenized by the exponential-time "
        "tokenizer of piano-gpt, trained with [piano-gpt-jax](https://github.com/) (JAX/Flax). "
        "The weights use piano-gpt's `GPT` state-dict names, so piano-gpt's PyTorch model code "
        "loads them as they are.", "",
        "| | |", "|---|---|",
        f"| model | {cfg.n_layer} layers x {cfg.n_embd}, {cfg.n_head} heads, context "
        f"{cfg.context_size}, vocabulary {cfg.vocab_size}"
        + (", music-time embedding" if cfg.use_time_embedding else "") + " |",
        f"| data | {', '.join(f'`{d}`' for d in datasets if d)} |",
        f"| stage | {conf.get('stage')}" + (f", tasks `{conf.get('tasks')}`"
                                           if conf.get("stage") == "piano_task" else "") + " |",
        f"| training | step {meta.step:,} of {conf.get('optimizer', {}).get('max_iters')}, "
        f"{meta.total_tokens:,} tokens |",
        f"| prompt layout | {meta.prompt_layout or 'n/a'} |", "",
    ]
    if losses:
        lines += [f"## Validation loss at step {meta.step:,}", "",
                  f"From {source}.", "", "| split | loss |", "|---|---|",
                  *[f"| {k} | {v:.4f} |" for k, v in losses.items()], ""]
    rows = piano_metrics(events, meta.step)
    if rows:
        lines += [f"## PIANO metrics at step {meta.step:,} (`python -m piano_gpt_jax.evaluate`)",
                  "", "| split | task | weighted F1 | recall | precision | examples |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r.get('split')} | {r.get('task')} | "
                  + " | ".join(_fmt(r.get(k)) for k in F1_KEYS)
                  + f" | {int(r.get('n_examples') or 0)} |" for r in rows]
        lines.append("")
    lines += ["## How it was trained", "", "```bash", training_command(meta.config), "```", "",
              "## How to load it", "", "JAX (piano-gpt-jax):", "", "```python",
              "from piano_gpt_jax.checkpoints import load_any_checkpoint",
              f'record = load_any_checkpoint("{folder_name}")  # params, config, tokenizer',
              "```", "", "```bash",
              f"python -m piano_gpt_jax.generate --checkpoint {folder_name} --prompt-midi "
              "prompt.mid --out out/", "```", "",
              "PyTorch, with piano-gpt's model code (no pickle is loaded):", "", "```python",
              "import json", "from omegaconf import OmegaConf",
              "from safetensors.torch import load_file", "from gpt2.model import GPT",
              "", f'config = json.load(open("{folder_name}/config.json"))',
              'model = GPT(OmegaConf.create(config), config["vocab_size"], '
              'config["pad_token_id"])',
              f'model.load_state_dict(load_file("{folder_name}/model.safetensors"), '
              "strict=True)", "```", "",
              "`tokenizer.json` is the tokenizer description "
              "(`ExponentialTimeTokenizer.from_dict`).", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "n/a"
