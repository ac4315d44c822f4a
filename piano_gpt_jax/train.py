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
import logging
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from piano_gpt_jax.config import SCHEMA, ConfigError, TrainConfig, build_train_config, suggest_key

log = logging.getLogger("piano_gpt_jax.train")


class UsageError(Exception):
    """Stops the run with a message and exit code 2 (no traceback)."""


# ----------------------------------------------------------------------------------- start-up
def select_platform(cfg: TrainConfig) -> None:
    """Pin JAX to system.device; must run before any backend starts."""
    import jax

    jax.config.update("jax_platforms", cfg.platform)


def check_devices(cfg: TrainConfig) -> None:
    import jax

    try:
        jax.devices()
    except RuntimeError as e:
        raise UsageError(
            f"system.device asks for {cfg.platform!r} but JAX cannot use it here ({e}). "
            "On a CPU-only machine add --config.system.device=cpu (or use the :tiny preset)."
        ) from None


def maybe_init_distributed(cfg: TrainConfig) -> None:
    """jax.distributed.initialize() for multi-host launches (see configs/piano.py docstring)."""
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
    if cfg.ddp_backend == "jax_distributed" or cluster:
        kwargs: dict[str, Any] = {}
        if "JAX_COORDINATOR_ADDRESS" in env:
            kwargs = {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"],
                      "num_processes": int(env["JAX_NUM_PROCESSES"]),
                      "process_id": int(env["JAX_PROCESS_ID"])}
        jax.distributed.initialize(**kwargs)


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
    return ModelConfig(**{k: arch[k] for k in keys}, dropout=m.dropout, dtype=cfg.dtype,
                       one_hot_embedding=bool(m.one_hot_embedding))


def _check_compatible(model_config, tokenizer, cfg: TrainConfig, source: str) -> None:
    if tokenizer.vocab_size != model_config.vocab_size:
        raise UsageError(
            f"{source}: the model has {model_config.vocab_size} token embeddings but the tokenizer "
            f"needs {tokenizer.vocab_size} (its vocabulary plus the special tokens of stage="
            f"{cfg.stage!r}, tasks={cfg.data_kwargs['tasks']!r}). Use a checkpoint whose "
            "tokenizer has room for these tokens, or train from scratch_next_token.")
    if cfg.data_kwargs["context_size"] > model_config.context_size:
        raise UsageError(
            f"{source}: data.context_size ({cfg.data_kwargs['context_size']}) exceeds the "
            f"model's context_size ({model_config.context_size}); lower data.context_size.")
    if model_config.use_time_embedding != cfg.data_kwargs["use_time_steps"]:
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
    from piano_gpt_jax.train_step import check_batch_divisible, make_mesh

    mesh = make_mesh()
    try:
        check_batch_divisible(cfg.data_kwargs["batch_size"], mesh)
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

    from piano_gpt_jax.train_step import compile_steps, make_eval_step, replicate

    source = cfg.out_dir if cfg.from_scratch else cfg.init_from
    ck = _load_init(source)
    _, tokenizer, pipeline = _build_data(cfg, ck.tokenizer_desc)
    model_config = _model_config(cfg, tokenizer.vocab_size, ck.model_config.to_dict())
    _check_compatible(model_config, tokenizer, cfg, source)
    mesh = _make_mesh(cfg)
    _, eval_fn = compile_steps(None, make_eval_step(model_config), mesh, use_jit=cfg.compile)
    params = replicate(jax.tree_util.tree_map(np.asarray, ck.params), mesh)
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
    """Where a run starts: its own latest checkpoint, init_from, or nothing."""

    source: str
    tokenizer_desc: dict | None
    arch: dict | None  # a checkpoint's model_config; None = from the config
    resume_step: int | None = None
    init: Any = None  # CheckpointRecord of init_from


def _resolve_start(cfg: TrainConfig, ckpt) -> _Start:
    resume_step = ckpt.latest_step()
    if resume_step is not None:
        meta = ckpt.restore_meta(resume_step)
        return _Start(f"{cfg.out_dir} (resuming step {resume_step})", meta.get("tokenizer_desc"),
                      meta["model_config"], resume_step=resume_step)
    if not cfg.from_scratch:
        init = _load_init(cfg.init_from, with_optimizer=cfg.init_optimizer)
        return _Start(f"init_from={cfg.init_from}", init.tokenizer_desc,
                      init.model_config.to_dict(), init=init)
    return _Start("config", None, None)


