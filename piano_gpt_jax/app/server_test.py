"""The app's server: only loopback names in the Host header (DNS rebinding), a bad --port in
one line, and a busy default port said aloud."""

from __future__ import annotations

import http.client
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from piano_gpt_jax.app import __main__ as launcher

REPO = Path(__file__).resolve().parents[2]


def _status(port: int, host: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", "/_stcore/health", skip_host=True)
        conn.putheader("Host", host)
        conn.endheaders()
        return conn.getresponse().status
    finally:
        conn.close()


def test_a_foreign_host_header_is_refused(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "piano_gpt_jax.app", "--port", "0", "--runs", str(tmp_path),
         "--out", str(tmp_path / "out")], cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        port = int(re.search(r"http://localhost:(\d+)", proc.stdout.readline()).group(1))
        deadline = time.monotonic() + 60
        while True:
            try:
                status = _status(port, f"localhost:{port}")
                break
            except OSError:
                assert time.monotonic() < deadline, "the app never answered"
                time.sleep(0.3)
        assert status == 200
        assert _status(port, f"127.0.0.1:{port}") == 200
        assert _status(port, f"evil.example.com:{port}") == 400  # a rebinding page's request
        assert _status(port, "localhost.evil.example.com") == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_a_bad_port_is_one_line(port, capsys):
    with pytest.raises(SystemExit) as exc:
        launcher.build_parser().parse_args(["--port", port])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "argument --port:" in err and "port number" in err


def test_a_busy_port_is_said_and_another_taken():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert launcher.free_port(taken) != taken


def test_only_loopback_names_unless_an_address_is_asked_for():
    assert launcher.allowed_hosts("localhost") == ["localhost", "127.0.0.1", "::1"]
    assert launcher.allowed_hosts("192.168.1.5")[-1] == "192.168.1.5"


def test_a_busy_port_is_said_when_the_app_starts(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proc = subprocess.Popen(
            [sys.executable, "-m", "piano_gpt_jax.app", "--port", str(taken), "--runs",
             str(tmp_path), "--out", str(tmp_path / "out")], cwd=REPO,
            env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        try:
            first, second = proc.stdout.readline(), proc.stdout.readline()
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert first.startswith(f"port {taken} is in use") and "using " in first
    assert "http://localhost:" in second and f":{taken} " not in second
