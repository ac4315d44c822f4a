"""Where a run starts and what it starts with: the model, the data, the mesh and the state.

A run starts from its own newest checkpoint that restores (resume), else from init_from (a
checkpoint of ours or a PyTorch .pt, optionally with its optimizer state), else from the config.
Whatever the start, the model, tokenizer and data must agree before a step runs; a mismatch is
a UsageError saying which setting to change.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from piano_gpt_jax import memory_limits
from piano_gpt_jax import out_dir as out_dir_lib
from piano_gpt_jax.checkpoints import (
    CheckpointError,
    CheckpointRecord,
    RunMeta,
    TrainCheckpointer,
    load_any_checkpoint,
)
from piano_gpt_jax.config import TrainConfig
from piano_gpt_jax.data.pipeline import build_tokenizer, make_pipeline
from piano_gpt_jax.data.settings import DataSettings
from piano_gpt_jax.jitted_steps import init_train_state, shard_batch
from piano_gpt_jax.model import ModelConfig, init_params
from piano_gpt_jax.optim import AdamWSettings, lr_at, with_adam_state
from piano_gpt_jax.precision import Precision
from piano_gpt_jax.run import memory_plan
from piano_gpt_jax.run.errors import UsageError
from piano_gpt_jax.sharding import check_batch_divisible, make_mesh, place, tree_shardings


def model_config_for(cfg: TrainConfig, vocab_size: int, arch: dict | None = None) -> ModelConfig:
    """ModelConfig from the config (scratch) or a checkpoint's architecture (init/resume)."""
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


def architecture(model_config: ModelConfig) -> tuple:
    """What two checkpoints must share to be one run."""
    return (model_config.n_layer, model_config.n_head, model_config.n_embd,
            model_config.context_size, model_config.vocab_size)


def check_compatible(model_config: ModelConfig, tokenizer, cfg: TrainConfig,
                     source: str) -> None:
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


def build_data(cfg: TrainConfig, tokenizer_desc: dict | None) -> tuple[DataSettings, Any, Any]:
    """(settings, tokenizer, pipeline); a checkpoint's tokenizer description wins over the
    config's, so a resumed or fine-tuned model keeps its vocabulary."""
    settings, tokenizer = build_tokenizer_for(cfg, tokenizer_desc)
    return settings, tokenizer, build_pipeline(settings, tokenizer)


def build_tokenizer_for(cfg: TrainConfig, tokenizer_desc: dict | None) -> tuple[DataSettings, Any]:
    """(settings, tokenizer): all the memory check needs, before any data is read."""
    try:
        settings = DataSettings.from_config(cfg, shard_index=jax.process_index(),
                                            shard_count=jax.process_count())
        return settings, build_tokenizer(settings, tokenizer_desc)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UsageError(f"cannot build the data pipeline: {e}") from None


def build_pipeline(settings: DataSettings, tokenizer) -> Any:
    try:
        return make_pipeline(settings, tokenizer)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise UsageError(f"cannot build the data pipeline: {e}") from None


def check_memory(cfg: TrainConfig, model_config: ModelConfig, mesh) -> None:
    """Refuse (UsageError) a step that cannot fit one device's memory, before it is built."""
    shape = memory_plan.shape_of(model_config, cfg.data.batch_size, cfg.data.context_size,
                                 dict(mesh.shape))
    budget = memory_limits.device_budget(mesh.devices.flat[0])
    refusal = memory_plan.refusal(shape, budget) if budget is not None else None
    if refusal:
        raise UsageError(refusal)


def run_mesh(cfg: TrainConfig):
    """The (data, fsdp) mesh; UsageError (not a traceback) if the batch cannot be split on it."""
    mesh = make_mesh(param_sharding=cfg.system.param_sharding)
    try:
        check_batch_divisible(cfg.data.batch_size, mesh)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return mesh


def eval_batches(cfg: TrainConfig, pipeline, mesh) -> dict[str, list]:
    """The fixed eval_iters batches of every eval split, sharded over `mesh`."""
    return {s: [shard_batch(b, mesh) for b in pipeline.eval_batches(s, cfg.eval_iters)]
            for s in pipeline.eval_split_names}