def _continue_optimizer(state: dict, init, cfg: TrainConfig) -> dict:
    """`state` carrying init_from's AdamW moments, step count and schedule position."""
    import jax

    from piano_gpt_jax.optim import with_adam_state

    adam = init.optimizer
    opt_state = with_adam_state(jax.device_get(state["opt_state"]), adam.count, adam.mu, adam.nu,
                                updates_done=init.meta.step)
    micro_step = init.meta.step * cfg.optim.gradient_accumulation_steps
    return {**state, "opt_state": opt_state,
            "micro_step": np.asarray(micro_step, np.asarray(state["micro_step"]).dtype)}


def _note_optimizer_differences(adam, cfg: TrainConfig, run_log) -> None:
    """init_optimizer keeps our config's hyper-parameters; say where the file's differ."""
    ours = {"beta1": cfg.optim.beta1, "beta2": cfg.optim.beta2,
            "weight_decay": cfg.optim.weight_decay, "eps": 1e-8}
    theirs = {"beta1": adam.b1, "beta2": adam.b2, "weight_decay": adam.weight_decay,
              "eps": adam.eps}
    diffs = [f"{k} {theirs[k]:g} -> {ours[k]:g}" for k in ours
             if not math.isclose(ours[k], theirs[k], rel_tol=1e-6)]
    if diffs:
        run_log.note("init_optimizer: continuing with this config's " + ", ".join(diffs))


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
            _remove_empty_dirs(out_dir)
        raise


def _remove_empty_dirs(root: Path) -> None:
    """Remove `root` and its subdirectories if no file was written under them."""
    if not root.is_dir() or any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        d.rmdir()
    root.rmdir()


