"""Our `.pt` exports pass the code paths of piano-gpt's own tools that read a checkpoint.

We do not have piano-gpt's code; each consumer below is written from the reference document
(sections 2.2, 3.1, 4.4, 5.1, 5.2, 6.1, 6.2) with real omegaconf and torch: `torch.load(...,
weights_only=False)`, attribute access on the pickled DictConfig, `GPT(<model config>, vocab_size,
pad_token_id)` + `load_state`, `AdamW.load_state_dict`, `RunStats(**run_stats)`,
`PianoTaskManager(tasks_config=run_config.tasks)`, `OmegaConf.merge` with the tuning overrides.
f37ac14's code (no music-time embedding) reads the export of a run without it; HEAD's code (its
GPT always has `wmte`) reads the export of a run with it. Each consumer then runs the model.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from converters.torch_model import TorchGPT, masked_cross_entropy
from piano_gpt_jax import train as trainer
from piano_gpt_jax.config import build_train_config
from piano_gpt_jax.model import ModelConfig
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

pytestmark = pytest.mark.slow

# PianoTaskManager's registry: class -> its one constructor parameter (tokenizer-tasks doc 2.3).
TASK_PARAMETERS = {"TopLineMasking": "n_repetitions", "BottomLineMasking": "n_repetitions",
                   "HighNotesMasking": "n_notes", "LowNotesMasking": "n_notes",
                   "ShortNotesMasking": "n_notes", "LongNotesMasking": "n_notes",
                   "StrideMasking": "stride", "ChordMasking": "n_notes_threshold"}
TASK_TOKENS = {"TopLineMasking": "<PARAMETRIC_TOP_LINE>",
               "BottomLineMasking": "<PARAMETRIC_BOTTOM_LINE>",
               "HighNotesMasking": "<PARAMETRIC_HIGH_NOTES>",
               "LowNotesMasking": "<PARAMETRIC_LOW_NOTES>",
               "ShortNotesMasking": "<PARAMETRIC_SHORT_NOTES>",
               "LongNotesMasking": "<PARAMETRIC_LONG_NOTES>",
               "StrideMasking": "<PARAMETRIC_STRIDE_MASK>", "ChordMasking": "<CHORD_MASK>"}
# MusicManager (reference 4.4).
DATASET_TOKENS = ["<MAESTRO>", "<PIJAMA>", "<VGMIDI>", "<MUSIC-NET>", "<PIANO-MIDI-DE>",
                  "<LAKH-LMD-FULL>", "<GIANT-MIDI>", "<IMSLP>", "<ATEPP-1.1>", "<PIANO_FOR_AI>"]
COMPOSER_TOKENS = ["<SCRIABIN>", "<FRANCK>", "<MOZART>", "<CHOPIN>", "<MENDELSSON>", "<LISZT>",
                   "<SCHUBERT>", "<BRAHMS>", "<HAYDN>", "<BEETHOVEN>", "<BALAKIREV>",
                   "<SCHUMANN>", "<RACHMANIOFF>", "<UNKNOWN_COMPOSER>", "<BACH>"]
DATASET_KWARGS = {"base_dataset_name", "extra_datasets", "pause_detection_threshold",
                  "augmentation"}


@dataclasses.dataclass
class RunStats:  # gpt2/setup/training.py
    iter: int = 1
    total_tokens: int = 0
    running_mfu: float = -1.0
    best_val_loss: float = 1e9


# ------------------------------------------------------------------ piano-gpt, from the document
def gpt(config, vocab_size: int, pad_token_id: int, head: bool) -> TorchGPT:
    """GPT(config, vocab_size, pad_token_id): reads these six attributes; HEAD adds wmte."""
    assert pad_token_id == 0
    return TorchGPT(ModelConfig(
        vocab_size=vocab_size, n_layer=config.n_layer, n_head=config.n_head,
        n_embd=config.n_embd, context_size=config.context_size, dropout=config.dropout,
        bias=config.bias, use_time_embedding=head))


def load_state(model: TorchGPT, state_dict: dict) -> None:
    """GPT.load_state: strip torch.compile's prefix, strict load."""
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state_dict.items()},
                          strict=True)


