"""Corpus scale: prepare a corpus of N notes, start the real trainer on it with W loader workers.

    python benchmarks/data_scale.py --notes 10_000_000 --workers 4
    python benchmarks/data_scale.py --notes 300_000_000 --workers 8 --work /big/disk/bench
    python benchmarks/data_scale.py --dataset path/to/saved_dataset --workers 2

Without --dataset, a synthetic corpus of --notes notes is written first (hub schema, save_to_disk):
piece lengths log-normal around 3,000 notes; onset gaps, durations, pitch and velocity drawn to
match the MAESTRO files' statistics (30% chord onsets, ~10 notes/s, a few long pauses; durations
log-normal around 0.23 s): 5.2 tokens per note, against 5.04 for MAESTRO's train split.

Then, each in a subprocess whose whole process tree (trainer + loader workers) is sampled:
1. `python -m piano_gpt_jax.data.prepare` for the stage: notes/s, peak RSS;
2. the tiny preset's trainer on the corpus for a few steps: time to the first update after start,
   peak private memory (RssAnon + RssShmem, summed over the tree; mapped files and page cache are
   not private and not counted);
3. the same trainer started again with more steps, killed with SIGKILL after its first update,
   and started once more: time to the first update when resuming;
then, in this process, the loader's records/s with W workers against what a step needs at the
tiny shape (its measured CPU step) and at the GPU recipe's shape (context 2048, batch 32; the
H100 step measured earlier: 31.5 ms per 8 x 2048 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
H100_SECONDS_PER_TOKEN = 0.0315 / (8 * 2048)
GPU_SHAPE = (32, 2048)  # batch, context of configs/piano.py
COMPOSERS = ["Frédéric Chopin", "Johann Sebastian Bach", "Wolfgang Amadeus Mozart",
             "Franz Liszt", "Ludwig van Beethoven", "Claude Debussy"]


# ------------------------------------------------------------------ the synthetic corpus


def _piece_lengths(n_notes: int, rng: np.random.Generator) -> np.ndarray:
    lengths = np.clip(rng.lognormal(np.log(3000), 0.6, n_notes // 1000 + 10), 200, 20000)
    lengths = lengths.astype(np.int64)
    cut = int(np.searchsorted(np.cumsum(lengths), n_notes))
    lengths = lengths[: cut + 1]
    lengths[-1] -= int(lengths.sum()) - n_notes
    return lengths[lengths >= 2]


def _pieces(lengths: np.ndarray, first: int, rng: np.random.Generator):
    from piano_gpt_jax.data.piano_dataset import make_piano_dataset

    total = int(lengths.sum())
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    # MAESTRO's train split: 19% of onsets within 5 ms of the previous one (chords), 46% within
    # 30 ms, mean 98 ms; durations median 0.23 s, mean 0.46 s; 10 notes/s.
    chord = rng.random(total) < 0.3
    ioi = np.where(chord, rng.uniform(0, 0.015, total), rng.gamma(1.2, 0.11, total))
    ioi[rng.random(total) < 0.0005] += rng.uniform(4.5, 9.0)  # a few pauses to split on
    onset = np.cumsum(ioi)
    onset -= np.repeat(onset[np.cumsum(lengths) - lengths], lengths)
    duration = np.clip(rng.lognormal(np.log(0.23), 1.0, total), 0.02, 8.0)
    centre = np.repeat(rng.normal(64, 6, len(lengths)), lengths)
    pitch = np.clip(np.rint(centre + rng.normal(0, 11, total)), 21, 108).astype(np.int64)
    velocity = np.clip(np.rint(rng.normal(64, 18, total)), 1, 127).astype(np.int64)
    cols = {"pitch": pitch, "velocity": velocity, "start": onset, "end": onset + duration,
            "duration": duration}
    pieces, sources = [], []
    for i, (a, n) in enumerate(zip(starts[np.cumsum(lengths) - lengths], lengths, strict=True)):
        pieces.append({k: v[a:a + n] for k, v in cols.items()})
        sources.append(json.dumps({"composer": COMPOSERS[(first + i) % len(COMPOSERS)],
                                   "title": f"synthetic {first + i}", "dataset": "maestro"}))
    return make_piano_dataset(pieces, sources)


def make_corpus(path: Path, n_notes: int, seed: int = 0) -> Path:
    """A saved DatasetDict of ~n_notes train notes (validation and test: 0.5% each, 20k-2M),
    written chunk by chunk so memory stays bounded."""
    import datasets

    if (path / "dataset_dict.json").is_file():
        return path
    rng = np.random.default_rng(seed)
    tmp = Path(tempfile.mkdtemp(prefix="chunks-", dir=path.parent))
    started = time.perf_counter()
    splits = {}
    small = int(np.clip(n_notes // 200, 20_000, 2_000_000))
    for split, notes in (("train", n_notes), ("validation", small), ("test", small)):
        lengths = _piece_lengths(notes, rng)
        parts, first = [], 0
        for a in range(0, len(lengths), 1000):
            chunk = _pieces(lengths[a:a + 1000], first, rng)
            chunk.save_to_disk(str(tmp / f"{split}-{a}"))
            parts.append(datasets.load_from_disk(str(tmp / f"{split}-{a}")))
            first += len(lengths[a:a + 1000])
        splits[split] = datasets.concatenate_datasets(parts)
    datasets.disable_progress_bars()
    dd = datasets.DatasetDict(splits)
    dd.save_to_disk(str(path), num_shards={s: max(1, len(d) // 2000) for s, d in splits.items()})
    shutil.rmtree(tmp)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"corpus: {n_notes:,} train notes in {len(splits['train']):,} pieces, "
          f"{size / 1e9:.2f} GB on disk, written in {time.perf_counter() - started:.0f} s")
    return path


# ------------------------------------------------------------------ process-tree memory


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(entry))
    return kids


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssShmem"):
                    out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


class TreeMemory(threading.Thread):
    """Samples a process and its descendants every 0.2 s: peak private memory over the tree,
    peak RSS of the root process, and the most processes seen."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peak_private = self.peak_root_rss = self.peak_tree_rss = self.most_processes = 0
        self.per_process: dict[int, int] = {}  # pid -> its peak private bytes

    def run(self) -> None:
        while not self.stop.is_set():
            kids, tree, todo = _children(), [], [self.pid]
            while todo:
                pid = todo.pop()
                tree.append(pid)
                todo.extend(kids.get(pid, []))
            stats = [_status_kb(p) for p in tree]
            for pid, st in zip(tree, stats, strict=True):
                mine = (st.get("RssAnon", 0) + st.get("RssShmem", 0)) * 1024
                self.per_process[pid] = max(self.per_process.get(pid, 0), mine)
            private = sum(s.get("RssAnon", 0) + s.get("RssShmem", 0) for s in stats) * 1024
            self.peak_private = max(self.peak_private, private)
            self.peak_tree_rss = max(self.peak_tree_rss,
                                     sum(s.get("VmRSS", 0) for s in stats) * 1024)
            self.peak_root_rss = max(self.peak_root_rss, stats[0].get("VmRSS", 0) * 1024)
            self.most_processes = max(self.most_processes, len(tree))
            time.sleep(0.2)


