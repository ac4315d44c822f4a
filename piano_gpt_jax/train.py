"""The main job: `python -m piano_gpt_jax.train --config configs/piano.py[:preset] [--config.k=v]`.

Trains (or, with eval_only, evaluates) a piano GPT; see configs/piano.py for recipes, expected
results and multi-host launching. Re-running the same command with the same out_dir resumes from
the latest checkpoint and continues exactly as an uninterrupted run would: the optimizer state,
rng, loss-scale state, step counters and the data iterator position are all checkpointed.

Steps are counted in optimizer updates (1..optimizer.max_iters), each of
optimizer.gradient_accumulation_steps micro-batches of data.batch_size sequences (global, over all
devices). Evaluation runs at step 0 (the untrained baseline), at every multiple of eval_interval
and at the end; every evaluation after step 0 also writes a checkpoint.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from piano_gpt_jax import out_dir as out_dir_lib
from piano_gpt_jax.config import SCHEMA, ConfigError, TrainConfig, build_train_config, suggest_key

log = logging.getLogger("piano_gpt_jax.train")


class UsageError(Exception):
    """Stops the run with a message and exit code 2 (no traceback)."""


class CheckpointWriteError(UsageError):
    """A checkpoint could not be written (disk full, ...); orbax's background writes may still
    be failing, so the process ends without tearing them down (which only adds tracebacks)."""


# ----------------------------------------------------------------------------------- start-up
def select_platform(cfg: TrainConfig) -> None:
    """Pin JAX to system.device; must run before any backend starts."""
    import jax

    jax.config.update("jax_platforms", cfg.platform)


def check_devices(cfg: TrainConfig) -> None:
    import jax

    try:
        jax.devices()
    except Exception as e:  # noqa: BLE001 — RuntimeError, or an AssertionError from jax
        reason = (str(e).strip().splitlines()[0] if str(e).strip()
                  else f"no {cfg.platform} backend is available")
        raise UsageError(
            f"system.device asks for {cfg.platform!r} but JAX cannot use it here ({reason}). "
            "On a CPU-only machine add --config.system.device=cpu (or use the :tiny preset)."
        ) from None


def maybe_init_distributed(cfg: TrainConfig) -> None:
    """jax.distributed.initialize() for multi-process launches (see configs/piano.py docstring)."""
    import jax

    if cfg.ddp_backend == "none":
        return
    env = os.environ
    cluster = (
        "JAX_COORDINATOR_ADDRESS" in env
        or int(env.get("SLURM_NTASKS", "1")) > 1
        or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "TPU_WORKER_HOSTNAMES" in env and "," in env["TPU_WORKER_HOSTNAMES"]
    )
    if not (cfg.ddp_backend == "jax_distributed" or cluster):
        return
    kwargs: dict[str, Any] = {"initialization_timeout": cfg.ddp.timeout_s}
    where = "the cluster's coordinator"
    if "JAX_COORDINATOR_ADDRESS" in env:
        try:
            kwargs.update(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                          num_processes=int(env["JAX_NUM_PROCESSES"]),
                          process_id=int(env["JAX_PROCESS_ID"]))
        except (KeyError, ValueError) as e:
            raise UsageError(f"JAX_COORDINATOR_ADDRESS is set, so JAX_NUM_PROCESSES and "
                             f"JAX_PROCESS_ID must be integers too ({e})") from None
        where = (f"the coordinator at {kwargs['coordinator_address']} (process "
                 f"{kwargs['process_id']} of {kwargs['num_processes']})")
    if cfg.platform == "cpu":  # cross-process collectives on CPU need an implementation
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if kwargs.get("process_id"):
        # JAX aborts the whole process (no exception) when the coordinator never answers, so a
        # non-coordinator process first waits for the coordinator's port itself.
        _wait_for_coordinator(kwargs["coordinator_address"], cfg.ddp.timeout_s, where)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 — timeouts and connection errors of many kinds
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise UsageError(
            f"could not join {where} within ddp.timeout_s={cfg.ddp.timeout_s} s ({reason}); "
            "start every process of the job with the same address, or check that the "
            "coordinator (process 0) is running and reachable.") from None


def _wait_for_coordinator(address: str, timeout_s: int, where: str) -> None:
    import socket

    host, _, port = address.rpartition(":")
    deadline = time.time() + timeout_s
    while True:
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            if time.time() >= deadline:
                raise UsageError(
                    f"could not join {where} within ddp.timeout_s={timeout_s} s ({e}); start "
                    "process 0 (the coordinator) with the same JAX_COORDINATOR_ADDRESS, or "
                    "check the address and port.") from None
            time.sleep(0.5)


def check_same_config(cfg: TrainConfig) -> None:
    """Every process of a job must run the same config: compare a hash of it at start."""
    import hashlib
    import json

    import jax

    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    digest = hashlib.sha256(json.dumps(cfg.raw, sort_keys=True, default=str).encode()).digest()
    mine = np.frombuffer(digest, np.uint8)
    every = np.asarray(multihost_utils.process_allgather(mine))
    differ = [i for i, row in enumerate(every) if not np.array_equal(row, every[0])]
    if differ:
        raise UsageError(f"process(es) {differ} run a different config than process 0 (config "
                         "hashes differ); launch every process with the same command line.")


def _model_config(cfg: TrainConfig, vocab_size: int, arch: dict | None = None):
    """ModelConfig from the config (scratch) or a checkpoint's architecture (init/resume)."""
    from piano_gpt_jax.model import ModelConfig

    m = cfg.model
    if arch is None:
        arch = {**dataclasses.asdict(m), "vocab_size": vocab_size}
    keys = ("n_layer", "n_head", "n_embd", "context_size", "bias", "use_time_embedding",
            "vocab_size")
    # one_hot_embedding None = gather: benchmarks/train_step.py measured it faster than the
    # one-hot matmul on XLA:CPU at the piano vocabulary (2265 tokens); accelerators gather cheaply.
    return ModelConfig(**{k: arch[k] for k in keys}, dropout=m.dropout, dtype=cfg.system.dtype,
                       one_hot_embedding=bool(m.one_hot_embedding), attention=m.attention,
                       remat=m.remat)