def setup_device(run_cfg) -> tuple[str, torch.dtype]:
    """setup/hardware.py (no RANK in the environment: single process)."""
    _ = run_cfg.ddp.backend
    assert run_cfg.system.device in ("cpu", "cuda") or run_cfg.system.device.startswith("cuda:")
    ptdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16}[run_cfg.system.dtype]
    threads = math.floor(run_cfg.system.data_workers / 1)
    assert threads >= 1  # torch.set_num_threads refuses 0
    return run_cfg.system.device, ptdtype


def lr_scheduler(lr_cfg):
    """get_lr_scheduler: pops `type`, builds the class from the remaining keys."""
    kwargs = OmegaConf.to_container(lr_cfg)
    kind = kwargs.pop("type")
    if kind == "CosineDecay":
        warmup, decay, min_lr, lr = (kwargs.pop(k) for k in
                                     ("warmup_iters", "lr_decay_iters", "min_lr",
                                      "learning_rate"))
        kwargs.pop("decay_lr", None)

        def get_lr(it: int) -> float:
            if it < warmup:
                return lr * it / warmup
            if it > decay:
                return min_lr
            return min_lr + 0.5 * (1 + math.cos(math.pi * (it - warmup) / (decay - warmup))) * (
                lr - min_lr)
    else:
        assert kind == "Constant"
        lr = kwargs.pop("learning_rate")
        get_lr = lambda it: lr
    assert not kwargs, f"unexpected scheduler arguments {kwargs}"
    return get_lr


