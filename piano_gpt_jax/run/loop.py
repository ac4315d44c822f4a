"""The training run: resolve the start point → build the state → run the loop → write the
checkpoints (with their metadata) and the PyTorch exports.

Steps are counted in optimizer updates (1..optimizer.max_iters), each of
optimizer.gradient_accumulation_steps micro-batches. Evaluation runs at step 0 (the untrained
baseline), at every multiple of eval_interval and at the end; every evaluation after step 0 also
writes a checkpoint. The loop never waits on the device except at log, check and eval steps (and
once after the first update, to report compile time), so the host keeps feeding batches while the
device computes.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from piano_gpt_jax import out_dir as out_dir_lib
from piano_gpt_jax.checkpoints import CheckpointRecord, RunMeta, TrainCheckpointer
from piano_gpt_jax.checkpoints.run_dir import has_steps
from piano_gpt_jax.config import TrainConfig
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.jitted_steps import compile_steps, make_eval_step, make_train_step, shard_batch
from piano_gpt_jax.model import ModelConfig, count_params
from piano_gpt_jax.optim import lr_at, make_optimizer
from piano_gpt_jax.precision import Precision
from piano_gpt_jax.run import saving
from piano_gpt_jax.run import start as start_lib
from piano_gpt_jax.run.errors import (
    CheckpointWriteError,
    Interrupted,
    NonFiniteLoss,
    UsageError,
)
from piano_gpt_jax.run.processes import stop_agreed
from piano_gpt_jax.run.validation import evaluate_losses
from piano_gpt_jax.run_log import METRICS_FILE, RunLog, flops_per_token, mfu, truncate_metrics
from piano_gpt_jax.sharding import FSDP_AXIS, bytes_per_device, unsharded_matrices


def train(cfg: TrainConfig) -> dict:
    """Train to optimizer.max_iters (resuming when out_dir holds checkpoints); returns a summary.

    A run stopped before it wrote anything leaves no out_dir behind.
    """
    out_dir = Path(cfg.out_dir)
    created = not out_dir.exists()
    try:
        return _train(cfg)
    except BaseException:
        if created:
            out_dir_lib.remove_if_empty(out_dir)
        raise


def _train(cfg: TrainConfig) -> dict:
    started = time.perf_counter()
    run = _open_run(cfg)
    try:
        run.announce()
        summary = _run_loop(run, started)
        saving.checkpoint_io(run.ckpt.wait, run.progress.step, run.ckpt, run.out_dir)
        if run.ckpt.latest_step() is not None:
            saving.export_models(run.ckpt, run.state, run.model_config, cfg, run.out_dir,
                                 run.run_log, write=run.main_process)
    except CheckpointWriteError:
        run.run_log.close()
        raise  # without ckpt.close(): train.main ends the process (see CheckpointWriteError)
    except BaseException:
        saving.close_quietly(run.ckpt)
        run.run_log.close()
        raise
    saving.close_quietly(run.ckpt)
    run.run_log.close()
    return {**summary, "step": run.progress.step, "total_tokens": run.progress.total_tokens,
            "best_val_loss": run.progress.best_val}


@dataclasses.dataclass
class _Run:
    """Everything the loop needs, built once by _open_run; `state` and `progress` advance."""

    cfg: TrainConfig
    out_dir: Path
    mesh: Any
    precision: Precision
    ckpt: TrainCheckpointer
    start: start_lib.Start
    notes: list[str]
    settings: DataSettings
    pipeline: Any
    tokenizer: Any
    model_config: ModelConfig
    state: dict
    progress: start_lib.Progress
    iterator: Any
    train_fn: Any
    eval_fn: Any
    eval_batches: dict[str, list]
    run_log: RunLog
    main_process: bool

    @property
    def tokens_per_step(self) -> int:
        return (self.settings.batch_size * self.settings.context_size
                * self.cfg.optimizer.gradient_accumulation_steps)

    @property
    def n_devices(self) -> int:
        return int(self.mesh.devices.size)

    def announce(self) -> None:
        """The run's first lines: the notes gathered at start, the model, data and layout."""
        cfg, s = self.cfg, self.settings
        for note in self.notes:
            self.run_log.note(note)
        n_params = count_params(self.state["params"], include_position=False)
        self.run_log.note(
            f"model: {n_params / 1e6:.2f}M params ({self.start.source}); vocab "
            f"{self.tokenizer.vocab_size}; {self.n_devices} x {jax.devices()[0].device_kind}; "
            f"global batch {s.batch_size} x {cfg.optimizer.gradient_accumulation_steps} x "
            f"{s.context_size} tokens; dtype {cfg.system.dtype}; eval splits "
            f"{self.pipeline.eval_split_names}"
            + (f"; prompt layout {self.pipeline.prompt_layout}"
               if s.stage == "piano_task" else ""))
        self.run_log.note(_layout_line(self.mesh, self.state, cfg))
        init = self.start.init
        if self.start.resumed is not None:
            self.run_log.note(f"resumed from {self.out_dir}/checkpoints/{self.start.resume_step}")
        elif init is not None and init.optimizer is not None:
            self.run_log.note(
                f"init_optimizer: continuing {cfg.init_from} at step {self.progress.step} "
                f"(Adam step {init.optimizer.count}, {self.progress.total_tokens:,} tokens)")
            differences = start_lib.optimizer_differences(init.optimizer, cfg)
            if differences:
                self.run_log.note(differences)

    def evaluate(self, at_step: int, train_losses: list) -> dict[str, float]:
        """Validation losses of the current weights, logged; returns the eval event."""
        losses = evaluate_losses(self.eval_fn, self.state["params"], self.eval_batches)
        event = {"step": at_step,
                 "val_loss": losses.get("full_val", next(iter(losses.values()))),
                 **{f"val_loss/{k}": v for k, v in losses.items()},
                 "lr": lr_at(self.cfg.optim, at_step), "tokens": self.progress.total_tokens}
        if train_losses:
            event["train_loss"] = float(np.mean([float(x) for x in train_losses]))
        self.run_log.event({"event": "eval", **event})
        self.run_log.note(f"eval step {at_step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in losses.items())
            + (f", train {event['train_loss']:.4f}" if train_losses else ""))
        return event

    def checkpoint_meta(self, at_step: int, event: dict) -> RunMeta:
        """What a checkpoint says about its run (and what a resume continues from)."""
        progress = self.progress
        return RunMeta(
            step=at_step, total_tokens=progress.total_tokens,
            train_loss=event.get("train_loss"), val_loss=event.get("val_loss"),
            val_losses={k.split("/", 1)[1]: v for k, v in event.items()
                        if k.startswith("val_loss/")},
            best_val_loss=progress.best_val if math.isfinite(progress.best_val) else None,
            run_name=self.out_dir.name, config=dict(self.cfg.raw), n_devices=self.n_devices,
            prompt_layout=(self.pipeline.prompt_layout if self.settings.stage == "piano_task"
                           else None),
            wandb_id=progress.wandb_id or out_dir_lib.stable_run_id(self.out_dir),
            wandb_ran=self.run_log.wandb_id is not None,
            source=self.cfg.init_from if self.start.init is not None else None)

    def save(self, at_step: int, event: dict | None) -> None:
        """Checkpoint the state at `at_step` (asynchronously; `event` = its evaluation)."""
        event = event or {}
        record = CheckpointRecord(self.model_config, {}, self.tokenizer.to_dict(),
                                  self.checkpoint_meta(at_step, event))
        saving.checkpoint_io(
            lambda: self.ckpt.save(at_step, self.state, record, self.iterator.get_state(),
                                   event.get("val_loss")),
            at_step, self.ckpt, self.out_dir)