def _check_compatible(model_config, tokenizer, cfg: TrainConfig, source: str) -> None:
    if tokenizer.vocab_size != model_config.vocab_size:
        raise UsageError(
            f"{source}: the model has {model_config.vocab_size} token embeddings but the tokenizer "
            f"needs {tokenizer.vocab_size} (its vocabulary plus the special tokens of stage="
            f"{cfg.stage!r}, tasks={cfg.tasks!r}). Use a checkpoint whose "
            "tokenizer has room for these tokens, or train from scratch_next_token.")
    if cfg.data.context_size > model_config.context_size:
        raise UsageError(
            f"{source}: data.context_size ({cfg.data.context_size}) exceeds the "
            f"model's context_size ({model_config.context_size}); lower data.context_size.")
    if model_config.use_time_embedding != cfg.model.use_time_embedding:
        raise UsageError(
            f"{source}: the model {'has' if model_config.use_time_embedding else 'lacks'} a "
            "music-time embedding; set --config.model.use_time_embedding="
            f"{model_config.use_time_embedding} to match it.")


def _build_data(cfg: TrainConfig, tokenizer_desc: dict | None):
    from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline

    try:
        settings = cfg.data_settings()
        tokenizer = build_tokenizer(settings, tokenizer_desc)
        pipeline = make_pipeline(settings, tokenizer)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UsageError(f"cannot build the data pipeline: {e}") from None
    return settings, tokenizer, pipeline