def setup_backprop(run_cfg, model: TorchGPT):
    get_lr = lr_scheduler(run_cfg.lr)
    _ = run_cfg.system.dtype == "float16"  # GradScaler(enabled=...)
    params = dict(model.named_parameters())
    groups = [{"params": [p for p in params.values() if p.dim() >= 2],
               "weight_decay": run_cfg.optimizer.weight_decay},
              {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=get_lr(0),
                                  betas=(run_cfg.optimizer.beta1, run_cfg.optimizer.beta2),
                                  fused=True)
    return get_lr, optimizer


def piano_task_manager(tasks_config) -> dict[str, tuple[str, ...]]:
    """PianoTaskManager(tasks_config): {task_name: prefix_tokens} in config order."""
    names = {"TopLineMasking": "top_line_masking", "BottomLineMasking": "bottom_line_masking",
             "HighNotesMasking": "high_notes_masking", "LowNotesMasking": "low_notes_masking",
             "ShortNotesMasking": "short_notes_masking", "LongNotesMasking": "long_notes_masking",
             "StrideMasking": "stride_notes_masking", "ChordMasking": "chord_masking"}
    tasks: dict[str, tuple[str, ...]] = {}
    for entry in tasks_config:
        cls = entry["class"]
        if "params" in entry:
            all_params = [entry["params"]]
        elif "param_range" in entry:
            all_params = list(entry["param_range"])
        else:
            raise ValueError(f"bad task entry {entry}")
        for params in all_params:
            (key, value), = dict(params).items()  # the constructor takes exactly one keyword
            assert key == TASK_PARAMETERS[cls]
            prefix = ((TASK_TOKENS[cls],) if cls == "ChordMasking"
                      else (TASK_TOKENS[cls], f"<PARAMETER_{value}>"))
            tasks[f"{names[cls]}-x{value}"] = prefix
    return tasks


def build_datasets(run_cfg, tokenizer: ExponentialTimeTokenizer, head: bool) -> None:
    """What rebuilding the datasets reads, and the tokens it (re-)adds (no-ops: in the vocab)."""
    assert set(run_cfg.dataset) == DATASET_KWARGS  # load_dataset(..., **cfg.dataset)
    _ = (run_cfg.dataset.augmentation.speed_change_factors,
         run_cfg.dataset.augmentation.max_pitch_shift)
    training = run_cfg.training
    _ = (training.context_size, training.microbatch_size, training.batch_size,
         training.gradient_accumulation_steps, training.prompt_masking)
    assert run_cfg.system.data_workers // 1 >= 1  # DataLoader num_workers
    vocab_before = tokenizer.vocab_size
    if run_cfg.model_task == "piano_task":
        tasks = piano_task_manager(run_cfg.tasks)
        assert tasks
        specials = sorted({t for prefix in tasks.values() for t in prefix}) + ["<GENAI>"]
        if head:
            _ = (training.min_n_task_notes, training.min_notes_per_record)
            max_n = training.max_notes_per_record
            music = [*DATASET_TOKENS, *COMPOSER_TOKENS,
                     *(f"<N_NOTES_{k}>" for k in range(max_n + 1)),
                     *(f"<MUSIC_TIME_{k}>" for k in range(1201))]
            tokenizer.add_special_tokens(music)
            specials.append("<EOGENAI>")
        else:
            _ = training.notes_per_record
            tokenizer.add_special_tokens(DATASET_TOKENS + COMPOSER_TOKENS)
        tokenizer.add_special_tokens(specials)
        missing = [t for t in specials if t not in tokenizer.token_to_id]
        assert not missing
    else:
        assert run_cfg.model_task == "next_token_prediction"
    assert tokenizer.vocab_size == vocab_before


def one_training_step(model: TorchGPT, optimizer, lr: float, run_cfg, head: bool) -> float:
    g = torch.Generator().manual_seed(0)
    T = min(run_cfg.training.context_size, 32)
    x = torch.randint(0, 200, (2, T), generator=g)
    steps = torch.randint(0, 100, (2, T), generator=g) if head else None
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = masked_cross_entropy(model(x, steps), torch.roll(x, -1, 1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), run_cfg.optimizer.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def resume_training(path: Path, head: bool) -> RunStats:
    """train.resume_training (f37ac14; HEAD: map_location cpu, model from run_cfg.model)."""
    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    run_cfg = checkpoint["run_config"]
    assert isinstance(run_cfg, DictConfig)
    setup_device(run_cfg)
    tokenizer = ExponentialTimeTokenizer.from_dict(checkpoint["tokenizer_desc"])
    model_cfg = run_cfg.model if head else checkpoint["model_cfg"]
    model = gpt(model_cfg, tokenizer.vocab_size, tokenizer.pad_token_id, head)
    load_state(model, checkpoint["model"])
    _ = run_cfg.system.compile  # torch.compile(model) when true
    get_lr, optimizer = setup_backprop(run_cfg, model)
    optimizer.load_state_dict(checkpoint["optimizer"])
    build_datasets(run_cfg, tokenizer, head)
    if run_cfg.logging.wandb_log:
        _ = checkpoint["wandb_id"]  # wandb.init(id=..., resume="must")
    run_stats = RunStats(**checkpoint["run_stats"])
    run_stats.iter += 1
    _ = checkpoint["run_name"]
    # training_loop reads these
    _ = (run_cfg.eval_interval, run_cfg.eval_iters, run_cfg.optimizer.max_iters,
         run_cfg.logging.log_interval, run_cfg.out_dir, run_cfg.training.batch_size)
    assert math.isfinite(one_training_step(model, optimizer, get_lr(run_stats.iter), run_cfg,
                                           head))
    return run_stats


def piano_eval(path: Path) -> float:
    """gpt2/piano_eval.py (f37ac14): refuses checkpoints without wandb_id."""
    checkpoint = torch.load(path, weights_only=False)
    assert "wandb_id" in checkpoint
    run_cfg = OmegaConf.create(checkpoint["run_config"])
    setup_device(run_cfg)
    tokenizer = ExponentialTimeTokenizer.from_dict(checkpoint["tokenizer_desc"])
    build_datasets(run_cfg, tokenizer, head=False)
    model = gpt(checkpoint["model_cfg"], tokenizer.vocab_size, tokenizer.pad_token_id, False)
    load_state(model, checkpoint["model"])
    _ = (checkpoint["run_stats"]["iter"], checkpoint["run_stats"]["total_tokens"],
         checkpoint["run_name"])
    prompt = torch.randint(0, 200, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return float(model.eval()(prompt)[0, -1].softmax(-1).max())


def model_tuning(path: Path) -> RunStats:
    """train.model_tuning (HEAD): merge the tuning overrides into the stored run config."""
    checkpoint = torch.load(path, weights_only=False, map_location="cpu")
    overrides = OmegaConf.create({
        "run_name_suffix": "tuning-2025-04-05-10-00",
        "dataset": {"base_dataset_name": "epr-labs/maestro-sustain-v2",
                    "extra_datasets": ["epr-labs/maestro-augmented"],
                    "pause_detection_threshold": 4,
                    "augmentation": {"speed_change_factors": [], "max_pitch_shift": 0}},
        "tasks": [{"class": "TopLineMasking", "param_range": [{"n_repetitions": 1},
                                                              {"n_repetitions": 2}]},
                  {"class": "ChordMasking", "params": {"n_notes_threshold": 3}}],
        "eval_iters": 150, "training": {"prompt_masking": True},
        "lr": {"warmup_iters": 1000, "lr_decay_iters": 80000, "learning_rate": 6e-6,
               "min_lr": 1e-6}})
    run_cfg = OmegaConf.merge(checkpoint["run_config"], overrides)
    setup_device(run_cfg)
    tokenizer = ExponentialTimeTokenizer.from_dict(checkpoint["tokenizer_desc"])
    model = gpt(run_cfg.model, tokenizer.vocab_size, tokenizer.pad_token_id, head=True)
    load_state(model, checkpoint["model"])
    get_lr, optimizer = setup_backprop(run_cfg, model)  # fresh optimizer, fresh RunStats
    build_datasets(run_cfg, tokenizer, head=True)
    _ = (run_cfg.training.gradient_accumulation_steps, run_cfg.out_dir)  # inherited
    run_stats = RunStats()
    assert math.isfinite(one_training_step(model, optimizer, get_lr(run_stats.iter), run_cfg,
                                           True))
    return run_stats


def prompt_practice(path: Path) -> list[int]:
    """dashboards/prompt_practice.py (HEAD): generate a few tokens for a task prompt."""
    checkpoint = torch.load(path, weights_only=False)
    run_config = checkpoint["run_config"]
    assert run_config.model_task == "piano_task"
    tokenizer = ExponentialTimeTokenizer.from_dict(checkpoint["tokenizer_desc"])
    model = gpt(checkpoint["model_cfg"], tokenizer.vocab_size, tokenizer.pad_token_id, True)
    load_state(model, checkpoint["model"])
    model.eval()
    tasks = piano_task_manager(run_config.tasks)
    prefix = next(iter(tasks.values()))
    notes = {"pitch": np.array([60, 64, 67]), "velocity": np.array([80, 80, 80]),
             "start": np.array([0.0, 0.5, 1.0]), "end": np.array([0.4, 0.9, 1.4])}
    pre_input = ["<MAESTRO>", "<CHOPIN>", "<N_NOTES_5>", *prefix, "<MUSIC_TIME_0>",
                 "<MUSIC_TIME_10>"]
    ids = [tokenizer.token_to_id[t] for t in pre_input]
    ids += [int(i) for i in tokenizer.encode(notes)] + [tokenizer.token_to_id["<GENAI>"]]
    generated = []
    context = model.config.context_size
    for _ in range(4):
        window = ids[-context:]
        time_steps = token_ids_to_time_steps(tokenizer, window)
        with torch.no_grad():
            logits = model(torch.tensor([window]), torch.tensor([time_steps]))[0, -1]
        generated.append(int(logits.argmax()))
        ids.append(generated[-1])
    return generated


def token_ids_to_time_steps(tokenizer: ExponentialTimeTokenizer, ids: list[int]) -> list[int]:
    """midi-tokenizers de8fed8 (reference 4.6): counter from 1, nT adds n, <GENAI> restarts."""
    out, counter = [], 1
    for i in ids:
        token = tokenizer.vocab[i]
        if token == "<GENAI>":
            counter = 1
            out.append(0)
        elif token.endswith("T") and token[:-1].isdigit():
            counter += int(token[:-1])
            out.append(counter)
        elif token.startswith(("NOTE_ON", "NOTE_OFF", "VELOCITY")):
            out.append(counter)
        else:
            out.append(0)
    return out


# ------------------------------------------------------------------------------ the exports
def export(dataset: Path, out: Path, time_embedding: bool) -> Path:
    cfg = {"out_dir": str(out), "stage": "piano_task",
           "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "context_size": 96,
                     "use_time_embedding": time_embedding},
           "system": {"device": "cpu", "dtype": "float32", "data_workers": 0},
           "data": {"batch_size": 2, "context_size": 96, "notes_per_record": 16,
                    "prompt_layout": "annotated" if time_embedding else "plain"},
           "tasks": "piano_medium", "dataset": {"base_dataset_name": str(dataset)},
           "optimizer": {"max_iters": 2}, "lr": {"warmup_iters": 1},
           "eval_interval": 2, "eval_iters": 1}
    trainer.train(build_train_config(cfg))
    return out / "final.pt"


@pytest.fixture(scope="module")
def exports(maestro_dataset, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    return {"f37ac14": export(maestro_dataset, root / "plain", False),
            "head": export(maestro_dataset, root / "time", True)}


def test_f37ac14_resume_accepts_our_export(exports):
    stats = resume_training(exports["f37ac14"], head=False)
    assert stats.iter == 3 and stats.total_tokens == 2 * 2 * 96 * 1


def test_f37ac14_piano_eval_accepts_our_export(exports):
    assert 0 < piano_eval(exports["f37ac14"]) <= 1


def test_head_resume_accepts_our_export(exports):
    assert resume_training(exports["head"], head=True).iter == 3


def test_head_model_tuning_accepts_our_export(exports):
    assert model_tuning(exports["head"]).iter == 1


def test_head_dashboard_accepts_our_export(exports):
    generated = prompt_practice(exports["head"])
    assert len(generated) == 4 and all(0 <= t < 2265 for t in generated)


def test_run_config_holds_both_vocabularies(exports):
    checkpoint = torch.load(exports["head"], weights_only=False)
    run_cfg = checkpoint["run_config"]
    # the reference's schema ...
    assert run_cfg.model_task == "piano_task" and run_cfg.command == "init"
    assert run_cfg.training.max_notes_per_record == 16 and run_cfg.training.context_size == 96
    assert run_cfg.tokenizer.class_name == "ExponentialTimeTokenizer"
    assert run_cfg.tasks[0] == {"class": "BottomLineMasking", "param_range": [
        {"n_repetitions": 1}, {"n_repetitions": 2}, {"n_repetitions": 3}]}
    assert len(piano_task_manager(run_cfg.tasks)) == 40  # piano_medium
    assert checkpoint["model_cfg"] == run_cfg.model
    # ... and ours, nested as configs/piano.py writes it
    ours = run_cfg.piano_gpt_jax
    assert ours.stage == "piano_task" and ours.tasks == "piano_medium"
    assert ours.model.use_time_embedding is True and ours.data.notes_per_record == 16
    assert run_cfg.stage == "piano_task" and run_cfg.data.prompt_layout == "annotated"
    plain = torch.load(exports["f37ac14"], weights_only=False)["run_config"]
    assert plain.tasks[0] == {"class": "BottomLineMasking", "params": {"n_repetitions": 1}}
    assert "max_notes_per_record" not in plain.training