def _open_run(cfg: TrainConfig) -> _Run:
    """Resolve the start point, build the data, state, compiled steps and the run log."""
    main_process = jax.process_index() == 0
    try:
        out_dir = out_dir_lib.prepare(cfg.out_dir)
    except out_dir_lib.OutDirError as e:
        raise UsageError(str(e)) from None
    mesh = start_lib.run_mesh(cfg)
    tx, precision = make_optimizer(cfg.optim), Precision(cfg.system.dtype)
    notes: list[str] = start_lib.schedule_notes(cfg)
    guarded = False
    if not has_steps(out_dir):  # nothing to resume: protect an earlier run before writing
        notes += start_lib.guard_new_run(out_dir, cfg, main_process)
        guarded = True
    ckpt = TrainCheckpointer(out_dir, cfg.checkpoint.keep_last)
    try:
        start = start_lib.resolve_start(cfg, ckpt, mesh, tx, precision, notes)
        if start.resumed is None and not guarded:  # every checkpoint was damaged
            start_lib.refuse_lost_run(out_dir, ckpt.set_aside_steps, cfg.overwrite)
            notes += start_lib.guard_new_run(out_dir, cfg, main_process)
        settings, tokenizer = start_lib.build_tokenizer_for(cfg, start.tokenizer_desc)
        model_config = start_lib.model_config_for(cfg, tokenizer.vocab_size, start.arch)
        start_lib.check_compatible(model_config, tokenizer, cfg, start.source)
        start_lib.check_memory(cfg, model_config, mesh)  # before any data is read or compiled
        pipeline = start_lib.build_pipeline(settings, tokenizer)
        state, progress, data_state = start_lib.initial_state(cfg, start, model_config, tx,
                                                              precision, mesh)
        iterator = start_lib.train_iterator(pipeline, data_state)
        train_fn, eval_fn = compile_steps(make_train_step(model_config, tx, precision),
                                          make_eval_step(model_config), mesh,
                                          use_jit=cfg.system.compile, state_like=state)
        eval_batches = start_lib.eval_batches(cfg, pipeline, mesh)
        if main_process:
            truncate_metrics(out_dir / METRICS_FILE, start.resume_step)
        run_log = RunLog(out_dir, total_steps=cfg.optimizer.max_iters, start_step=progress.step,
                         main_process=main_process, wandb_settings=_wandb_settings(cfg, out_dir),
                         run_config=dict(cfg.raw))
    except BaseException:
        ckpt.close()
        raise
    progress.wandb_id = run_log.wandb_id or progress.wandb_id
    return _Run(cfg, out_dir, mesh, precision, ckpt, start, notes, settings, pipeline,
                tokenizer, model_config, state, progress, iterator, train_fn, eval_fn,
                eval_batches, run_log, main_process)