def _make_mesh(cfg: TrainConfig):
    """The data-parallel mesh; UsageError (not a traceback) if the batch cannot be split on it."""
    from piano_gpt_jax.sharding import check_batch_divisible, make_mesh

    mesh = make_mesh(param_sharding=cfg.system.param_sharding)
    try:
        check_batch_divisible(cfg.data.batch_size, mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return mesh


def _eval_batches(cfg: TrainConfig, pipeline, mesh) -> dict[str, list]:
    """The fixed eval_iters batches of every eval split, sharded over `mesh`."""
    from piano_gpt_jax.train_step import shard_batch

    return {s: [shard_batch(b, mesh) for b in pipeline.eval_batches(s, cfg.eval_iters)]
            for s in pipeline.eval_split_names}


def _load_init(path: str, with_optimizer: bool = False):
    from piano_gpt_jax.checkpoints import load_any_checkpoint

    try:
        return load_any_checkpoint(path, with_optimizer=with_optimizer)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        raise UsageError(f"init_from={path!r}: {e}") from None


# ----------------------------------------------------------------------------------- evaluation
def evaluate_losses(eval_fn, params, eval_batches: dict[str, list]) -> dict[str, float]:
    """Token-mean loss per split over its fixed batches."""
    out = {}
    for split, batches in eval_batches.items():
        total, count = 0.0, 0.0
        for batch in batches:
            s, n = eval_fn(params, batch)
            total, count = total + float(s), count + float(n)
        out[split] = total / count if count else float("nan")
    return out


def _format_table(rows: dict[str, float], title: str) -> str:
    width = max(len(k) for k in rows) + 2
    lines = [title, "-" * (width + 10)]
    lines += [f"{k:<{width}}{v:>10.4f}" for k, v in rows.items()]
    return "\n".join(lines)


def eval_only(cfg: TrainConfig) -> dict:
    """Load init_from (ours or a .pt) or out_dir's latest checkpoint, print a loss table."""
    import jax

    from piano_gpt_jax.sharding import place
    from piano_gpt_jax.train_step import compile_steps, make_eval_step

    source = cfg.out_dir if cfg.from_scratch else cfg.init_from
    ck = _load_init(source)
    _, tokenizer, pipeline = _build_data(cfg, ck.tokenizer_desc)
    model_config = _model_config(cfg, tokenizer.vocab_size, ck.model_config.to_dict())
    _check_compatible(model_config, tokenizer, cfg, source)
    mesh = _make_mesh(cfg)
    params = place(jax.tree_util.tree_map(np.asarray, ck.params), mesh)
    _, eval_fn = compile_steps(None, make_eval_step(model_config), mesh, use_jit=cfg.system.compile,
                               state_like={"params": params})
    losses = evaluate_losses(eval_fn, params, _eval_batches(cfg, pipeline, mesh))
    print(_format_table(losses, f"validation loss of {source} (step {ck.step}, "
                                f"{cfg.eval_iters} batches per split)"))
    result: dict[str, Any] = {"losses": losses}
    if cfg.eval_metrics:
        from piano_gpt_jax.evaluate import run_task_evaluation

        metrics = run_task_evaluation(model_config, ck.params, tokenizer, pipeline,
                                      pipeline.eval_split_names, cfg.eval_examples,
                                      seed=cfg.seed)
        for split, per_task in metrics.items():
            for task, values in per_task.items():
                print(_format_table(values, f"{split} / {task}"))
        result["metrics"] = metrics
    return result


# ----------------------------------------------------------------------------------- training
@dataclasses.dataclass
class _Start:
    """Where a run starts: its own newest restorable checkpoint, init_from, or nothing."""

    source: str
    tokenizer_desc: dict | None
    arch: dict | None  # a checkpoint's model_config; None = from the config
    resumed: tuple | None = None  # (step, state on the mesh, meta, data iterator state)
    init: Any = None  # CheckpointRecord of init_from


def _resolve_start(cfg: TrainConfig, ckpt, mesh, tx, precision, notes: list[str]) -> _Start:
    """Resume from out_dir's newest checkpoint that restores (damaged ones are moved aside),
    else start from init_from, else from the config."""
    from piano_gpt_jax.checkpoints import CheckpointError

    try:
        resumed = ckpt.restore_newest(
            lambda meta: _abstract_state(cfg, meta["model_config"], tx, precision, mesh), notes)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    if resumed is not None:
        meta = resumed[2]
        return _Start(f"{cfg.out_dir} (resuming step {resumed[0]})", meta.get("tokenizer_desc"),
                      meta["model_config"], resumed=resumed)
    if not cfg.from_scratch:
        init = _load_init(cfg.init_from, with_optimizer=cfg.init_optimizer)
        return _Start(f"init_from={cfg.init_from}", init.tokenizer_desc,
                      init.model_config.to_dict(), init=init)
    return _Start("config", None, None)


def _abstract_state(cfg: TrainConfig, arch: dict, tx, precision, mesh) -> dict:
    """The restore target of a checkpoint of architecture `arch`: shapes, dtypes, shardings.

    A checkpoint of another architecture than the config asks for stops the run here (unless
    init_from decides the architecture)."""
    import jax

    from piano_gpt_jax.model import init_params
    from piano_gpt_jax.sharding import tree_shardings
    from piano_gpt_jax.train_step import init_train_state

    model_config = _model_config(cfg, arch["vocab_size"], arch)
    if cfg.from_scratch:
        wanted = _model_config(cfg, arch["vocab_size"])
        if _arch(wanted) != _arch(model_config):
            raise UsageError(
                f"{cfg.out_dir} holds a run of a different model ({_arch(model_config)}) than "
                f"the config asks for ({_arch(wanted)}); choose a new out_dir to start a new "
                "run.")
    shapes = jax.eval_shape(lambda: init_train_state(
        init_params(model_config, jax.random.PRNGKey(0)), tx, cfg.seed, precision))
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
        tree_shardings(shapes, mesh))


def _continue_optimizer(state: dict, init, cfg: TrainConfig) -> dict:
    """`state` carrying init_from's AdamW moments, step count and schedule position."""
    import jax

    from piano_gpt_jax.optim import with_adam_state

    adam = init.optimizer
    opt_state = with_adam_state(jax.device_get(state["opt_state"]), adam.count, adam.mu, adam.nu,
                                updates_done=init.meta.step)
    micro_step = init.meta.step * cfg.optimizer.gradient_accumulation_steps
    return {**state, "opt_state": opt_state,
            "micro_step": np.asarray(micro_step, np.asarray(state["micro_step"]).dtype)}


