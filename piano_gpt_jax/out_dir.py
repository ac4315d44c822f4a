"""What a run writes into its out_dir, and the rules that keep a user's files safe there.

  out_dir/checkpoints/<step>/   orbax training checkpoints (checkpoints/run_dir.py)
  out_dir/metrics.jsonl         one JSON line per log/eval event
  out_dir/final.pt, best.pt     PyTorch exports, written when the run finishes
  out_dir/final/, best/         safetensors model folders (checkpoint.export_safetensors)
  out_dir/wandb_id.txt          the run's wandb id (kept across resumes)
  out_dir/damaged/              checkpoints that failed to restore, moved aside, never deleted
  out_dir/replaced-<time>/      an earlier run's outputs, moved aside by `overwrite=True`

A run resumes from its newest restorable checkpoint. Without one, a new run starts, and it must
not overwrite an earlier run's outputs: exports (or an old-layout best/ directory) without a
checkpoint to resume from make the trainer refuse, unless `overwrite=True` moves them aside.
The log of a start that never reached a checkpoint is simply started over.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
import time
from pathlib import Path

from piano_gpt_jax.checkpoints.model_folder import is_model_folder
from piano_gpt_jax.run_log import METRICS_FILE, read_events

EXPORTS = ("final.pt", "best.pt")
MODEL_FOLDERS = ("final", "best")  # checkpoint.export_safetensors
WANDB_ID = "wandb_id.txt"
# Temporary names of the files above while they are written (then renamed into place).
TEMPORARY = (".final.pt.*.tmp", ".best.pt.*.tmp", ".metrics.*.tmp", ".write-test-*")


class OutDirError(ValueError):
    """out_dir cannot be used as asked; the message says why and what to do."""


def prepare(out_dir: str | Path) -> Path:
    """Create out_dir if needed and prove it is a writable directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutDirError(f"out_dir {out_dir} is a file, not a directory; choose another "
                          "--config.out_dir.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutDirError(f"cannot write to out_dir {out_dir} ({_reason(e)}); choose a "
                          "directory you can write to with --config.out_dir.") from None
    for pattern in TEMPORARY:  # half-written files of a killed run (ours by their names)
        for stale in out_dir.glob(pattern):
            stale.unlink(missing_ok=True)
    return out_dir


def _reason(e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return "no space left on the device"
    return e.strerror or str(e)


def os_error_reason(e: OSError) -> str:
    """An OSError in a few words ("no space left on the device", "Permission denied")."""
    return _reason(e)


def check_writable(directory: str | Path, flag: str) -> None:
    """Prove the tools can create and write `directory` before any slow work, leaving nothing
    behind: a folder created for the probe is removed again (OutDirError names `flag`)."""
    directory = Path(directory)
    created = outermost_missing(directory)
    try:
        if directory.exists() and not directory.is_dir():
            raise OutDirError(f"{flag} {directory} is a file, not a directory; choose another "
                              f"{flag}.")
        directory.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test-")
        try:
            os.write(fd, b"\0" * 4096)  # a full disk can still create an empty file
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutDirError(f"cannot write to {flag} {directory} ({_reason(e)}); choose a "
                          f"directory you can write to with {flag}.") from None
    finally:
        if created is not None:
            try:
                remove_if_empty(created)
            except OSError:
                pass


def outermost_missing(path: str | Path) -> Path | None:
    """The outermost folder of `path` that does not exist yet (what creating it would add, and
    what to remove again), or None when `path` exists."""
    found = None
    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            break
        found = folder
    return found


def earlier_outputs(out_dir: Path) -> list[str]:
    """Outputs of a run that got past its first checkpoint: exports, an old best/ directory."""
    found = [name for name in EXPORTS if (out_dir / name).exists()]
    best = out_dir / "best"
    if best.is_dir() and any(p.name.isdigit() for p in best.iterdir()):
        found.append("best/")
    found += [f"{name}/" for name in MODEL_FOLDERS if is_model_folder(out_dir / name)
              and f"{name}/" not in found]
    return found


def guard_new_run(out_dir: Path, overwrite: bool) -> list[str]:
    """Before a new run (nothing to resume) writes into out_dir. Returns notes for the log.

    Exports of an earlier run: OutDirError, unless `overwrite`, which moves them (and its log)
    to out_dir/replaced-<time>/. A log with evaluations after step 0 but nothing else belonged
    to a run whose checkpoints are gone: it is kept as metrics.jsonl.replaced-<time>. A log of a
    start that never got that far is started over.
    """
    found = earlier_outputs(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if found and not overwrite:
        raise OutDirError(
            f"{out_dir} holds the outputs of an earlier run ({', '.join(found)}) but no "
            "checkpoint to resume from, and a new run would overwrite them. Choose another "
            "--config.out_dir, or pass --config.overwrite=True to move them to "
            f"{out_dir}/replaced-<time>/ and start over.")
    notes = []
    if found:
        target = out_dir / f"replaced-{stamp}"
        target.mkdir()
        for name in [*found, METRICS_FILE]:
            source = out_dir / name.rstrip("/")
            if source.exists():
                os.replace(source, target / source.name)
        notes.append(f"overwrite: moved the earlier run's {', '.join(found)} to {target}")
    elif _has_evaluations_after_start(out_dir / METRICS_FILE):
        kept = out_dir / f"{METRICS_FILE}.replaced-{stamp}"
        os.replace(out_dir / METRICS_FILE, kept)
        notes.append(f"{out_dir} had a log but no checkpoint to resume from; kept it as {kept}")
    return notes


def _has_evaluations_after_start(path: Path) -> bool:
    return any(e.get("event") == "eval" and (e.get("step") or 0) > 0 for e in read_events(path))


def remove_if_empty(root: Path) -> None:
    """Remove `root` and its subdirectories if no file was written under them."""
    if not root.is_dir() or any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    root.rmdir()


def stable_run_id(out_dir: Path) -> str:
    """This run's wandb id: the one in out_dir/wandb_id.txt, else one derived from the path
    (so exports of a run that never logged to wandb still carry the id a later wandb run of it
    would use; piano-gpt's piano_eval requires one)."""
    path = out_dir / WANDB_ID
    if path.exists():
        return path.read_text().strip()
    return hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:12]


def wandb_id_for_logging(out_dir: Path) -> str:
    """The stable id, written down so a resumed run continues the same wandb run."""
    run_id = stable_run_id(out_dir)
    (out_dir / WANDB_ID).write_text(run_id)
    return run_id
