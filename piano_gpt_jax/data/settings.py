"""The data path's settings: one typed object from the config (DataSettings.from_config) to
the tokenizer, records and loader. Defaults are the config's own (config.py declares each key
once); only what the data path adds (process shards, the time steps switch) is new here. No JAX:
the trainer passes this process's shard in.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from piano_gpt_jax.config import (
    LOSS_MASKINGS,
    STAGES,
    AugmentationSection,
    ConfigError,
    DataSection,
    DatasetSection,
    TokenizerSection,
    TrainConfig,
    build_train_config,
)
from piano_gpt_jax.data.records import Augmentation
from piano_gpt_jax.music.layouts import check_prompt_layout

if TYPE_CHECKING:
    from piano_gpt_jax.checkpoints import CheckpointRecord

_RUN, _DATA, _DATASET, _AUG = TrainConfig(), DataSection(), DatasetSection(), AugmentationSection()


@dataclass(frozen=True)
class DataSettings:
    stage: str = _RUN.stage
    loss_masking: str = _RUN.loss_masking
    tasks: Any = _RUN.tasks
    base_dataset_name: str = _DATASET.base_dataset_name
    extra_datasets: tuple[str, ...] = _DATASET.extra_datasets
    pause_detection_threshold: float = _DATASET.pause_detection_threshold
    prepared_dir: str = _DATASET.prepared_dir
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
    shard_index: int = 0  # this process's shard of every batch (jax.process_index())
    shard_count: int = 1  # jax.process_count()

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

    @classmethod
    def from_config(cls, cfg: TrainConfig, **overrides: Any) -> DataSettings:
        """The data pipeline's settings of run config `cfg` (overrides win)."""
        d, ds = cfg.data, cfg.dataset
        values = dict(
            stage=cfg.stage, loss_masking=cfg.loss_masking, tasks=cfg.tasks,
            base_dataset_name=ds.base_dataset_name, extra_datasets=ds.extra_datasets,
            pause_detection_threshold=ds.pause_detection_threshold, prepared_dir=ds.prepared_dir,
            speed_change_factors=ds.augmentation.speed_change_factors,
            max_pitch_shift=ds.augmentation.max_pitch_shift, batch_size=d.batch_size,
            context_size=d.context_size, notes_per_record=d.notes_per_record,
            data_workers=cfg.system.data_workers, seed=cfg.seed,
            use_time_steps=cfg.model.use_time_embedding,
            tokenizer_config=dataclasses.asdict(cfg.tokenizer), eval_splits=d.eval_splits,
            prompt_layout=d.prompt_layout)
        return cls(**{**values, **overrides})

    @property
    def host_batch_size(self) -> int:
        return self.batch_size // self.shard_count

    @property
    def augmentation(self) -> Augmentation:
        return Augmentation(int(self.max_pitch_shift), tuple(self.speed_change_factors))


def settings_for_checkpoint(record: CheckpointRecord, dataset: str | None = None,
                            stage: str | None = None) -> DataSettings:
    """The run's data settings (from the checkpoint's run config, ours or piano-gpt's), with
    overrides. A checkpoint without a usable run config gets defaults matching the model.
    Only one process's view is needed here, and no extra training datasets.
    """
    run = None
    if record.meta.config:  # ours, or translated from piano-gpt's run_config
        try:
            run = build_train_config(record.meta.config)
        except ConfigError:  # e.g. a piano-gpt config our validation rejects: defaults
            run = None
    overrides: dict[str, Any] = dict(
        use_time_steps=record.model_config.use_time_embedding, extra_datasets=(), data_workers=0,
        shard_index=0, shard_count=1, max_pitch_shift=0, speed_change_factors=())
    if dataset:
        overrides["base_dataset_name"] = dataset
    if stage:
        overrides["stage"] = stage
        if stage != "piano_task":
            overrides["loss_masking"] = "pretraining"
    if run is None:
        settings = DataSettings(**{"stage": "piano_task", "base_dataset_name": "builtin",
                                   "batch_size": 1, **overrides})
    else:
        settings = DataSettings.from_config(run, **overrides)
    return dataclasses.replace(
        settings, context_size=min(settings.context_size, record.model_config.context_size))