def _note_optimizer_differences(adam, cfg: TrainConfig, run_log) -> None:
    """init_optimizer keeps our config's hyper-parameters; say where the file's differ."""
    ours = {"beta1": cfg.optimizer.beta1, "beta2": cfg.optimizer.beta2,
            "weight_decay": cfg.optimizer.weight_decay, "eps": 1e-8}
    theirs = {"beta1": adam.b1, "beta2": adam.b2, "weight_decay": adam.weight_decay,
              "eps": adam.eps}
    diffs = [f"{k} {theirs[k]:g} -> {ours[k]:g}" for k in ours
             if not math.isclose(ours[k], theirs[k], rel_tol=1e-6)]
    if diffs:
        run_log.note("init_optimizer: continuing with this config's " + ", ".join(diffs))


@dataclasses.dataclass
class _Progress:
    """The counters a run carries from start to end (and through checkpoints)."""

    step: int = 0
    total_tokens: int = 0
    best_val: float = math.inf
    wandb_id: str | None = None


def _initial_state(cfg: TrainConfig, start: _Start, model_config, tx, precision, mesh):
    """(train state on the mesh, progress, data iterator state or None) for the run's start."""
    import jax

    from piano_gpt_jax.checkpoints import RunMeta
    from piano_gpt_jax.model import init_params
    from piano_gpt_jax.sharding import place
    from piano_gpt_jax.train_step import init_train_state

    if start.resumed is not None:
        _, state, meta, data_state = start.resumed
        m = RunMeta.from_json(meta.get("metadata"))
        best = m.best_val_loss if m.best_val_loss is not None else math.inf
        return state, _Progress(m.step, m.total_tokens, best, m.wandb_id), data_state
    init = start.init
    if init is not None:
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), init.params)
    else:
        params = init_params(model_config, jax.random.PRNGKey(cfg.seed))
    state = init_train_state(params, tx, cfg.seed, precision)
    progress = _Progress()
    if init is not None and init.optimizer is not None:
        state = _continue_optimizer(state, init, cfg)
        best = init.meta.best_val_loss if init.meta.best_val_loss is not None else math.inf
        progress = _Progress(init.meta.step, init.meta.total_tokens, best)
    return place(state, mesh), progress, None


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current update."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        if self.signal_name is not None:  # a second Ctrl-C: stop now
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    """The run stopped on request after writing a checkpoint; exit code 130."""


