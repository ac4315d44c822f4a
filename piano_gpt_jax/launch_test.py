"""The launcher's own behaviour, with stand-in workers (no JAX): a busy port refused up front, a
killed worker reported in one line without the survivors' dying words, Ctrl-C as an interrupt."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from piano_gpt_jax import launch

WORKER = '''
import os, signal, sys, time
rank = int(os.environ["JAX_PROCESS_ID"])
def on_term(*_):
    print("Traceback (most recent call last):\\n  lost the peer", flush=True)
    sys.exit(1)
signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, lambda *_: (print("saved", flush=True), sys.exit(130)))
print("ready", flush=True)
if rank == 1 and os.environ.get("DIE"):
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)
if rank == 0 and os.environ.get("DIE"):  # a collective fails at once when its peer is gone
    time.sleep(0.5)
    print("Traceback (most recent call last):\\n  gloo: connection closed by peer", flush=True)
time.sleep(60)
'''


def _launcher(tmp_path: Path, *extra: str, die: bool = False) -> subprocess.Popen:
    (tmp_path / "stand_in_worker.py").write_text(WORKER)
    env = {"PYTHONPATH": f"{tmp_path}:{Path(launch.__file__).parents[1]}",
           "PATH": "/usr/bin:/bin", **({"DIE": "1"} if die else {})}
    return subprocess.Popen([sys.executable, "-m", "piano_gpt_jax.launch", "-n", "2",
                             "--module", "stand_in_worker", "--grace", "5", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_port_in_use_is_refused_before_anything_starts(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert launch.main(["-n", "2", "--port", str(port), "--module", "no_such_module"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"error: the coordinator port {port} on 127.0.0.1 is already in use (another "
                   "job, or one still shutting down); pass another --port, or leave it out to "
                   "use a free one.")


def test_a_killed_worker_is_one_line_without_the_others_traceback(tmp_path):
    proc = _launcher(tmp_path, die=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in out + err and "peer" not in out, out
    assert err.strip().startswith("error: process 1 of 2") and "killed by SIGKILL" in err


def test_ctrl_c_is_an_interrupt_not_an_error(tmp_path):
    proc = _launcher(tmp_path)
    deadline = time.time() + 30
    ready = 0
    while ready < 2 and time.time() < deadline:
        ready += proc.stdout.readline().strip().endswith("ready")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "error" not in err and err.strip().startswith("interrupted: the 2 process(es) "
                                                         "stopped after saving")
    assert out.count("saved") == 2
