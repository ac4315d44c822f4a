"""A model folder anyone can load without trusting a pickle (the layout huggingface_hub's
`upload_folder` takes):

  FOLDER/model.safetensors  float32 weights under piano-gpt's `GPT` state-dict names, both tied
                            names (`transformer.wte.weight`, `lm_head.weight`) with identical
                            values, so piano-gpt's model code loads it with strict=True
  FOLDER/config.json        the model config (piano-gpt's model_cfg fields) plus vocab_size,
                            pad_token_id, the prompt layout, use_time_embedding, and `run`: the
                            run's metadata (step, tokens, losses, config), so a round trip through
                            the folder loses nothing a `.pt` carries besides the optimizer
  FOLDER/tokenizer.json     the tokenizer description (midi-tokenizers' `from_dict` reads it)
  FOLDER/README.md          the model card (model_card.py)

Reading checks everything against config.json before a tensor is used: a missing or extra
tensor, a shape the config does not give, a truncated weights file, a tokenizer of another
vocabulary — each a CheckpointError naming the file and what to do.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from piano_gpt_jax.checkpoints import state_dict as sd_lib
from piano_gpt_jax.checkpoints.errors import CheckpointError
from piano_gpt_jax.checkpoints.record import CheckpointRecord, RunMeta, jsonable
from piano_gpt_jax.checkpoints.run_config import MODEL_CFG_KEYS
from piano_gpt_jax.model import N_TIME_STEPS, ModelConfig
from piano_gpt_jax.music import layouts
from piano_gpt_jax.music.tokenizer import ExponentialTimeTokenizer

WEIGHTS, CONFIG, TOKENIZER, CARD = "model.safetensors", "config.json", "tokenizer.json", "README.md"
FORMAT = "piano-gpt-jax model folder v1"


def is_model_folder(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / WEIGHTS).is_file() and (path / CONFIG).is_file()


def folder_config(record: CheckpointRecord) -> dict[str, Any]:
    """config.json's content for `record`."""
    cfg = record.model_config
    tokenizer = record.tokenizer("the checkpoint")
    return {
        "model_type": "piano-gpt", "format": FORMAT,
        **{k: getattr(cfg, k) for k in MODEL_CFG_KEYS},
        "vocab_size": cfg.vocab_size, "pad_token_id": int(tokenizer.pad_token_id),
        "use_time_embedding": bool(cfg.use_time_embedding),
        "n_time_steps": N_TIME_STEPS if cfg.use_time_embedding else None,
        "prompt_layout": layouts.checkpoint_layout(record.meta.prompt_layout,
                                                   tokenizer.token_to_id),
        "run": record.meta.to_json(),
    }


def save_model_folder(record: CheckpointRecord, folder: str | Path, card: str,
                      overwrite: bool = False) -> Path:
    """Write `folder` (written beside it under a temporary name, then renamed: a failure leaves
    nothing half-written). An existing folder is replaced only with `overwrite` and only when it
    is a model folder (never someone's other files)."""
    folder = Path(folder)
    if record.tokenizer_desc is None:
        raise CheckpointError("this checkpoint has no tokenizer description, so a model folder "
                              "would not be usable for generation; export one that has it.")
    if folder.exists():
        if not (overwrite and is_model_folder(folder)):
            raise CheckpointError(
                f"{folder} already exists; choose a new folder"
                + (" (pass --overwrite to replace this model folder)"
                   if is_model_folder(folder) else " (it is not a model folder: nothing in it "
                                                   "is replaced)") + ".")
    if not folder.parent.is_dir():
        raise CheckpointError(f"{folder.parent}: directory does not exist; create it first.")
    arrays = {k: np.ascontiguousarray(v, np.float32)
              for k, v in sd_lib.params_to_arrays(record.model_config, record.params).items()}
    config = folder_config(record)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        # "format": "pt" is what PyTorch-side safetensors loaders look for.
        save_file(arrays, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG).write_text(json.dumps(jsonable(config), indent=1) + "\n")
        (tmp / TOKENIZER).write_text(json.dumps(jsonable(record.tokenizer_desc), indent=1) + "\n")
        (tmp / CARD).write_text(card)
        os.chmod(tmp, 0o755)
        if folder.exists():
            aside = folder.with_name(f".{folder.name}.replaced")
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder, aside)
            os.replace(tmp, folder)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_model_folder(folder: str | Path) -> CheckpointRecord:
    """The record of a model folder; CheckpointError for anything that does not add up."""
    folder = Path(folder)
    config = _read_json(folder / CONFIG)
    desc = _read_json(folder / TOKENIZER) if (folder / TOKENIZER).is_file() else None
    try:
        model_config = ModelConfig.from_dict(config)
    except (AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG}: not a usable model config ({e}); the folder "
                              "was not written by converters.export_hf.") from None
    if desc is not None:
        try:
            vocab = ExponentialTimeTokenizer.from_dict(desc).vocab_size
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{folder / TOKENIZER}: not a tokenizer description "
                                  f"({e}).") from None
        if vocab != model_config.vocab_size:
            raise CheckpointError(
                f"{folder}: {CONFIG} is for a vocabulary of {model_config.vocab_size} tokens but "
                f"{TOKENIZER} has {vocab}; the two files come from different models.")
    arrays = _read_weights(folder / WEIGHTS)
    expected = sd_lib.expected_state_dict_shapes(model_config)
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:4])}" + (" ..." if len(missing) > 4 else "")]
                 if missing else []) + ([f"unexpected {', '.join(extra[:4])}"
                                         + (" ..." if len(extra) > 4 else "")] if extra else [])
        raise CheckpointError(f"{folder / WEIGHTS}: its tensors do not match {CONFIG} "
                              f"({'; '.join(parts)}).")
    for key, shape in expected.items():
        if tuple(arrays[key].shape) != tuple(shape):
            raise CheckpointError(
                f"{folder / WEIGHTS}: {key} has shape {tuple(arrays[key].shape)} but {CONFIG} "
                f"gives {tuple(shape)}; the weights and the config come from different models.")
    try:
        params = sd_lib.arrays_to_params(model_config, arrays)
    except CheckpointError as e:
        raise CheckpointError(f"{folder / WEIGHTS}: {e}") from None
    meta = RunMeta.from_json(config.get("run") if isinstance(config.get("run"), dict) else None)
    if config.get("prompt_layout") and not meta.prompt_layout:
        meta.prompt_layout = config["prompt_layout"]
    meta.source = str(folder)
    return CheckpointRecord(model_config, params, desc, meta)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; a model folder holds {WEIGHTS}, {CONFIG} and "
                              f"{TOKENIZER}.") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:120]}); "
                              "re-copy the folder.") from None


def _read_weights(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; a model folder holds {WEIGHTS}, {CONFIG} and "
                              f"{TOKENIZER}.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a complete safetensors file ({str(e)[:160]}); it "
                              "is probably truncated: re-copy it.") from None