class NonFiniteLoss(Exception):
    """Training losses stayed non-finite past the patience; exit code 3."""


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
    import jax
    import jax.numpy as jnp

    from piano_gpt_jax.checkpoints import CheckpointRecord, RunMeta, TrainCheckpointer
    from piano_gpt_jax.checkpoints.run_dir import has_steps
    from piano_gpt_jax.model import count_params
    from piano_gpt_jax.optim import lr_at, make_optimizer
    from piano_gpt_jax.precision import Precision
    from piano_gpt_jax.run_log import RunLog, flops_per_token, mfu, truncate_metrics
    from piano_gpt_jax.train_step import (
        compile_steps,
        make_eval_step,
        make_train_step,
        shard_batch,
    )

    main_process = jax.process_index() == 0
    try:
        out_dir = out_dir_lib.prepare(cfg.out_dir)
    except out_dir_lib.OutDirError as e:
        raise UsageError(str(e)) from None
    mesh = _make_mesh(cfg)
    tx, precision = make_optimizer(cfg.optim), Precision(cfg.system.dtype)
    notes: list[str] = []
    guarded = False
    if not has_steps(out_dir):  # nothing to resume: protect an earlier run before writing
        notes += _guard_new_run(out_dir, cfg, main_process)
        guarded = True
    ckpt = TrainCheckpointer(out_dir, cfg.checkpoint.keep_last)
    try:
        start = _resolve_start(cfg, ckpt, mesh, tx, precision, notes)
        if start.resumed is None and not guarded:  # every checkpoint was damaged
            notes += _guard_new_run(out_dir, cfg, main_process)
        settings, tokenizer, pipeline = _build_data(cfg, start.tokenizer_desc)
        model_config = _model_config(cfg, tokenizer.vocab_size, start.arch)
        _check_compatible(model_config, tokenizer, cfg, start.source)
        tokenizer_desc = tokenizer.to_dict()
        state, progress, data_state = _initial_state(cfg, start, model_config, tx, precision,
                                                     mesh)
        iterator = pipeline.train_iterator()
        if data_state is not None:
            iterator.set_state(data_state)
        resume_step = start.resumed[0] if start.resumed is not None else None
        init = start.init

        train_fn, eval_fn = compile_steps(make_train_step(model_config, tx, precision),
                                          make_eval_step(model_config), mesh,
                                          use_jit=cfg.system.compile, state_like=state)
        eval_batches = _eval_batches(cfg, pipeline, mesh)
        if main_process:
            truncate_metrics(out_dir / out_dir_lib.METRICS, resume_step)
        wandb_settings = None
        if cfg.logging.wandb_log:
            wandb_settings = {"project": cfg.logging.wandb_project,
                              "entity": cfg.logging.wandb_entity, "name": out_dir.name,
                              "id": out_dir_lib.wandb_id_for_logging(out_dir),
                              "dir": str(out_dir)}
        run_log = RunLog(out_dir, total_steps=cfg.optimizer.max_iters, start_step=progress.step,
                         main_process=main_process, wandb_settings=wandb_settings,
                         run_config=dict(cfg.raw))
    except BaseException:
        ckpt.close()
        raise
    for note in notes:
        run_log.note(note)
    gas = cfg.optimizer.gradient_accumulation_steps
    tokens_per_step = settings.batch_size * settings.context_size * gas
    n_params = count_params(state["params"], include_position=False)
    flops_token = flops_per_token(n_params, model_config.n_layer, model_config.n_head,
                                  model_config.head_dim, settings.context_size)
    device_kind = jax.devices()[0].device_kind
    n_devices = mesh.devices.size
    run_log.note(f"model: {n_params / 1e6:.2f}M params ({start.source}); vocab "
                 f"{tokenizer.vocab_size}; {n_devices} x {device_kind}; global batch "
                 f"{settings.batch_size} x {gas} x {settings.context_size} tokens; dtype "
                 f"{cfg.system.dtype}; eval splits {pipeline.eval_split_names}"
                 + (f"; prompt layout {pipeline.prompt_layout}"
                    if settings.stage == "piano_task" else ""))
    run_log.note(_layout_line(mesh, state, cfg))
    if resume_step is not None:
        run_log.note(f"resumed from {out_dir}/checkpoints/{resume_step}")
    elif init is not None and init.optimizer is not None:
        run_log.note(f"init_optimizer: continuing {cfg.init_from} at step {progress.step} (Adam "
                     f"step {init.optimizer.count}, {progress.total_tokens:,} tokens)")
        _note_optimizer_differences(init.optimizer, cfg, run_log)
    progress.wandb_id = run_log.wandb_id or progress.wandb_id

    def run_eval(at_step: int, train_losses: list) -> dict[str, float]:
        losses = evaluate_losses(eval_fn, state["params"], eval_batches)
        event = {"step": at_step, "val_loss": losses.get("full_val", next(iter(losses.values()))),
                 **{f"val_loss/{k}": v for k, v in losses.items()},
                 "lr": lr_at(cfg.optim, at_step), "tokens": progress.total_tokens}
        if train_losses:
            event["train_loss"] = float(np.mean([float(x) for x in train_losses]))
        run_log.event({"event": "eval", **event})
        run_log.note(f"eval step {at_step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in losses.items())
            + (f", train {event['train_loss']:.4f}" if train_losses else ""))
        return event

    def save(at_step: int, event: dict | None) -> None:
        event = event or {}
        meta = RunMeta(
            step=at_step, total_tokens=progress.total_tokens,
            train_loss=event.get("train_loss"), val_loss=event.get("val_loss"),
            val_losses={k.split("/", 1)[1]: v for k, v in event.items()
                        if k.startswith("val_loss/")},
            best_val_loss=progress.best_val if math.isfinite(progress.best_val) else None,
            run_name=out_dir.name, config=dict(cfg.raw), n_devices=int(n_devices),
            prompt_layout=pipeline.prompt_layout if settings.stage == "piano_task" else None,
            wandb_id=progress.wandb_id or out_dir_lib.stable_run_id(out_dir),
            wandb_ran=run_log.wandb_id is not None,
            source=cfg.init_from if init is not None else None)
        _checkpoint_io(lambda: ckpt.save(at_step, state,
                                         CheckpointRecord(model_config, {}, tokenizer_desc,
                                                          meta),
                                         iterator.get_state(), event.get("val_loss")),
                       at_step, ckpt, out_dir)

    summary: dict[str, Any] = {"first_val_loss": None, "last_val_loss": None}
    if progress.step == 0:
        summary["first_val_loss"] = run_eval(0, [])["val_loss"]
    losses_since_eval: list = []
    # Consecutive updates with a non-finite loss, counted on the device: read only at checks.
    nonfinite = jnp.zeros((), jnp.int32)
    check_every = max(1, min(cfg.logging.log_interval, cfg.nonfinite_patience))
    last_log_time, last_log_step = time.perf_counter(), progress.step
    last_saved = resume_step
    try:
        with _StopRequest() as stop:
            while progress.step < cfg.optimizer.max_iters:
                step_losses = []
                for _ in range(gas):
                    batch = shard_batch(next(iterator), mesh)
                    state, metrics = train_fn(state, batch)
                    step_losses.append(metrics["loss"])
                progress.step += 1
                step = progress.step
                progress.total_tokens += tokens_per_step
                step_loss = sum(step_losses) / gas
                nonfinite = jnp.where(jnp.isfinite(step_loss), 0, nonfinite + 1)
                losses_since_eval.append(step_loss)
                run_log.advance()
                is_eval = step % cfg.eval_interval == 0 or step == cfg.optimizer.max_iters
                bad = 0
                if is_eval or step % check_every == 0:
                    bad = int(nonfinite)
                    if bad >= cfg.nonfinite_patience:
                        _stop_nonfinite(step, bad, cfg, ckpt, out_dir)
                if step % cfg.logging.log_interval == 0 or step == cfg.optimizer.max_iters:
                    loss_value = float(step_loss)  # blocks: the timing below covers real work
                    now = time.perf_counter()
                    dt = (now - last_log_time) / max(step - last_log_step, 1)
                    last_log_time, last_log_step = now, step
                    tps = tokens_per_step / dt
                    mfu_value = mfu(tps, flops_token, device_kind, n_devices)
                    lr = lr_at(cfg.optim, step)
                    extra = ""
                    if precision.loss_scaling:
                        extra = f" | scale {float(metrics['loss_scale']):.0f}"
                    run_log.train_line(step, loss_value, lr, tps, dt, mfu_value, extra)
                    run_log.event({"event": "train", "step": step, "train_loss": loss_value,
                                   "lr": lr, "tokens": progress.total_tokens,
                                   "tokens_per_s": tps, "step_time_s": dt, "mfu": mfu_value})
                if is_eval:
                    event = run_eval(step, losses_since_eval)
                    losses_since_eval = []
                    summary["last_val_loss"] = event["val_loss"]
                    if math.isfinite(event["val_loss"]):
                        progress.best_val = min(progress.best_val, event["val_loss"])
                    if bad:  # never a checkpoint of weights a non-finite update produced
                        run_log.note(f"not saving checkpoint {step}: the loss of the last {bad} "
                                     "update(s) was not finite")
                    else:
                        save(step, event)
                        last_saved = step
                    last_log_time, last_log_step = time.perf_counter(), step  # evals off tok/s
                if _stop_agreed(stop.signal_name is not None, step, cfg):
                    if last_saved != step:
                        save(step, None)  # no evaluation: never the best, but resumable
                    _checkpoint_io(ckpt.wait, step, ckpt, out_dir)
                    raise Interrupted(
                        f"interrupted ({stop.signal_name or 'by another process'}) at step "
                        f"{step}; checkpoint {step} is written: run the same command to resume.")
        _checkpoint_io(ckpt.wait, progress.step, ckpt, out_dir)
        if cfg.checkpoint.export_torch and ckpt.latest_step() is not None:
            _export(ckpt, state, model_config, cfg, out_dir, run_log, write=main_process)
    except CheckpointWriteError:
        run_log.close()
        raise  # without ckpt.close(): main() ends the process (see CheckpointWriteError)
    except BaseException:
        _close_quietly(ckpt)
        run_log.close()
        raise
    _close_quietly(ckpt)
    run_log.close()
    summary.update(step=progress.step, total_tokens=progress.total_tokens,
                   best_val_loss=progress.best_val)
    return summary


