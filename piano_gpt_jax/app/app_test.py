"""The whole app (navigation + default page) and the launcher."""

from __future__ import annotations

import socket
from pathlib import Path

from streamlit.testing.v1 import AppTest

from piano_gpt_jax.app import __main__ as launcher

SCRIPT = Path(__file__).with_name("streamlit_app.py")


def test_app_opens_on_generate(app_env):
    at = AppTest.from_file(str(SCRIPT), default_timeout=30).run()
    assert not at.exception
    assert at.title[0].value == "Generate"


def test_launcher_port_and_arguments():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        assert launcher.free_port(taken) != taken
    argv = launcher.streamlit_argv(8765)
    assert argv[:3] == ["streamlit", "run", str(SCRIPT)]
    assert argv[argv.index("--server.address") + 1] == "localhost"
    args = launcher.build_parser().parse_args(["--port", "0", "--runs", "r", "--out", "o"])
    assert (args.port, args.runs, args.out) == (0, "r", "o")


def test_runs_export_opens_in_generate(app_env, tmp_path):
    """The Runs page's export link leads to Generate with that file, which a junk .pt fails
    to load with a message rather than a traceback."""
    run = tmp_path / "exported"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"event": "train", "step": 1, "train_loss": 3.0}\n')
    (run / "final.pt").write_bytes(b"PK not really a zip")
    at = AppTest.from_file(str(SCRIPT), default_timeout=30).run()
    at.session_state["runs_extra"] = str(run)
    at.switch_page("page_scripts/runs.py").run()
    assert not at.exception and at.title[0].value == "Runs"
    assert [c.value for c in at.code] == [str(run / "final.pt")]
    next(b for b in at.button if b.label == "Open in Generate").click().run()
    assert at.title[0].value == "Generate"
    assert at.text_input(key="gen_ckpt_path").value == str(run / "final.pt")
    assert "cannot load checkpoint" in at.error[0].value and not at.exception
