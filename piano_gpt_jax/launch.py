"""Run N trainer processes on this machine as one JAX job (tests, and a multi-process run
without a cluster manager).

    python -m piano_gpt_jax.launch -n 2 -- --config configs/piano.py:tiny --config.out_dir=runs/x

Each process gets JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES=N and
JAX_PROCESS_ID=i — the variables the trainer reads (run/processes.py,
maybe_init_distributed) — and the arguments after `--`. Output lines come through prefixed
with `[pI]`. As soon as one process dies (non-zero exit), the others are stopped (SIGTERM, then
SIGKILL after --grace seconds: a survivor blocked in a collective with the dead one cannot finish
on its own), their output from then on is dropped (a survivor's traceback about the lost peer
says nothing the launcher's line does not), and the launcher exits non-zero with one line naming
the process. Ctrl-C is passed to every process; each saves and stops, and the launcher says so
and exits 130 (the trainer's own code for an interrupted run), not as an error. A --port already
in use is refused before anything starts (the workers died with SIGSEGV on it). Run the same
command again to resume from the last complete checkpoint.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

INTERRUPTED = 130  # the trainer's exit code after Ctrl-C (it saved and stopped)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _forward(proc: subprocess.Popen, prefix: str, lock: threading.Lock, mute,
             held: list[str]) -> None:
    """Print a process's lines with `prefix`; from a traceback on, hold them in `held` (the
    launcher decides at the end: a survivor's traceback about its dead peer can be printed
    within milliseconds of the death, before the launcher has noticed it)."""
    for line in iter(proc.stdout.readline, ""):
        line = f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n"
        if mute():
            continue  # keep reading: a full pipe would block the process
        if held or line.startswith(f"{prefix}Traceback (most recent call last)"):
            held.append(line)
            continue
        with lock:
            sys.stdout.write(line)
            sys.stdout.flush()


class LaunchError(Exception):
    """The job cannot start as asked; the message says why and what to do."""


def launch(n: int, args: Sequence[str], module: str = "piano_gpt_jax.train",
           port: int | None = None, grace: float = 10.0, env: dict | None = None) -> int:
    """Start `n` processes of `python -m module args`, wait for all; returns the exit status."""
    if port is not None and port_in_use(port):
        raise LaunchError(f"the coordinator port {port} on 127.0.0.1 is already in use (another "
                          "job, or one still shutting down); pass another --port, or leave it "
                          "out to use a free one.")
    address = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    base = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    for i in range(n):
        child_env = {**base, "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(n),
                     "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, "-m", module, *args], env=child_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, bufsize=1))
    failed: tuple[int, int] | None = None
    interrupted = False
    held: list[list[str]] = [[] for _ in procs]
    readers = [threading.Thread(target=_forward, daemon=True, args=(
        p, f"[p{i}] ", lock, lambda i=i: failed is not None and failed[0] != i, held[i]))
        for i, p in enumerate(procs)]
    for t in readers:
        t.start()

    def pass_on(signum, frame) -> None:
        nonlocal interrupted
        interrupted = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = signal.signal(signal.SIGINT, pass_on)
    try:
        while any(p.poll() is None for p in procs):
            ended = [(i, p.poll()) for i, p in enumerate(procs)]
            ended = [(i, c) for i, c in ended if c not in (None, 0)
                     and not (interrupted and c == INTERRUPTED)]
            if ended:  # a process killed by a signal is the cause, a peer's error its echo
                failed = min(ended, key=lambda e: (e[1] >= 0, e[0]))
            if failed is not None:
                _stop(procs, grace)
                break
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGINT, previous)
        for t in readers:
            t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if failed is None:
        failed = next(((i, c) for i, c in enumerate(codes) if c not in (0, None)
                       and not (interrupted and c == INTERRUPTED)), None)
    for i, lines in enumerate(held):  # tracebacks: only the failing process's own
        if lines and (failed is None or failed[0] == i):
            sys.stdout.writelines(lines)
    sys.stdout.flush()
    if failed is None and interrupted and all(c in (0, INTERRUPTED) for c in codes):
        print(f"interrupted: the {n} process(es) stopped after saving (exit codes "
              f"{', '.join(map(str, codes))}). Run the same command to resume.", file=sys.stderr)
        return INTERRUPTED
    if failed is None:
        return 0
    i, code = failed
    others = ", ".join(f"p{j} {_describe(p.returncode)}" for j, p in enumerate(procs) if j != i)
    print(f"error: process {i} of {n} (pid {procs[i].pid}) ended with {_describe(code)}; "
          f"stopped the others ({others}). Run the same command to resume from the last "
          "complete checkpoint.", file=sys.stderr)
    return code if code > 0 else 1


def _stop(procs: list[subprocess.Popen], grace: float) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + grace
    while time.time() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" in argv:
        cut = argv.index("--")
        ours, theirs = argv[:cut], argv[cut + 1:]
    else:
        ours, theirs = argv, []
    parser = argparse.ArgumentParser(
        prog="python -m piano_gpt_jax.launch",
        description="Run N processes of the trainer on this machine as one JAX job; the "
                    "arguments after -- go to every process.")
    parser.add_argument("-n", "--num-processes", type=int, required=True)
    parser.add_argument("--module", default="piano_gpt_jax.train",
                        help="the module each process runs (default: the trainer)")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: "
                                                               "a free one)")
    parser.add_argument("--grace", type=float, default=10.0,
                        help="seconds the others get to stop after one died, before SIGKILL")
    args = parser.parse_args(ours)
    if args.num_processes < 1:
        parser.error("-n must be at least 1")
    try:
        return launch(args.num_processes, theirs, args.module, args.port, args.grace)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