def _layout_line(mesh, state: dict, cfg: TrainConfig) -> str:
    """The mesh, where the parameters live and what one device holds: the numbers to check
    before a long run."""
    import jax

    from piano_gpt_jax.sharding import FSDP_AXIS, bytes_per_device, unsharded_matrices

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


def _guard_new_run(out_dir: Path, cfg: TrainConfig, main_process: bool) -> list[str]:
    if not main_process:
        return []
    try:
        return out_dir_lib.guard_new_run(out_dir, cfg.overwrite)
    except out_dir_lib.OutDirError as e:
        raise UsageError(str(e)) from None


def _stop_agreed(requested: bool, step: int, cfg: TrainConfig) -> bool:
    """Whether to stop after this update. Several processes must agree (a checkpoint save is
    collective), so they compare their requests at log intervals, where they sync anyway."""
    import jax

    if jax.process_count() == 1:
        return requested
    if step % cfg.logging.log_interval and step != cfg.optimizer.max_iters:
        return False
    from jax.experimental import multihost_utils

    every = multihost_utils.process_allgather(np.asarray([requested], np.int32))
    return bool(np.asarray(every).any())


def _close_quietly(ckpt) -> None:
    try:
        ckpt.wait()
    except Exception:  # noqa: BLE001 — a failed write was already reported by _checkpoint_io
        pass
    ckpt.close()