def _train(cfg: TrainConfig) -> dict:
    import jax

    from piano_gpt_jax.checkpoints import CheckpointRecord, RunMeta, TrainCheckpointer
    from piano_gpt_jax.model import count_params, init_params
    from piano_gpt_jax.optim import make_optimizer, reference_lr
    from piano_gpt_jax.run_log import RunLog, flops_per_token, mfu, truncate_metrics
    from piano_gpt_jax.train_step import (
        Precision,
        compile_steps,
        init_train_state,
        make_eval_step,
        make_train_step,
        replicate,
        shard_batch,
    )

    main_process = jax.process_index() == 0
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mesh = _make_mesh(cfg)

    ckpt = TrainCheckpointer(out_dir, cfg.keep_last)
    start = _resolve_start(cfg, ckpt)
    resume_step, init = start.resume_step, start.init
    settings, tokenizer, pipeline = _build_data(cfg, start.tokenizer_desc)
    model_config = _model_config(cfg, tokenizer.vocab_size, start.arch)
    if resume_step is not None and cfg.from_scratch:
        wanted = _model_config(cfg, tokenizer.vocab_size)
        if _arch(wanted) != _arch(model_config):
            raise UsageError(
                f"{out_dir} holds a run of a different model ({_arch(model_config)}) than the "
                f"config asks for ({_arch(wanted)}); choose a new out_dir to start a new run.")
    _check_compatible(model_config, tokenizer, cfg, start.source)
    tokenizer_desc = tokenizer.to_dict()

    tx = make_optimizer(cfg.optim)
    precision = Precision(cfg.dtype)
    if init is not None:
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), init.params)
    else:
        params = init_params(model_config, jax.random.PRNGKey(cfg.seed))
    state = init_train_state(params, tx, cfg.seed, precision)
    step, total_tokens, best_val = 0, 0, math.inf
    if init is not None and init.optimizer is not None:
        state = _continue_optimizer(state, init, cfg)
        step, total_tokens = init.meta.step, init.meta.total_tokens
        best_val = init.meta.best_val_loss if init.meta.best_val_loss is not None else math.inf
    state = replicate(state, mesh)
    iterator = pipeline.train_iterator()
    wandb_id = None
    if resume_step is not None:
        state, meta, data_state = ckpt.restore(resume_step, state)
        iterator.set_state(data_state)
        resumed = RunMeta.from_json(meta.get("metadata"))
        step, total_tokens = resumed.step, resumed.total_tokens
        best_val = resumed.best_val_loss if resumed.best_val_loss is not None else math.inf
        wandb_id = resumed.wandb_id

    train_fn, eval_fn = compile_steps(make_train_step(model_config, tx, precision),
                                      make_eval_step(model_config), mesh, use_jit=cfg.compile)
    eval_batches = _eval_batches(cfg, pipeline, mesh)

    if main_process:
        truncate_metrics(out_dir / "metrics.jsonl", resume_step)
    wandb_settings = None
    if cfg.wandb_log:
        wandb_settings = {"project": cfg.wandb_project, "entity": cfg.wandb_entity,
                          "name": out_dir.name, "id": _wandb_id(out_dir), "dir": str(out_dir)}
    run_log = RunLog(out_dir, total_steps=cfg.optim.max_iters, start_step=step,
                     main_process=main_process, wandb_settings=wandb_settings,
                     run_config=dict(cfg.raw))
    gas = cfg.optim.gradient_accumulation_steps
    tokens_per_step = settings.batch_size * settings.context_size * gas
    n_params = count_params(params, include_position=False)
    flops_token = flops_per_token(n_params, model_config.n_layer, model_config.n_head,
                                  model_config.head_dim, settings.context_size)
    device_kind = jax.devices()[0].device_kind
    n_devices = mesh.devices.size
    run_log.note(f"model: {n_params / 1e6:.2f}M params ({start.source}); vocab "
                 f"{tokenizer.vocab_size}; {n_devices} x {device_kind}; global batch "
                 f"{settings.batch_size} x {gas} x {settings.context_size} tokens; dtype "
                 f"{cfg.dtype}; eval splits {pipeline.eval_split_names}"
                 + (f"; prompt layout {pipeline.prompt_layout}"
                    if settings.stage == "piano_task" else ""))
    if resume_step is not None:
        run_log.note(f"resumed from {out_dir}/checkpoints/{resume_step}")
    elif init is not None and init.optimizer is not None:
        run_log.note(f"init_optimizer: continuing {cfg.init_from} at step {step} (Adam step "
                     f"{init.optimizer.count}, {total_tokens:,} tokens)")
        _note_optimizer_differences(init.optimizer, cfg, run_log)
    wandb_id = run_log.wandb_id or wandb_id

    def run_eval(at_step: int, train_losses: list) -> dict[str, float]:
        losses = evaluate_losses(eval_fn, state["params"], eval_batches)
        event = {"step": at_step, "val_loss": losses.get("full_val", next(iter(losses.values()))),
                 **{f"val_loss/{k}": v for k, v in losses.items()},
                 "lr": reference_lr(max(at_step, 1), cfg.optim), "tokens": total_tokens}
        if train_losses:
            event["train_loss"] = float(np.mean([float(x) for x in train_losses]))
        run_log.event({"event": "eval", **event})
        run_log.note(f"eval step {at_step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in losses.items())
            + (f", train {event['train_loss']:.4f}" if train_losses else ""))
        return event

    def checkpoint_meta(at_step: int, event: dict) -> RunMeta:
        return RunMeta(
            step=at_step, total_tokens=total_tokens, train_loss=event.get("train_loss"),
            val_loss=event["val_loss"],
            val_losses={k.split("/", 1)[1]: v for k, v in event.items()
                        if k.startswith("val_loss/")},
            best_val_loss=best_val if math.isfinite(best_val) else None,
            run_name=out_dir.name, config=dict(cfg.raw), n_devices=int(n_devices),
            prompt_layout=pipeline.prompt_layout if settings.stage == "piano_task" else None,
            wandb_id=wandb_id or stable_run_id(out_dir), wandb_ran=run_log.wandb_id is not None,
            source=cfg.init_from if init is not None else None)

    summary: dict[str, Any] = {"first_val_loss": None, "last_val_loss": None}
    if step == 0:
        summary["first_val_loss"] = run_eval(0, [])["val_loss"]
    losses_since_eval: list = []
    last_log_time, last_log_step = time.perf_counter(), step
    try:
        while step < cfg.optim.max_iters:
            step_losses = []
            for _ in range(gas):
                batch = shard_batch(next(iterator), mesh)
                state, metrics = train_fn(state, batch)
                step_losses.append(metrics["loss"])
            step += 1
            total_tokens += tokens_per_step
            step_loss = sum(step_losses) / gas
            losses_since_eval.append(step_loss)
            run_log.advance()
            if step % cfg.log_interval == 0 or step == cfg.optim.max_iters:
                loss_value = float(step_loss)  # blocks: the timing below covers real work
                now = time.perf_counter()
                dt = (now - last_log_time) / max(step - last_log_step, 1)
                last_log_time, last_log_step = now, step
                tps = tokens_per_step / dt
                mfu_value = mfu(tps, flops_token, device_kind, n_devices)
                lr = reference_lr(step, cfg.optim)
                extra = ""
                if precision.loss_scaling:
                    extra = f" | scale {float(metrics['loss_scale']):.0f}"
                run_log.train_line(step, loss_value, lr, tps, dt, mfu_value, extra)
                run_log.event({"event": "train", "step": step, "train_loss": loss_value,
                               "lr": lr, "tokens": total_tokens, "tokens_per_s": tps,
                               "step_time_s": dt, "mfu": mfu_value})
            if step % cfg.eval_interval == 0 or step == cfg.optim.max_iters:
                event = run_eval(step, losses_since_eval)
                losses_since_eval = []
                summary["last_val_loss"] = event["val_loss"]
                if math.isfinite(event["val_loss"]):
                    best_val = min(best_val, event["val_loss"])
                record = CheckpointRecord(model_config, {}, tokenizer_desc,
                                          checkpoint_meta(step, event))
                ckpt.save(step, state, record, iterator.get_state(), event["val_loss"])
                last_log_time, last_log_step = time.perf_counter(), step  # keep evals out of tok/s
        ckpt.wait()
        if cfg.export_torch and main_process and ckpt.latest_step() is not None:
            _export(ckpt, state, model_config, cfg, out_dir, run_log)
    finally:
        ckpt.wait()
        ckpt.close()
        run_log.close()
    summary.update(step=step, total_tokens=total_tokens, best_val_loss=best_val)
    return summary