def run_measured(args: list[str], env: dict, until: str | None = None,
                 kill_after: str | None = None, timeout: float = 3600) -> dict:
    """Run a command, sampling its tree; seconds until a line containing `until` appears (from
    the start of the process), and SIGKILL of the tree once `kill_after` appears."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    memory = TreeMemory(proc.pid)
    memory.start()
    seen, lines = None, []
    for line in proc.stdout:
        lines.append(line.rstrip())
        if until and seen is None and until in line:
            seen = time.perf_counter() - started
        if kill_after and kill_after in line:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        if time.perf_counter() - started > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    memory.stop.set()
    memory.join()
    return {"rc": proc.returncode, "seconds": time.perf_counter() - started, "until": seen,
            "peak_private": memory.peak_private, "peak_root_rss": memory.peak_root_rss,
            "peak_tree_rss": memory.peak_tree_rss, "processes": memory.most_processes,
            "per_process": sorted(memory.per_process.values(), reverse=True),
            "lines": lines}


# ------------------------------------------------------------------ the loader


def loader_rate(corpus: str, stage: str, batch: int, context: int, workers: int,
                prepared_dir: str, batches: int) -> float:
    from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
    from piano_gpt_jax.data.settings import DataSettings

    s = DataSettings(stage=stage, base_dataset_name=corpus, batch_size=batch,
                     context_size=context, notes_per_record=128 if context >= 1024 else 48,
                     data_workers=workers, use_time_steps=False, prepared_dir=prepared_dir)
    p = make_pipeline(s, build_tokenizer(s), progress=False)
    it = p.train_iterator()
    # Workers started, their buffers (2 + 8 prefetched batches each) full: take as many as are
    # buffered first, then time a run several times longer, so the rate is the workers' own.
    for _ in range(12 * max(workers, 1)):
        next(it)
    batches = max(batches, 60 * max(workers, 1))
    started = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch / (time.perf_counter() - started)


def _needs(tiny_step_seconds: float) -> list[tuple[tuple[int, int], float]]:
    """(batch, context) and the records/s a step consumes there: the tiny preset at its measured
    CPU step time, the GPU recipe at the H100's measured step time."""
    gpu = GPU_SHAPE[0] / (H100_SECONDS_PER_TOKEN * GPU_SHAPE[0] * GPU_SHAPE[1])
    return [((16, 256), 16 / tiny_step_seconds), (GPU_SHAPE, gpu)]


