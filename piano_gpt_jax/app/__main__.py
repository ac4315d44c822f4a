"""Start the web app on this machine: `python -m piano_gpt_jax.app [--port N] [--runs DIR]
[--out DIR]`.

It listens on localhost only (the pages read whatever paths are typed into them, so they are not
meant for a network), prints the URL, and passes the runs and output folders to the page script
through the environment.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

from piano_gpt_jax.app.settings import DEFAULT_OUT, DEFAULT_RUNS, OUT_ENV, RUNS_ENV

SCRIPT = Path(__file__).with_name("streamlit_app.py")
DEFAULT_PORT = 8501


def free_port(preferred: int, host: str = "127.0.0.1") -> int:
    """`preferred` when nothing listens there, else any free port (0 asks for one directly)."""
    for port in ((preferred, 0) if preferred else (0,)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise OSError("no free TCP port on localhost")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m piano_gpt_jax.app",
                                 description="Web app: generate, review datasets, compare runs.")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT,
                    help=f"port on localhost (default {DEFAULT_PORT}; a free one if taken; 0 = "
                         "any free port)")
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help=f"folder whose run directories and .pt files are listed (default "
                         f"{DEFAULT_RUNS}/)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"the only folder the app writes to (default {DEFAULT_OUT}/)")
    return ap


def streamlit_argv(port: int) -> list[str]:
    return ["streamlit", "run", str(SCRIPT), "--server.address", "localhost",
            "--server.port", str(port), "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--global.developmentMode", "false", "--client.toolbarMode", "minimal"]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from streamlit.web import cli as streamlit_cli
    except ImportError:
        raise SystemExit('error: the web app needs Streamlit: pip install -e ".[app]"') from None
    port = free_port(args.port)
    os.environ[RUNS_ENV] = str(Path(args.runs).expanduser().resolve())
    os.environ[OUT_ENV] = str(Path(args.out).expanduser().resolve())
    print(f"piano-gpt-jax app: http://localhost:{port}  (runs: {os.environ[RUNS_ENV]}, "
          f"writes to: {os.environ[OUT_ENV]})", flush=True)
    sys.argv = streamlit_argv(port)
    return int(streamlit_cli.main() or 0)


if __name__ == "__main__":
    sys.exit(main())
