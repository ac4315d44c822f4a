"""Start the web app on this machine: `python -m piano_gpt_jax.app [--port N] [--runs DIR]
[--out DIR] [--address HOST]`.

It listens on localhost only (the pages read whatever paths are typed into them, so they are not
meant for a network), prints the URL, and passes the runs and output folders to the page script
through the environment. Requests must name a loopback host in their `Host` header: a page on
another site that resolves its own name to 127.0.0.1 (DNS rebinding) is refused with 400, as is
any other name, unless `--address` asks for it.
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


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def port_number(text: str) -> int:
    """argparse type: a TCP port (0 = any free one)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0..65535; 0 = any "
                                         "free port)")
    return port


def allowed_hosts(address: str) -> list[str]:
    """The Host header names the server answers: loopback, plus an address the user chose."""
    hosts = list(LOOPBACK_HOSTS)
    if address not in hosts and address not in ("", "0.0.0.0", "::"):
        hosts.append(address)
    return hosts


def refuse_other_hosts(hosts: list[str]) -> None:
    """Put Starlette's TrustedHostMiddleware in front of Streamlit's own middleware: Streamlit
    (1.67, on Starlette) serves any Host header."""
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from streamlit.web.server.starlette import starlette_app

    streamlit_middleware = starlette_app.create_streamlit_middleware

    def with_host_check() -> list:
        return [Middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False),
                *streamlit_middleware()]

    starlette_app.create_streamlit_middleware = with_host_check


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m piano_gpt_jax.app",
                                 description="Web app: generate, review datasets, compare runs.")
    ap.add_argument("--port", type=port_number, default=DEFAULT_PORT,
                    help=f"port on localhost (default {DEFAULT_PORT}; a free one if taken; 0 = "
                         "any free port)")
    ap.add_argument("--runs", default=DEFAULT_RUNS,
                    help=f"folder whose run directories and .pt files are listed (default "
                         f"{DEFAULT_RUNS}/)")
    ap.add_argument("--out", default=DEFAULT_OUT,
                    help=f"the only folder the app writes to (default {DEFAULT_OUT}/)")
    ap.add_argument("--address", default="localhost",
                    help="the address to listen on (default localhost). Another address exposes "
                         "the app, which reads any path typed into it, to that network")
    return ap


def streamlit_argv(port: int, address: str = "localhost") -> list[str]:
    return ["streamlit", "run", str(SCRIPT), "--server.address", address,
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
    if args.port and port != args.port:
        print(f"port {args.port} is in use (another app?); using {port} instead (--port "
              "chooses another)", flush=True)
    os.environ[RUNS_ENV] = str(Path(args.runs).expanduser().resolve())
    os.environ[OUT_ENV] = str(Path(args.out).expanduser().resolve())
    host = "localhost" if args.address in LOOPBACK_HOSTS else args.address
    print(f"piano-gpt-jax app: http://{host}:{port}  (runs: {os.environ[RUNS_ENV]}, "
          f"writes to: {os.environ[OUT_ENV]})", flush=True)
    refuse_other_hosts(allowed_hosts(args.address))
    sys.argv = streamlit_argv(port, args.address)
    return int(streamlit_cli.main() or 0)


if __name__ == "__main__":
    sys.exit(main())