def train_iterator(pipeline, data_state: Any = None) -> Any:
    """The training batches from the start, or (a checkpoint's `data_state`) from the batch
    after the last one the checkpointed run consumed: a resume sees the very batches an
    uninterrupted run would."""
    iterator = pipeline.train_iterator()
    if data_state is not None:
        iterator.set_state(data_state)
    return iterator


def schedule_notes(cfg: TrainConfig) -> list[str]:
    """A warning when the learning rate never reaches lr.learning_rate: warmup longer than the
    run (it trained without a word before)."""
    lr = cfg.lr
    if not lr.decay_lr or lr.warmup_iters <= cfg.optimizer.max_iters:
        return []
    peak = lr_at(cfg.optim, cfg.optimizer.max_iters)
    return [f"warning: lr.warmup_iters ({lr.warmup_iters}) is longer than optimizer.max_iters "
            f"({cfg.optimizer.max_iters}): the learning rate never reaches lr.learning_rate="
            f"{lr.learning_rate:g} (it ends at {peak:.3g}). Lower lr.warmup_iters or raise "
            "optimizer.max_iters if that is not intended."]


def load_init(path: str, with_optimizer: bool = False) -> CheckpointRecord:
    try:
        return load_any_checkpoint(path, with_optimizer=with_optimizer)
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        raise UsageError(f"init_from={path!r}: {e}") from None


def guard_new_run(out_dir: Path, cfg: TrainConfig, main_process: bool) -> list[str]:
    """Protect an earlier run in out_dir before a new one writes there (see out_dir.py)."""
    if not main_process:
        return []
    try:
        return out_dir_lib.guard_new_run(out_dir, cfg.overwrite)
    except out_dir_lib.OutDirError as e:
        raise UsageError(str(e)) from None


def refuse_lost_run(out_dir: Path, damaged_steps: list[int], overwrite: bool) -> None:
    """Every checkpoint of out_dir was damaged (and moved aside): starting over silently would
    begin a new run where the user expects a resume, so it takes overwrite=True."""
    if not damaged_steps or overwrite:
        return
    steps = ", ".join(str(s) for s in sorted(damaged_steps, reverse=True))
    raise UsageError(
        f"{out_dir}: found {len(damaged_steps)} damaged checkpoint(s) (step {steps}) and none "
        f"that restores; moved them to {out_dir / 'damaged'}/ (nothing deleted). Pass "
        "--config.overwrite=True to start this run over from step 0, or choose another "
        "--config.out_dir.")


@dataclasses.dataclass
class Start:
    """Where a run starts: its own newest restorable checkpoint, init_from, or nothing."""

    source: str
    tokenizer_desc: dict | None
    arch: dict | None  # a checkpoint's model_config; None = from the config
    resumed: tuple | None = None  # (step, state on the mesh, meta, data iterator state)
    init: CheckpointRecord | None = None  # init_from

    @property
    def resume_step(self) -> int | None:
        return self.resumed[0] if self.resumed is not None else None


def resolve_start(cfg: TrainConfig, ckpt: TrainCheckpointer, mesh, tx, precision: Precision,
                  notes: list[str]) -> Start:
    """Resume from out_dir's newest checkpoint that restores (damaged ones are moved aside),
    else start from init_from, else from the config."""
    try:
        resumed = ckpt.restore_newest(
            lambda meta: abstract_state(cfg, meta["model_config"], tx, precision, mesh), notes)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    if resumed is not None:
        meta = resumed[2]
        return Start(f"{cfg.out_dir} (resuming step {resumed[0]})", meta.get("tokenizer_desc"),
                     meta["model_config"], resumed=resumed)
    if not cfg.from_scratch:
        init = load_init(cfg.init_from, with_optimizer=cfg.init_optimizer)
        if cfg.init_optimizer and init.meta.step >= cfg.optimizer.max_iters:
            raise UsageError(
                f"init_from={cfg.init_from} is at step {init.meta.step}, already at or past "
                f"optimizer.max_iters={cfg.optimizer.max_iters}: with init_optimizer=True there "
                f"is nothing to train. Raise --config.optimizer.max_iters above "
                f"{init.meta.step} to continue it, or drop init_optimizer to start a new "
                "schedule from its weights.")
        return Start(f"init_from={cfg.init_from}", init.tokenizer_desc,
                     init.model_config.to_dict(), init=init)
    return Start("config", None, None)


