"""Where the app looks for runs and the one folder it writes to.

The launcher passes both through environment variables, because `streamlit run` starts the script
in a fresh module namespace where command-line flags of ours cannot reach.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

RUNS_ENV = "PIANO_GPT_APP_RUNS"
OUT_ENV = "PIANO_GPT_APP_OUT"
DEFAULT_RUNS = "runs"
DEFAULT_OUT = "out/app"


@dataclass(frozen=True)
class AppSettings:
    runs_root: Path  # listed in the checkpoint and run pickers; only read
    out_dir: Path  # the only place the app writes (generations, scratch files)

    @classmethod
    def from_env(cls) -> AppSettings:
        return cls(Path(os.environ.get(RUNS_ENV, DEFAULT_RUNS)).expanduser(),
                   Path(os.environ.get(OUT_ENV, DEFAULT_OUT)).expanduser())

    def new_output_dir(self, prefix: str) -> Path:
        """A fresh directory per action, so nothing written earlier is ever replaced."""
        base = self.out_dir / prefix
        base.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for k in range(10_000):
            path = base / (stamp if k == 0 else f"{stamp}-{k}")
            try:
                path.mkdir()
            except FileExistsError:
                continue
            return path
        raise RuntimeError(f"no free output directory under {base}")

    @contextlib.contextmanager
    def scratch_dir(self) -> Iterator[Path]:
        """A temporary directory inside the output folder, removed afterwards: uploads and
        renderers that need real files never touch the system temp or the user's folders."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".scratch-", dir=self.out_dir) as tmp:
            yield Path(tmp)