def _arch(model_config) -> tuple:
    return (model_config.n_layer, model_config.n_head, model_config.n_embd,
            model_config.context_size, model_config.vocab_size)


def _export(ckpt, state, model_config, cfg: TrainConfig, out_dir: Path, run_log) -> None:
    """final.pt (the latest checkpoint) and best.pt, with their optimizer states."""
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
            written.append(save_torch_checkpoint(out_dir / name, record))
        except (CheckpointError, ValueError, OSError) as e:
            raise UsageError(
                f"training finished and its checkpoints are complete, but exporting {name} "
                f"failed ({e}); export by hand with python -m converters.jax_to_torch "
                f"{out_dir} OUT.pt") from None
    run_log.note(f"exported {' and '.join(map(str, written))} (PyTorch reference layout, "
                 "with optimizer state)")


def _exportable(ckpt, step: int, state_like: dict, state, model_config, cfg: TrainConfig):
    """The CheckpointRecord of training checkpoint `step` (from `state` when given, else
    restored), host-side and in float32, with its AdamW state."""
    import jax

    from piano_gpt_jax.checkpoints import AdamState, CheckpointRecord, RunMeta
    from piano_gpt_jax.optim import adam_state, schedule_lr

    if state is None:
        state, meta, _ = ckpt.restore(step, state_like)
    else:
        meta = ckpt.restore_meta(step)
    run_meta = RunMeta.from_json(meta.get("metadata"))
    host = jax.device_get(state)
    adam, _ = adam_state(host["opt_state"])
    f32 = lambda tree: jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), tree)
    optimizer = AdamState(count=int(adam.count), mu=f32(adam.mu), nu=f32(adam.nu),
                          lr=schedule_lr(cfg.optim, run_meta.step), b1=cfg.optim.beta1,
                          b2=cfg.optim.beta2, eps=1e-8, weight_decay=cfg.optim.weight_decay)
    # Export the architecture only: the compute dtype / embedding style are runtime choices.
    arch = dataclasses.replace(model_config, dtype="float32", one_hot_embedding=False)
    return CheckpointRecord(arch, f32(host["params"]), meta.get("tokenizer_desc"), run_meta,
                            optimizer)


def stable_run_id(out_dir: Path) -> str:
    """This run's wandb id: the one in out_dir/wandb_id.txt, else one derived from the path
    (so exports of a run that never logged to wandb still carry the id a later wandb run of it
    would use, which piano-gpt's piano_eval requires)."""
    path = out_dir / "wandb_id.txt"
    if path.exists():
        return path.read_text().strip()
    import hashlib

    return hashlib.sha1(str(out_dir.resolve()).encode()).hexdigest()[:12]


def _wandb_id(out_dir: Path) -> str:
    """A stable wandb run id per out_dir, so a resumed run continues the same wandb run."""
    run_id = stable_run_id(out_dir)
    (out_dir / "wandb_id.txt").write_text(run_id)
    return run_id


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
    text = str(e).replace("\\n", " ").replace("\n", " ")
    return text.strip("'\" ")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("absl", "jax._src", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv if argv is None else argv)
    try:
        cfg = parse_config(argv)
        select_platform(cfg)
        maybe_init_distributed(cfg)
        check_devices(cfg)
        if cfg.eval_only:
            eval_only(cfg)
            return 0
        summary = train(cfg)
    except (ConfigError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: step {summary['step']}, val_loss first {_fmt(summary['first_val_loss'])} "
          f"-> last {_fmt(summary['last_val_loss'])} (best {summary['best_val_loss']:.4f})")
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    sys.exit(main())