def report_loader(a: argparse.Namespace, corpus: Path, prepared: Path,
                  tiny_step_seconds: float) -> None:
    for shape, need in _needs(tiny_step_seconds):
        rate = loader_rate(str(corpus), a.stage, *shape, a.workers, str(prepared),
                           a.loader_batches)
        print(f"loader ({a.stage}, batch {shape[0]} x context {shape[1]}, {a.workers} "
              f"workers): {rate:,.0f} records/s; the step needs {need:,.0f} -> "
              f"{rate / need:.1f}x")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--notes", type=lambda s: int(s.replace("_", "")), default=10_000_000)
    ap.add_argument("--dataset", help="a saved piano dataset instead of a synthetic one")
    ap.add_argument("--workers", type=int, default=4, help="Grain loader workers")
    ap.add_argument("--stage", default="next_token_pretraining",
                    choices=["next_token_pretraining", "piano_task"])
    ap.add_argument("--work", default=str(REPO / "out" / "data_scale"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--loader-batches", type=int, default=200)
    ap.add_argument("--only-loader", type=float, metavar="STEP_SECONDS",
                    help="skip preparation and the trainer (the corpus must be prepared): time "
                         "the loader against this tiny-preset step time")
    ap.add_argument("--skip-loader", action="store_true")
    ap.add_argument("--prepare-in-trainer", action="store_true",
                    help="no separate prepare command: the first trainer start prepares")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from benchmarks.xla_cpu_flags import cpu_flags

    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    corpus = Path(a.dataset) if a.dataset else make_corpus(work / f"corpus-{a.notes}", a.notes)
    prepared = work / "prepared"
    run_dir = work / f"run-{a.stage}-{a.workers}w"
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    common = ["--config", "configs/piano.py:tiny", f"--config.dataset.base_dataset_name={corpus}",
              f"--config.stage={a.stage}", f"--config.dataset.prepared_dir={prepared}"]
    if a.stage == "next_token_pretraining":
        common.append("--config.loss_masking=pretraining")
    print(f"CPU: {cpu_flags()}; {os.cpu_count()} cores")

    train = [sys.executable, "-m", "piano_gpt_jax.train", *common,
             f"--config.out_dir={run_dir}", f"--config.system.data_workers={a.workers}",
             "--config.eval_interval=1000000", "--config.eval_iters=1",
             "--config.lr.warmup_iters=1"]
    if a.only_loader:
        report_loader(a, corpus, prepared, a.only_loader)
        return 0
    if not a.prepare_in_trainer:
        prep = run_measured([sys.executable, "-m", "piano_gpt_jax.data.prepare", *common], env)
        if prep["rc"] != 0:
            print("\n".join(prep["lines"][-20:]))
            return 1
        report = next(i for i, ln in enumerate(prep["lines"]) if ln.startswith("split "))
        print("\n".join(prep["lines"][report:]))
        print(f"prepare command: {prep['seconds']:.1f} s; peak RSS {_gb(prep['peak_root_rss'])} "
              f"(main process), {_gb(prep['peak_tree_rss'])} over {prep['processes']} "
              f"processes (mapped dataset pages included); private {_gb(prep['peak_private'])}")
    first = run_measured(train + [f"--config.optimizer.max_iters={a.steps}"], env,
                         until="first update done")
    if first["rc"] != 0:
        print("\n".join(first["lines"][-20:]))
        return 1
    kind = "tokens" if "next" in a.stage else "notes"
    store = next(p for p in prepared.glob(f"{corpus.name}.train.{kind}-*")
                 if p.is_dir() and (p / "manifest.json").is_file())
    manifest = json.loads((store / "manifest.json").read_text())
    n_notes, seconds = manifest["n_notes"], manifest["prepare_seconds"]
    store_bytes = sum(manifest["files"].values())
    print(f"preparation of the train split: {seconds} s, {n_notes / seconds:,.0f} notes/s")
    print(f"disk: train store {store_bytes / n_notes:.2f} bytes per note ({_gb(store_bytes)}; "
          f"{manifest['n_tokens']:,} tokens; the dataset: "
          f"{sum(f.stat().st_size for f in corpus.rglob('*.arrow')) / n_notes:.1f} bytes per note)")
    killed = run_measured(train + ["--config.optimizer.max_iters=100000"], env,
                          until="first update done", kill_after="first update done")
    if killed["until"] is None:
        print("\n".join(killed["lines"][-20:]))
        return 1
    resumed = run_measured(train + [f"--config.optimizer.max_iters={2 * a.steps}"], env,
                           until="first update done")
    first_label = "that prepares" if a.prepare_in_trainer else "after preparation"
    for label, r in ((first_label, first), ("second start, then kill -9", killed),
                     ("resuming after kill -9", resumed)):
        print(f"trainer, {label}: first update {r['until'] or float('nan'):.1f} s after start; "
              f"peak private memory {_gb(r['peak_private'])} over up to {r['processes']} "
              f"processes (trainer + {a.workers} workers; per process "
              f"{', '.join(f'{b / 1e9:.2f}' for b in r['per_process'][:a.workers + 1])} GB); "
              f"root RSS {_gb(r['peak_root_rss'])}")
    steps = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"step_time_s"' in ln]
    tiny_step = float(np.median([s["step_time_s"] for s in steps])) if steps else float("nan")
    if not a.skip_loader:
        report_loader(a, corpus, prepared, tiny_step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
