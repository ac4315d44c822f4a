"""Writing a run's checkpoints and its PyTorch exports, with failures a user can act on.

A failed write becomes one line naming the last complete checkpoint, from which the same
command resumes; exports happen after training, from checkpoints that are already complete, so
a failed export never costs a step of training.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib.util
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from piano_gpt_jax import model_card
from piano_gpt_jax.checkpoints import (
    AdamState,
    CheckpointError,
    CheckpointRecord,
    RunMeta,
    TrainCheckpointer,
)
from piano_gpt_jax.checkpoints.model_folder import save_model_folder
from piano_gpt_jax.checkpoints.torch_format import save_torch_checkpoint
from piano_gpt_jax.config import TrainConfig
from piano_gpt_jax.model import ModelConfig
from piano_gpt_jax.optim import AdamWSettings, adam_state, schedule_lr
from piano_gpt_jax.run.errors import CheckpointWriteError, UsageError
from piano_gpt_jax.run_log import RunLog
from piano_gpt_jax.sharding import to_host


def checkpoint_io(write: Callable[[], object], step: int, ckpt: TrainCheckpointer,
                  out_dir: Path) -> None:
    """Run a checkpoint write (or the wait for one); a failure becomes one line that says what
    is still safe: the last complete checkpoint, from which the same command resumes."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 — orbax/tensorstore raise many types
        text = str(e)
        reason = ("no space left on the device" if "No space left" in text
                  or getattr(e, "errno", None) == errno.ENOSPC
                  else (text.strip().splitlines() or [type(e).__name__])[0][:200])
        try:
            ckpt.wait()  # an earlier save may still be committing
        except Exception:  # noqa: BLE001
            pass
        try:
            ckpt.reload()
            safe = ckpt.latest_step()
        except Exception:  # noqa: BLE001
            safe = None
        resume = (f"checkpoint {safe} is complete: run the same command to resume from it once "
                  "the problem is fixed" if safe is not None else
                  "no checkpoint is complete yet: the same command starts the run over once the "
                  "problem is fixed")
        raise CheckpointWriteError(f"could not write checkpoint {step} in {out_dir} ({reason}); "
                                   f"{resume}.") from None


def close_quietly(ckpt: TrainCheckpointer) -> None:
    try:
        ckpt.wait()
    except Exception:  # noqa: BLE001 — a failed write was already reported by checkpoint_io
        pass
    ckpt.close()


def export_models(ckpt: TrainCheckpointer, state: dict, model_config: ModelConfig,
                  cfg: TrainConfig, out_dir: Path, run_log: RunLog, write: bool = True) -> None:
    """final.pt (the latest checkpoint) and best.pt with their optimizer states
    (checkpoint.export_torch), and final/ and best/ model folders (checkpoint.export_safetensors).
    Every process takes part (restoring and gathering sharded arrays are collective); `write`
    says whether this one writes the files (process 0)."""
    torch_wanted = cfg.checkpoint.export_torch
    if torch_wanted and importlib.util.find_spec("torch") is None:  # an optional dependency
        run_log.note("skipping the .pt exports: torch is not installed (pip install "
                     "'piano-gpt-jax[torch]' to enable them)")
        torch_wanted = False
    if not (torch_wanted or cfg.checkpoint.export_safetensors):
        return
    written = []
    steps = {"final": ckpt.latest_step(), "best": ckpt.best_step()}
    for name, step in steps.items():
        if step is None:
            continue
        current = state if step == steps["final"] else None  # else restore that step
        try:
            record = _exportable(ckpt, step, state, current, model_config, cfg)
            if not write:
                continue
            if torch_wanted:
                written.append(save_torch_checkpoint(out_dir / f"{name}.pt", record))
            if cfg.checkpoint.export_safetensors:
                card = model_card.write_card(record, out_dir, name)
                written.append(save_model_folder(record, out_dir / name, card, overwrite=True))
        except (CheckpointError, ValueError, OSError) as e:
            raise UsageError(
                f"training finished and its checkpoints are complete, but exporting {name} "
                f"failed ({e}); export by hand with python -m converters.jax_to_torch "
                f"{out_dir} OUT.pt or python -m converters.export_hf {out_dir} OUT_DIR") from None
    if written:
        run_log.note(f"exported {' and '.join(map(str, written))}"
                     + (" (PyTorch reference layout, with optimizer state)" if torch_wanted
                        else ""))


def _exportable(ckpt: TrainCheckpointer, step: int, state_like: dict, state: dict | None,
                model_config: ModelConfig, cfg: TrainConfig) -> CheckpointRecord:
    """The CheckpointRecord of training checkpoint `step` (from `state` when given, else
    restored), host-side and in float32, with its AdamW state."""
    if state is None:
        state, meta, _ = ckpt.restore(step, state_like)
    else:
        meta = ckpt.restore_meta(step)
    run_meta = RunMeta.from_json(meta.get("metadata"))
    host = to_host({"params": state["params"], "opt_state": state["opt_state"]})
    adam, _ = adam_state(host["opt_state"])
    f32 = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)
    optimizer = AdamState(count=int(adam.count), mu=f32(adam.mu), nu=f32(adam.nu),
                          lr=schedule_lr(cfg.optim, run_meta.step),
                          **AdamWSettings.of(cfg.optim).as_dict())
    # Export the architecture only: the compute dtype / embedding style are runtime choices.
    arch = dataclasses.replace(model_config, dtype="float32", one_hot_embedding=False,
                               attention="auto", remat=False)
    return CheckpointRecord(arch, f32(host["params"]), meta.get("tokenizer_desc"), run_meta,
                            optimizer)