def _checkpoint_io(write, step: int, ckpt, out_dir: Path) -> None:
    """Run a checkpoint write (or the wait for one); a failure becomes one line that says what
    is still safe: the last complete checkpoint, from which the same command resumes."""
    try:
        write()
    except Exception as e:  # noqa: BLE001 — orbax/tensorstore raise many types
        text = str(e)
        reason = ("no space left on the device" if "No space left" in text
                  or getattr(e, "errno", None) == errno.ENOSPC
                  else (text.strip().splitlines() or [type(e).__name__])[0][:200])
        try:
            ckpt.wait()  # an earlier save may still be committing
        except Exception:  # noqa: BLE001
            pass
        try:
            ckpt.reload()
            safe = ckpt.latest_step()
        except Exception:  # noqa: BLE001
            safe = None
        resume = (f"checkpoint {safe} is complete: run the same command to resume from it once "
                  "the problem is fixed" if safe is not None else
                  "no checkpoint is complete yet: the same command starts the run over once the "
                  "problem is fixed")
        raise CheckpointWriteError(f"could not write checkpoint {step} in {out_dir} ({reason}); "
                                   f"{resume}.") from None


def _stop_nonfinite(step: int, bad: int, cfg: TrainConfig, ckpt, out_dir: Path) -> None:
    ckpt.wait()
    last = ckpt.latest_step()
    where = (f"the last checkpoint, step {last}, is from before it" if last is not None
             else "no checkpoint was written")
    raise NonFiniteLoss(
        f"the training loss was not finite for the last {bad} update(s) (step {step}); stopped "
        f"without saving them: {where}. Lower lr.learning_rate or raise optimizer.grad_clip / "
        "use float32, then run the same command (it resumes from that checkpoint); "
        f"nonfinite_patience={cfg.nonfinite_patience} sets how many such updates are tolerated.")


def _arch(model_config) -> tuple:
    return (model_config.n_layer, model_config.n_head, model_config.n_embd,
            model_config.context_size, model_config.vocab_size)


def _export(ckpt, state, model_config, cfg: TrainConfig, out_dir: Path, run_log,
            write: bool = True) -> None:
    """final.pt (the latest checkpoint) and best.pt, with their optimizer states. Every process
    takes part (restoring and gathering sharded arrays are collective); `write` says whether
    this one writes the files (process 0)."""
    try:
        from piano_gpt_jax.checkpoints.torch_format import save_torch_checkpoint
    except ImportError as e:  # torch is an optional dependency
        run_log.note(f"skipping the .pt exports: {e} (pip install torch to enable them)")
        return
    from piano_gpt_jax.checkpoints import CheckpointError

    written = []
    steps = {"final.pt": ckpt.latest_step(), "best.pt": ckpt.best_step()}
    for name, step in steps.items():
        if step is None:
            continue
        current = state if step == steps["final.pt"] else None  # else restore that step
        try:
            record = _exportable(ckpt, step, state, current, model_config, cfg)
            if write:
                written.append(save_torch_checkpoint(out_dir / name, record))
        except (CheckpointError, ValueError, OSError) as e:
            raise UsageError(
                f"training finished and its checkpoints are complete, but exporting {name} "
                f"failed ({e}); export by hand with python -m converters.jax_to_torch "
                f"{out_dir} OUT.pt") from None
    if written:
        run_log.note(f"exported {' and '.join(map(str, written))} (PyTorch reference layout, "
                     "with optimizer state)")


