"""Run logging: metrics.jsonl events, resume truncation, MFU, wandb that never crashes a run."""

import json
import sys
import types

import pytest

from piano_gpt_jax.run_log import (
    RunLog,
    flops_per_token,
    mfu,
    peak_flops,
    read_events,
    truncate_metrics,
)


def test_events_are_json_lines(tmp_path):
    log = RunLog(tmp_path, total_steps=10, start_step=0, progress=False)
    log.event({"event": "train", "step": 1, "train_loss": 2.5, "lr": 1e-3, "mfu": None})
    log.event({"event": "eval", "step": 2, "val_loss": float("nan")})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["train_loss"] == 2.5 and lines[1]["val_loss"] is None  # NaN -> null


def test_read_events_skips_a_torn_line_and_can_leave_out_the_wall_clock(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_events(path) == []
    path.write_text(
        json.dumps({"event": "startup", "step": 1, "compile_s": 2.0}) + "\n"
        + json.dumps({"event": "train", "step": 1, "train_loss": 3.0, "tokens_per_s": 9.0,
                      "step_time_s": 0.1, "mfu": None, "data_share": 0.01}) + "\n"
        + '{"event": "eval", "st')  # a line torn by kill -9
    assert [e["event"] for e in read_events(path)] == ["startup", "train"]
    assert read_events(path, reproducible=True) == [
        {"event": "train", "step": 1, "train_loss": 3.0}]


def test_truncate_keeps_events_up_to_the_restored_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "event": "train"}) + "\n" for s in range(8))
                    + '{"step": 8, "ev')  # a line torn by kill -9
    truncate_metrics(path, 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    truncate_metrics(path, None)  # no checkpoint: the run starts over
    assert path.read_text() == ""


def test_mfu_uses_palm_flops_and_peak_table():
    f = flops_per_token(n_params=85_000_000, n_layer=12, n_head=12, head_dim=64, seq_len=2048)
    assert f == 6 * 85e6 + 12 * 12 * 12 * 64 * 2048
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("cpu") is None
    assert mfu(1e5, f, "NVIDIA A100-SXM4-40GB", 2) == pytest.approx(1e5 * f / (2 * 312e12))
    assert mfu(1e5, f, "cpu", 1) is None


def test_wandb_failures_fall_back_and_never_raise(tmp_path, monkeypatch, capsys):
    calls = []

    def init(**kwargs):
        calls.append(kwargs["mode"])
        if kwargs["mode"] != "offline":
            raise ConnectionError("no network")
        return types.SimpleNamespace(log=lambda *a, **k: (_ for _ in ()).throw(OSError("disk")),
                                     finish=lambda: None)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    log = RunLog(tmp_path, total_steps=2, start_step=0, progress=False,
                 wandb_settings={"project": "p"}, run_config={"a": 1})
    log.event({"step": 1, "train_loss": 1.0})  # wandb.log raises: noted, dropped
    log.event({"step": 2, "train_loss": 0.5})
    log.close()
    assert calls == ["online", "offline"]
    out = capsys.readouterr().out
    assert "retrying offline" in out and "wandb disabled" in out
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_no_key_means_offline_with_a_note(tmp_path, monkeypatch, capsys):
    modes = []
    fake = types.SimpleNamespace(init=lambda **k: modes.append(k["mode"]) or types.SimpleNamespace(
        log=lambda *a, **k: None, finish=lambda: None))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    RunLog(tmp_path, total_steps=1, start_step=0, progress=False,
           wandb_settings={"project": "p"}).close()
    assert modes == ["offline"] and "offline" in capsys.readouterr().out
