"""The data path's settings: one typed object from the config (TrainConfig.data_settings) to
the tokenizer, records and loader. Defaults are the config's own (config.py declares each key
once); only what the data path adds (process shards, the time steps switch) is new here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from piano_gpt_jax.config import (
    LOSS_MASKINGS,
    STAGES,
    AugmentationSection,
    DataSection,
    DatasetSection,
    TokenizerSection,
    TrainConfig,
)
from piano_gpt_jax.data.records import Augmentation
from piano_gpt_jax.music.layouts import check_prompt_layout

_RUN, _DATA, _DATASET, _AUG = TrainConfig(), DataSection(), DatasetSection(), AugmentationSection()


@dataclass(frozen=True)
class DataSettings:
    stage: str = _RUN.stage
    loss_masking: str = _RUN.loss_masking
    tasks: Any = _RUN.tasks
    base_dataset_name: str = _DATASET.base_dataset_name
    extra_datasets: tuple[str, ...] = _DATASET.extra_datasets
    pause_detection_threshold: float = _DATASET.pause_detection_threshold
    speed_change_factors: tuple[float, ...] = _AUG.speed_change_factors
    max_pitch_shift: int = _AUG.max_pitch_shift
    batch_size: int = _DATA.batch_size
    context_size: int = _DATA.context_size
    notes_per_record: int = _DATA.notes_per_record
    data_workers: int = _RUN.system.data_workers
    seed: int = _RUN.seed
    use_time_steps: bool = _RUN.model.use_time_embedding  # time steps for the time embedding
    tokenizer_config: dict = field(
        default_factory=lambda: dataclasses.asdict(TokenizerSection()))
    eval_splits: Any = _DATA.eval_splits
    prompt_layout: str = _DATA.prompt_layout  # "auto" | "annotated" | "plain"
    shard_index: int = field(default_factory=lambda: _process()[0])  # this process's shard
    shard_count: int = field(default_factory=lambda: _process()[1])

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.loss_masking not in LOSS_MASKINGS:
            raise ValueError(f"loss_masking must be one of {LOSS_MASKINGS}, got "
                             f"{self.loss_masking!r}")
        if self.prompt_layout != "auto":  # canonical name (old names are aliases)
            try:
                object.__setattr__(self, "prompt_layout", check_prompt_layout(self.prompt_layout))
            except ValueError as e:
                raise ValueError(f"prompt_layout: {e} (or 'auto')") from None
        if self.batch_size % self.shard_count:
            raise ValueError(
                f"data batch_size {self.batch_size} must be divisible by the number of JAX "
                f"processes ({self.shard_count})"
            )
        for name in ("context_size", "notes_per_record", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"data {name} must be positive, got {getattr(self, name)}")
        if any(not f > 0 for f in self.speed_change_factors):
            raise ValueError(f"speed_change_factors must be positive: {self.speed_change_factors}")
        if self.max_pitch_shift < 0:
            raise ValueError(f"max_pitch_shift must be >= 0, got {self.max_pitch_shift}")

    @property
    def host_batch_size(self) -> int:
        return self.batch_size // self.shard_count

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(int(self.max_pitch_shift), tuple(self.speed_change_factors))


def _process() -> tuple[int, int]:
    """(index, count) of this JAX process (imported here only: the data path needs no JAX)."""
    import jax

    return jax.process_index(), jax.process_count()