def abstract_state(cfg: TrainConfig, arch: dict, tx, precision: Precision, mesh) -> dict:
    """The restore target of a checkpoint of architecture `arch`: shapes, dtypes, shardings.

    A checkpoint of another architecture than the config asks for stops the run here (unless
    init_from decides the architecture)."""
    model_config = model_config_for(cfg, arch["vocab_size"], arch)
    if cfg.from_scratch:
        wanted = model_config_for(cfg, arch["vocab_size"])
        if architecture(wanted) != architecture(model_config):
            raise UsageError(
                f"{cfg.out_dir} holds a run of a different model ({architecture(model_config)}) "
                f"than the config asks for ({architecture(wanted)}); choose a new out_dir to "
                "start a new run.")
    shapes = jax.eval_shape(lambda: init_train_state(
        init_params(model_config, jax.random.PRNGKey(0)), tx, cfg.seed, precision))
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
        tree_shardings(shapes, mesh))


@dataclasses.dataclass
class Progress:
    """The counters a run carries from start to end (and through checkpoints)."""

    step: int = 0
    total_tokens: int = 0
    best_val: float = math.inf
    wandb_id: str | None = None


def initial_state(cfg: TrainConfig, start: Start, model_config: ModelConfig, tx,
                  precision: Precision, mesh) -> tuple[dict, Progress, Any]:
    """(train state on the mesh, progress, data iterator state or None) for the run's start."""
    if start.resumed is not None:
        _, state, meta, data_state = start.resumed
        m = RunMeta.from_json(meta.get("metadata"))
        best = m.best_val_loss if m.best_val_loss is not None else math.inf
        return state, Progress(m.step, m.total_tokens, best, m.wandb_id), data_state
    init = start.init
    if init is not None:
        params = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), init.params)
    else:
        params = init_params(model_config, jax.random.PRNGKey(cfg.seed))
    state = init_train_state(params, tx, cfg.seed, precision)
    progress = Progress()
    if init is not None and init.optimizer is not None:
        state = _continue_optimizer(state, init, cfg)
        best = init.meta.best_val_loss if init.meta.best_val_loss is not None else math.inf
        progress = Progress(init.meta.step, init.meta.total_tokens, best)
    return place(state, mesh), progress, None


def _continue_optimizer(state: dict, init: CheckpointRecord, cfg: TrainConfig) -> dict:
    """`state` carrying init_from's AdamW moments, step count and schedule position."""
    adam = init.optimizer
    opt_state = with_adam_state(jax.device_get(state["opt_state"]), adam.count, adam.mu, adam.nu,
                                updates_done=init.meta.step)
    micro_step = init.meta.step * cfg.optimizer.gradient_accumulation_steps
    return {**state, "opt_state": opt_state,
            "micro_step": np.asarray(micro_step, np.asarray(state["micro_step"]).dtype)}


def optimizer_differences(adam, cfg: TrainConfig) -> str | None:
    """init_optimizer keeps our config's hyper-parameters; a note on where the file's differ."""
    ours = AdamWSettings.of(cfg.optim).as_dict()
    theirs = {k: getattr(adam, k) for k in ours}
    names = {"b1": "beta1", "b2": "beta2"}  # as the config names them
    diffs = [f"{names.get(k, k)} {theirs[k]:g} -> {ours[k]:g}" for k in ours
             if not math.isclose(ours[k], theirs[k], rel_tol=1e-6)]
    if diffs:
        return "init_optimizer: continuing with this config's " + ", ".join(diffs)
    return None