def _exportable(ckpt, step: int, state_like: dict, state, model_config, cfg: TrainConfig):
    """The CheckpointRecord of training checkpoint `step` (from `state` when given, else
    restored), host-side and in float32, with its AdamW state."""
    import jax

    from piano_gpt_jax.checkpoints import AdamState, CheckpointRecord, RunMeta
    from piano_gpt_jax.optim import adam_state, schedule_lr
    from piano_gpt_jax.sharding import to_host

    if state is None:
        state, meta, _ = ckpt.restore(step, state_like)
    else:
        meta = ckpt.restore_meta(step)
    run_meta = RunMeta.from_json(meta.get("metadata"))
    host = to_host({"params": state["params"], "opt_state": state["opt_state"]})
    adam, _ = adam_state(host["opt_state"])
    f32 = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)
    optimizer = AdamState(count=int(adam.count), mu=f32(adam.mu), nu=f32(adam.nu),
                          lr=schedule_lr(cfg.optim, run_meta.step), b1=cfg.optimizer.beta1,
                          b2=cfg.optimizer.beta2, eps=1e-8, weight_decay=cfg.optimizer.weight_decay)
    # Export the architecture only: the compute dtype / embedding style are runtime choices.
    arch = dataclasses.replace(model_config, dtype="float32", one_hot_embedding=False,
                               attention="auto", remat=False)
    return CheckpointRecord(arch, f32(host["params"]), meta.get("tokenizer_desc"), run_meta,
                            optimizer)


# ----------------------------------------------------------------------------------- CLI
_OVERRIDE = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=|$)")


def check_override_keys(argv: list[str]) -> None:
    """Reject `--config.<key>` overrides naming no config key, with the closest valid name."""
    for arg in argv[1:]:
        m = _OVERRIDE.match(arg)
        if m and m.group(1) not in SCHEMA:
            raise ConfigError(f"unknown config key {m.group(1)!r} in {arg!r}."
                              f"{suggest_key(m.group(1))}")


def parse_config(argv: list[str]) -> TrainConfig:
    from absl import flags
    from ml_collections import config_flags

    if "config" not in flags.FLAGS:
        config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/piano.py:tiny",
                                        lock_config=True)
    check_override_keys(argv)
    try:
        flags.FLAGS(argv)
    except Exception as e:  # noqa: BLE001 — absl wraps config-file errors in many types
        raise ConfigError(f"bad command line: {_one_line(e)}") from None
    if flags.FLAGS.config is None:
        raise ConfigError("no config given; run e.g. "
                          "`python -m piano_gpt_jax.train --config configs/piano.py:tiny`")
    return build_train_config(flags.FLAGS.config)


def _one_line(e: BaseException) -> str:
    """absl's message for a flag or config-file error, as one line a user can act on."""
    text = str(e)
    if "Error whilst parsing config file" in text:  # the config file raised: keep its message
        last = [ln.strip() for ln in text.replace("\\n", "\n").splitlines() if ln.strip()]
        text = last[-1] if last else text
        m = re.search(r"(\w+Error|\w+Exception): (.*)$", text)
        if m:
            text = m.group(2)
    text = " ".join(text.replace("\\n", " ").split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # absl wraps some messages in quotes; keep quotes inside intact
    return text


class _OrbaxErrorsReportedByUs(logging.Filter):
    """orbax logs every failed background write with tracebacks from several threads (its
    messages start with "[process=N]"); the trainer turns each checkpoint failure into one line
    of its own (_checkpoint_io)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR
                    and str(record.msg).startswith("[process="))


def _quiet_orbax_threads() -> None:
    """Exceptions ending orbax's background threads are reported by _checkpoint_io; other
    threads' exceptions still print."""
    import threading
    import traceback

    default = threading.excepthook

    def hook(args) -> None:
        frames = traceback.extract_tb(args.exc_traceback) if args.exc_traceback else []
        if not any("/orbax/" in f.filename for f in frames):
            default(args)

    threading.excepthook = hook
    default_unraisable = sys.unraisablehook

    def unraisable(args) -> None:
        # tensorstore completing a failed orbax write onto orbax's already-closed event loop
        if not (isinstance(args.exc_value, RuntimeError)
                and "Event loop is closed" in str(args.exc_value)):
            default_unraisable(args)

    sys.unraisablehook = unraisable


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
        logging.getLogger(noisy).addFilter(_OrbaxErrorsReportedByUs())
    _quiet_orbax_threads()
    argv = list(sys.argv if argv is None else argv)
    try:
        cfg = parse_config(argv)
        select_platform(cfg)
        maybe_init_distributed(cfg)
        check_devices(cfg)
        check_same_config(cfg)
        if cfg.eval_only:
            eval_only(cfg)
            return 0
        summary = train(cfg)
    except CheckpointWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.stderr.flush()
        sys.stdout.flush()
        os._exit(2)  # skip tearing down orbax's failing background writes (tracebacks only)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Interrupted as e:
        print(str(e), file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("interrupted; run the same command to resume from the last checkpoint.",
              file=sys.stderr)
        return 130
    print(f"done: step {summary['step']}, val_loss first {_fmt(summary['first_val_loss'])} "
          f"-> last {_fmt(summary['last_val_loss'])} (best {summary['best_val_loss']:.4f})")
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
