"""Bad input to the tools around the trainer (generate, evaluate, import_midi, the MIDI reader,
the .pt reader): one clear line and a non-zero exit, or the correct behaviour."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import datasets
import jax
import pytest
import torch

from piano_gpt_jax import evaluate, generate
from piano_gpt_jax.checkpoints import (
    CheckpointError,
    CheckpointRecord,
    RunMeta,
    load_any_checkpoint,
)
from piano_gpt_jax.checkpoints import save_model_checkpoint as save_dir
from piano_gpt_jax.checkpoints.torch_format import load_torch_checkpoint
from piano_gpt_jax.data import import_midi
from piano_gpt_jax.data.pipeline import build_tokenizer
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.music.midi import MidiReadError, read_midi
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

CONTEXT = 128


def _checkpoint(root: Path, stage: str) -> Path:
    settings = DataSettings(stage=stage, tasks="piano_medium", context_size=CONTEXT,
                            notes_per_record=24, batch_size=2, shard_index=0, shard_count=1)
    tok = build_tokenizer(settings)
    cfg = ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=2, n_embd=16,
                      context_size=CONTEXT)
    config = {"stage": "piano_task" if stage == "piano_task" else "next_token_pretraining",
              "data": {"notes_per_record": 100}}  # more notes than CONTEXT tokens can hold
    run = root / stage
    save_dir(run, CheckpointRecord(cfg, init_params(cfg, jax.random.PRNGKey(0)), tok.to_dict(),
                                   RunMeta(step=1, config=config)))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tools")
    return {"piano": _checkpoint(root, "piano_task"),
            "next": _checkpoint(root, "next_token_pretraining")}


def _generate(run: Path, out: Path, midi: Path, *extra: str) -> str:
    with pytest.raises(SystemExit) as exc:
        generate.main(["--checkpoint", str(run), "--out", str(out), "--prompt-midi", str(midi),
                       *extra])
    assert isinstance(exc.value.code, str) and exc.value.code.startswith("error: ")
    assert not out.exists()  # nothing written
    return exc.value.code


def test_generate_refuses_requests_it_cannot_serve(runs, maestro_dir, tmp_path):
    midi = maestro_dir / "Maestro_1.mid"
    out = tmp_path / "out"
    msg = _generate(runs["piano"], out, midi, "--max-new-tokens", "1000000000000")
    assert "need about" in msg and "GiB of token buffers" in msg and "ask for at most" in msg
    for bad in ("nan", "inf", "-1"):
        msg = _generate(runs["piano"], out, midi, "--temperature", bad)
        assert "temperature must be" in msg
    msg = _generate(runs["piano"], out, midi, "--task", "high_notes_masking-x5",
                    "--prompt-notes", "600")
    n = int(msg.split("at most ")[1].split(" of these notes fit")[0])
    assert f"context is {CONTEXT}" in msg and f"(--prompt-notes {n})" in msg and 5 < n < 60
    # ... and that many really fit: the prompt keeps its task tokens and room to generate
    generate.main(["--checkpoint", str(runs["piano"]), "--out", str(out), "--prompt-midi",
                   str(midi), "--task", "high_notes_masking-x5", "--prompt-notes", str(n),
                   "--max-new-tokens", "4", "--temperature", "0"])
    summary = json.loads((out / "generation.json").read_text())
    assert summary["prompt_tokens"] < CONTEXT and summary["prompt_notes"] <= n


def test_generate_keeps_the_notes_that_fit_when_none_were_asked_for(runs, maestro_dir,
                                                                   tmp_path, capsys):
    out = tmp_path / "out"
    generate.main(["--checkpoint", str(runs["piano"]), "--out", str(out), "--prompt-midi",
                   str(maestro_dir / "Maestro_1.mid"), "--task", "high_notes_masking-x5",
                   "--prompt-seconds", "100", "--max-new-tokens", "4", "--temperature", "0"])
    assert "kept the first" in capsys.readouterr().out
    summary = json.loads((out / "generation.json").read_text())
    assert summary["prompt_tokens"] < CONTEXT and 5 < summary["prompt_notes"] < 100
    vocab = ExponentialTimeTokenizer.from_dict(
        load_any_checkpoint(runs["piano"]).tokenizer_desc).token_to_id
    ids = summary["prompt_ids"]  # the task tokens stay in front, <GENAI> ends the prompt
    assert ids[-1] == vocab["<GENAI>"] and vocab["<PARAMETRIC_HIGH_NOTES>"] in ids[:6]


def test_evaluate_refuses_what_generate_refuses(runs, tmp_path):
    for args, message in (
            (["--checkpoint", str(runs["next"])], "trained for next-token prediction"),
            (["--checkpoint", str(runs["piano"]), "--temperature", "-1"],
             "temperature must be >= 0"),
            (["--checkpoint", str(runs["piano"]), "--temperature", "nan"],
             "temperature must be a finite number")):
        with pytest.raises(SystemExit) as exc:
            evaluate.main([*args, "--out-dir", str(tmp_path / "eval")])
        assert message in str(exc.value.code)
    assert not (tmp_path / "eval").exists()
    assert not (runs["next"] / "metrics.jsonl").exists()  # nothing appended to the run


def test_generate_on_an_unwritable_or_full_output_says_so_and_leaves_nothing(
        runs, maestro_dir, tmp_path, monkeypatch):
    midi = maestro_dir / "Maestro_1.mid"
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    msg = _generate(runs["piano"], blocker / "out", midi, "--max-new-tokens", "4")
    assert "cannot write to --out" in msg and "choose a directory you can write to" in msg

    def full_disk(*args, **kwargs):  # the disk fills up after the MIDI files were written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(generate.pianoroll, "prompt_and_generation", full_disk)
    out = tmp_path / "new" / "out"
    msg = _generate(runs["piano"], out, midi, "--max-new-tokens", "4")
    assert "cannot write the outputs to" in msg and "no space left on the device" in msg
    assert not (tmp_path / "new").exists()  # not even the folder it had made
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit):
        generate.main(["--checkpoint", str(runs["piano"]), "--out", str(kept), "--prompt-midi",
                       str(midi), "--max-new-tokens", "4"])
    assert [p.name for p in kept.iterdir()] == ["notes.txt"]


def test_evaluate_on_an_unwritable_or_full_output_says_so_and_keeps_the_log_whole(
        runs, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(runs["piano"]), "--out-dir", str(blocker / "eval")])
    assert str(exc.value.code).startswith("error: cannot write to --out-dir")
    log = tmp_path / "eval" / "metrics.jsonl"
    log.parent.mkdir()
    log.write_text('{"event": "eval", "step": 1}\n')
    before = log.read_bytes()

    class FullFile:  # accepts part of the text, then the disk is full
        def __init__(self, f):
            self._f = f

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

        def write(self, text):
            self._f.write(text[:10])
            self._f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = open

    def open_full(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullFile(f) if str(path) == str(log) else f

    monkeypatch.setattr("builtins.open", open_full)
    with pytest.raises(SystemExit) as exc:
        evaluate.main(["--checkpoint", str(runs["piano"]), "--out-dir", str(log.parent),
                       "--dataset", "builtin", "--n-examples", "1", "--split", "full_val"])
    monkeypatch.undo()
    assert "no space left on the device" in str(exc.value.code)
    assert log.read_bytes() == before  # no torn line


MIDI_CASES = {
    "empty": (b"", "the file is empty"),
    "text": (b"hello, not a midi file\n", "not a Standard MIDI File"),
    "header only": (b"MThd\x00\x00\x00\x06\x00\x01", "too short to hold a MIDI header"),
}


@pytest.mark.parametrize("case", sorted(MIDI_CASES) + ["truncated"])
def test_a_corrupt_midi_file_says_what_is_wrong(maestro_dir, tmp_path, case):
    path = tmp_path / "bad.mid"
    if case == "truncated":
        path.write_bytes((maestro_dir / "Maestro_1.mid").read_bytes()[:3000])
        message = "truncated or corrupt: invalid chunk length"
    else:
        content, message = MIDI_CASES[case]
        path.write_bytes(content)
    with pytest.raises(MidiReadError) as exc:
        read_midi(path)
    assert message.lower() in exc.value.reason.lower() and "MiniMidi" not in str(exc.value)


@pytest.mark.parametrize("n_files", [1, 2])
def test_importing_one_or_two_files_gives_a_dataset_that_loads(maestro_dir, tmp_path, n_files,
                                                               capsys):
    folder = tmp_path / "midi"
    folder.mkdir()
    for name in ("Maestro_1.mid", "Maestro_2.mid")[:n_files]:
        shutil.copy(maestro_dir / name, folder)
    assert import_midi.main([str(folder), str(tmp_path / "ds")]) == 0
    assert f"only {n_files} usable file(s)" in capsys.readouterr().out
    loaded = datasets.load_from_disk(str(tmp_path / "ds"))
    assert {s: len(loaded[s]) for s in loaded} == {"train": n_files, "validation": 1, "test": 1}


def test_a_refused_pickle_message_is_plain_text(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "x": Payload()}, path, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(CheckpointError) as exc:
        load_torch_checkpoint(path)
    message = str(exc.value)
    assert "refused to load" in message and "\x1b" not in message
    # what torch refused, without its advice to load with weights_only=False (cut off before)
    assert "(Unsupported operand 149)" in message and "weights_only" not in message


def test_converting_onto_a_file_is_refused(reference_checkpoint, tmp_path):
    from converters import torch_to_jax

    pt, _ = reference_checkpoint()
    target = tmp_path / "not-a-dir"
    target.write_text("mine")
    with pytest.raises(SystemExit) as exc:
        torch_to_jax.main([str(pt), str(target)])
    assert str(exc.value.code).startswith("error: ") and "is a file" in str(exc.value.code)
    assert target.read_text() == "mine"
