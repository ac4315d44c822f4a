"""Run logging: a console line, a tqdm bar, `metrics.jsonl`, and wandb when asked for.

Logging never stops a run: wandb problems turn into a note and the sink is dropped. Only the main
process (jax.process_index() == 0) writes anything.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from tqdm import tqdm

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# What a log line owes to the wall clock rather than to the run: two runs of one config (or a run
# and its preempted-and-resumed twin) agree on everything else.
WALL_CLOCK_KEYS = ("tokens_per_s", "step_time_s", "mfu", "data_share")
WALL_CLOCK_EVENTS = ("startup",)


def read_log(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """(events in file order, lines that are not an event): the one reader of `metrics.jsonl`.
    A missing file has none; a line torn by a kill, or anything but a JSON object with a
    numeric step, is counted, not returned. Invalid bytes read as U+FFFD."""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return [], 0
    found, torn = [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            torn += 1
            continue
        if isinstance(event, dict) and isinstance(event.get("step"), (int, float)):
            found.append(event)
        else:
            torn += 1
    return found, torn


def read_events(path: str | Path, reproducible: bool = False) -> list[dict[str, Any]]:
    """The events of a `metrics.jsonl` (read_log). `reproducible=True` leaves out
    WALL_CLOCK_KEYS and WALL_CLOCK_EVENTS."""
    found, _ = read_log(path)
    if not reproducible:
        return found
    return [{k: v for k, v in event.items() if k not in WALL_CLOCK_KEYS} for event in found
            if event.get("event") not in WALL_CLOCK_EVENTS]

def append_jsonl(path: str | Path, records: list[dict]) -> None:
    """Append records, all or none (a failed write is cut back off, so the log never ends in a
    torn line); NaN is written as null so every line stays valid JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = lambda v: None if isinstance(v, float) and math.isnan(v) else v
    text = "".join(json.dumps({k: clean(v) for k, v in r.items()}) + "\n" for r in records)
    existed = path.exists()
    with open(path, "a", encoding="utf-8") as f:
        size = f.tell()
        try:
            f.write(text)
            f.flush()
        except OSError:
            f.truncate(size)
            if not existed:
                f.close()
                path.unlink(missing_ok=True)
            raise


# Dense bf16 peak FLOP/s per accelerator (substring of jax's device_kind, first match wins).
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("A10", 125e12), ("V100", 125e12), ("TPU v6", 918e12), ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v4", 275e12), ("TPU v3", 123e12),
)


def peak_flops(device_kind: str) -> float | None:
    """Peak FLOP/s of one device, None where unknown (CPUs): MFU is then reported as n/a."""
    for name, flops in PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


def flops_per_token(n_params: int, n_layer: int, n_head: int, head_dim: int, seq_len: int) -> float:
    """PaLM's training FLOPs per token: 6N for the matmuls plus 12*L*H*D*T for attention."""
    return 6.0 * n_params + 12.0 * n_layer * n_head * head_dim * seq_len


def mfu(tokens_per_s: float, flops_token: float, device_kind: str, n_devices: int) -> float | None:
    peak = peak_flops(device_kind)
    if peak is None or tokens_per_s <= 0:
        return None
    return tokens_per_s * flops_token / (peak * n_devices)


def truncate_metrics(path: str | Path, keep_through_step: int | None) -> None:
    """Drop events after `keep_through_step` (all events when None), atomically, so a resumed run's
    log reads as one uninterrupted run."""
    path = Path(path)
    if not path.exists():
        return
    kept = [json.dumps(event) for event in read_events(path)
            if keep_through_step is not None and event.get("step", math.inf) <= keep_through_step]
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".metrics.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class RunLog:
    """All sinks of one run; call `close()` at the end."""

    def __init__(self, out_dir: str | Path, *, total_steps: int, start_step: int,
                 main_process: bool = True, progress: bool = True,
                 wandb_settings: dict | None = None, run_config: dict | None = None):
        self.main = main_process
        self.path = Path(out_dir) / METRICS_FILE
        self._file = open(self.path, "a") if self.main else None  # noqa: SIM115
        self._bar = None
        if self.main and progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step",
                             dynamic_ncols=True, file=sys.stderr, leave=False)
        self._wandb = self._init_wandb(wandb_settings, run_config) if self.main else None

    def _init_wandb(self, settings: dict | None, run_config: dict | None):
        if not settings:
            return None
        try:
            import wandb
        except ImportError:
            self.note("wandb is not installed (pip install wandb); logging to metrics.jsonl only")
            return None
        mode = os.environ.get("WANDB_MODE")
        if mode is None and not (os.environ.get("WANDB_API_KEY") or _has_netrc_key()):
            mode = "offline"
            self.note("no wandb API key found: wandb runs offline (sync later with `wandb sync`)")
        try:
            return wandb.init(project=settings.get("project"), entity=settings.get("entity"),
                              name=settings.get("name"), id=settings.get("id"),
                              resume="allow", config=run_config, mode=mode or "online",
                              dir=settings.get("dir"))
        except Exception as e:  # noqa: BLE001 — network, auth, anything: never stop the run
            self.note(f"wandb.init failed ({type(e).__name__}: {e}); retrying offline")
            try:
                return wandb.init(project=settings.get("project"), mode="offline",
                                  config=run_config, dir=settings.get("dir"))
            except Exception as e2:  # noqa: BLE001
                self.note(f"wandb disabled: {e2}")
                return None

    @property
    def wandb_id(self) -> str | None:
        """The id of the wandb run being logged to (None when wandb is off or failed)."""
        return getattr(self._wandb, "id", None)

    def note(self, message: str) -> None:
        if self.main:
            (self._bar.write if self._bar is not None else print)(message)

    def event(self, event: dict[str, Any]) -> None:
        """One JSON line (and a wandb log) per event; `step` is required."""
        if not self.main:
            return
        clean = {k: _plain(v) for k, v in event.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._wandb is not None:
            try:
                self._wandb.log({k: v for k, v in clean.items() if k != "step"},
                                step=clean["step"])
            except Exception as e:  # noqa: BLE001
                self.note(f"wandb.log failed ({e}); wandb disabled for the rest of the run")
                self._wandb = None

    def train_line(self, step: int, loss: float, lr: float, tokens_per_s: float,
                   step_time_s: float, mfu_value: float | None, extra: str = "") -> None:
        mfu_text = "n/a" if mfu_value is None else f"{100 * mfu_value:.1f}%"
        self.note(f"step {step:6d} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s"
                  f" | mfu {mfu_text} | {1000 * step_time_s:.0f} ms/step{extra}")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._file is not None:
            self._file.close()
        if self._wandb is not None:
            try:
                self._wandb.finish()
            except Exception:  # noqa: BLE001
                pass


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _has_netrc_key() -> bool:
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False
