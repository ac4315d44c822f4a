"""Earlier generations under the app's output folder: their settings, their files, one zip each.

Every generation folder holds a tokens.json (checkpoint, request, prompt and sample ids) beside
its MIDI, WAV and PNG files; that file is what marks a folder as a generation, so the history
survives restarts of the app and lists grids and comparisons too.
"""

from __future__ import annotations

import dataclasses
import io
import json
import zipfile
from pathlib import Path

TOKENS_FILE = "tokens.json"
MAX_LISTED = 50


@dataclasses.dataclass(frozen=True)
class Entry:
    path: Path
    checkpoint: str
    request: dict
    samples: int

    @property
    def title(self) -> str:
        r = self.request
        return (f"{self.path.relative_to(self.path.parents[1])} — {r.get('task', '?')}, "
                f"{Path(self.checkpoint).name}, T={r.get('temperature')}, seed {r.get('seed')}, "
                f"{self.samples} sample(s)")

    def files(self, suffix: str) -> list[Path]:
        return sorted(self.path.glob(f"*{suffix}"))


def entries(out_dir: Path, limit: int = MAX_LISTED) -> list[Entry]:
    """Generation folders under `out_dir`, newest first (at most `limit`)."""
    if not Path(out_dir).is_dir():
        return []
    found = []
    for tokens in Path(out_dir).rglob(TOKENS_FILE):
        if any(part.startswith(".") for part in tokens.relative_to(out_dir).parts):
            continue  # scratch folders
        try:
            data = json.loads(tokens.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict):
            continue
        found.append((tokens.stat().st_mtime, Entry(
            tokens.parent, str(data.get("checkpoint", "?")), dict(data.get("request") or {}),
            len(data.get("samples") or []))))
    found.sort(key=lambda x: (x[0], str(x[1].path)), reverse=True)
    return [e for _, e in found[:limit]]


def zip_bytes(folder: Path) -> bytes:
    """The folder's files as one zip (names relative to the folder)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, strict_timestamps=False) as z:
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                z.write(path, path.relative_to(folder).as_posix())
    return buffer.getvalue()