def _wandb_settings(cfg: TrainConfig, out_dir: Path) -> dict | None:
    if not cfg.logging.wandb_log:
        return None
    return {"project": cfg.logging.wandb_project, "entity": cfg.logging.wandb_entity,
            "name": out_dir.name, "id": out_dir_lib.wandb_id_for_logging(out_dir),
            "dir": str(out_dir)}


@dataclasses.dataclass
class _Speed:
    """Tokens per second, MFU and the loader's share of the time between two log lines
    (evaluations excluded)."""

    flops_per_token: float
    device_kind: str
    since_time: float
    since_step: int
    data_seconds: float = 0.0  # host time spent fetching and placing batches since `since_time`

    def restart(self, step: int) -> None:
        self.since_time, self.since_step = time.perf_counter(), step
        self.data_seconds = 0.0

    def measure(self, step: int, tokens_per_step: int, n_devices: int) -> tuple:
        now = time.perf_counter()
        elapsed = max(now - self.since_time, 1e-9)
        dt = elapsed / max(step - self.since_step, 1)
        data_share = self.data_seconds / elapsed
        self.since_time, self.since_step, self.data_seconds = now, step, 0.0
        tps = tokens_per_step / dt
        return dt, tps, mfu(tps, self.flops_per_token, self.device_kind, n_devices), data_share


def _run_loop(run: _Run, started: float) -> dict:
    """Updates from run.progress.step to max_iters, with logging, evaluation, checkpoints,
    the non-finite guard and stop requests; returns the first and last validation loss.

    The host waits for the device only at log, check and eval steps, and once after the first
    update (to report compile time and time-to-first-step)."""
    cfg, progress = run.cfg, run.progress
    mc = run.model_config
    speed = _Speed(flops_per_token(count_params(run.state["params"], include_position=False),
                                   mc.n_layer, mc.n_head, mc.head_dim,
                                   run.settings.context_size),
                   jax.devices()[0].device_kind, time.perf_counter(), progress.step)
    summary: dict[str, Any] = {"first_val_loss": None, "last_val_loss": None}
    if progress.step == 0:
        summary["first_val_loss"] = run.evaluate(0, [])["val_loss"]
    losses_since_eval: list = []
    # Consecutive updates with a non-finite loss, counted on the device: read only at checks.
    nonfinite = jnp.zeros((), jnp.int32)
    check_every = max(1, min(cfg.logging.log_interval, cfg.nonfinite_patience))
    last_saved = run.start.resume_step
    first_update = True
    speed.restart(progress.step)
    with _StopRequest() as stop:
        while progress.step < cfg.optimizer.max_iters:
            step_losses, metrics, compile_span = _update(run, speed)
            progress.step += 1
            step = progress.step
            if first_update:
                first_update = False
                _note_startup(run, step, started, compile_span, metrics)
                # Compilation stays out of tokens/s: the first interval starts once it is done.
                speed.restart(step - 1)
                speed.since_time = compile_span[1]
            progress.total_tokens += run.tokens_per_step
            step_loss = sum(step_losses) / len(step_losses)
            nonfinite = jnp.where(jnp.isfinite(step_loss), 0, nonfinite + 1)
            losses_since_eval.append(step_loss)
            run.run_log.advance()
            is_eval = step % cfg.eval_interval == 0 or step == cfg.optimizer.max_iters
            bad = 0
            if is_eval or step % check_every == 0:
                bad = int(nonfinite)
                if bad >= cfg.nonfinite_patience:
                    _stop_nonfinite(step, bad, cfg, run.ckpt)
            if step % cfg.logging.log_interval == 0 or step == cfg.optimizer.max_iters:
                _log_train(run, step, float(step_loss), metrics, speed)  # float() blocks
            if is_eval:
                event = run.evaluate(step, losses_since_eval)
                losses_since_eval = []
                summary["last_val_loss"] = event["val_loss"]
                if math.isfinite(event["val_loss"]):
                    progress.best_val = min(progress.best_val, event["val_loss"])
                if bad:  # never a checkpoint of weights a non-finite update produced
                    run.run_log.note(f"not saving checkpoint {step}: the loss of the last {bad} "
                                     "update(s) was not finite")
                else:
                    run.save(step, event)
                    last_saved = step
                speed.restart(step)  # evaluations stay out of tokens/s
            if stop_agreed(stop.signal_name is not None, step, cfg):
                if last_saved != step:
                    run.save(step, None)  # no evaluation: never the best, but resumable
                saving.checkpoint_io(run.ckpt.wait, step, run.ckpt, run.out_dir)
                raise Interrupted(
                    f"interrupted ({stop.signal_name or 'by another process'}) at step "
                    f"{step}; checkpoint {step} is written: run the same command to resume.")
    return summary


