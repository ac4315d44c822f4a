"""Earlier generations: found by their tokens.json, newest first, zipped whole."""

from __future__ import annotations

import io
import json
import os
import zipfile

from piano_gpt_jax.app import history


def test_entries_newest_first_and_one_zip_each(tmp_path):
    for i, name in enumerate(("generations/20261205-1", "grids/g/bach-seed0", ".scratch-x")):
        folder = tmp_path / name
        folder.mkdir(parents=True)
        (folder / "tokens.json").write_text(json.dumps({
            "checkpoint": "runs/tiny", "request": {"task": "continuation", "seed": i},
            "samples": [{"ids": [1]}]}))
        (folder / "combined_0.wav").write_bytes(b"RIFF")
        os.utime(folder / "tokens.json", (1000 + i, 1000 + i))
    (tmp_path / "generations" / "broken").mkdir()
    (tmp_path / "generations" / "broken" / "tokens.json").write_text("{")
    found = history.entries(tmp_path)
    assert [e.path.name for e in found] == ["bach-seed0", "20261205-1"]  # scratch, broken: no
    assert found[0].request["seed"] == 1 and found[0].samples == 1
    assert "continuation" in found[0].title and found[0].files(".wav")[0].name == "combined_0.wav"
    names = zipfile.ZipFile(io.BytesIO(history.zip_bytes(found[1].path))).namelist()
    assert sorted(names) == ["combined_0.wav", "tokens.json"]
    assert history.entries(tmp_path / "missing") == []