def _update(run: _Run, speed: _Speed) -> tuple[list, dict, tuple[float, float]]:
    """One optimizer update over its micro-batches: (their losses, the last metrics, (start, end)
    of the first step call, which on the first update is the trace and compile)."""
    losses = []
    first_call = (0.0, 0.0)
    for micro in range(run.cfg.optimizer.gradient_accumulation_steps):
        fetch_start = time.perf_counter()
        batch = shard_batch(next(run.iterator), run.mesh)
        dispatch_start = time.perf_counter()
        speed.data_seconds += dispatch_start - fetch_start
        run.state, metrics = run.train_fn(run.state, batch)
        if micro == 0:
            first_call = (dispatch_start, time.perf_counter())
        losses.append(metrics["loss"])
    return losses, metrics, first_call


def _note_startup(run: _Run, step: int, started: float, compile_span: tuple[float, float],
                  metrics: dict) -> None:
    jax.block_until_ready(metrics["loss"])  # the one wait outside log/check/eval steps
    first = time.perf_counter() - started
    compile_seconds = compile_span[1] - compile_span[0]
    run.run_log.note(f"first update done {first:.1f} s after start (compiling the train step: "
                     f"{compile_seconds:.1f} s)")
    run.run_log.event({"event": "startup", "step": step, "first_update_s": first,
                       "compile_s": compile_seconds})


def _log_train(run: _Run, step: int, loss: float, metrics: dict, speed: _Speed) -> None:
    dt, tps, mfu_value, data_share = speed.measure(step, run.tokens_per_step, run.n_devices)
    lr = lr_at(run.cfg.optim, step)
    # Loading runs on the host while the device works on the previous update (async dispatch),
    # so this is the host's time in the loader, an upper bound on what it delays the step.
    extra = f" | data {100 * data_share:.0f}%"
    if run.precision.loss_scaling:
        extra += f" | scale {float(metrics['loss_scale']):.0f}"
    run.run_log.train_line(step, loss, lr, tps, dt, mfu_value, extra)
    run.run_log.event({"event": "train", "step": step, "train_loss": loss, "lr": lr,
                       "tokens": run.progress.total_tokens, "tokens_per_s": tps,
                       "step_time_s": dt, "mfu": mfu_value, "data_share": data_share})


def _stop_nonfinite(step: int, bad: int, cfg: TrainConfig, ckpt: TrainCheckpointer) -> None:
    ckpt.wait()
    last = ckpt.latest_step()
    where = (f"the last checkpoint, step {last}, is from before it" if last is not None
             else "no checkpoint was written")
    raise NonFiniteLoss(
        f"the training loss was not finite for the last {bad} update(s) (step {step}); stopped "
        f"without saving them: {where}. Lower lr.learning_rate or raise optimizer.grad_clip / "
        "use float32, then run the same command (it resumes from that checkpoint); "
        f"nonfinite_patience={cfg.nonfinite_patience} sets how many such updates are tolerated.")


def _layout_line(mesh, state: dict, cfg: TrainConfig) -> str:
    """The mesh, where the parameters live and what one device holds: the numbers to check
    before a long run."""
    shape = " x ".join(f"{name} {size}" for name, size in mesh.shape.items())
    params_b = bytes_per_device(state["params"])
    rest_b = bytes_per_device({k: v for k, v in state.items() if k != "params"})
    layout = "sharded (fsdp)" if cfg.system.param_sharding == "fsdp" else "replicated"
    line = (f"mesh {shape} over {jax.process_count()} process(es); parameters {layout}; per "
            f"device: params {params_b / 2**20:.1f} MiB + optimizer state {rest_b / 2**20:.1f} MiB")
    left = unsharded_matrices(state["params"], mesh.shape[FSDP_AXIS])
    if left:
        line += (f"; replicated because no dimension divides by {mesh.shape[FSDP_AXIS]}: "
                 + ", ".join(left))
    return line


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current update."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # a second Ctrl-C: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
