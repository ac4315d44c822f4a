"""How tokens are picked, stated once.

Each sampling setting is one field of `SamplingSettings`: its default, its check, its help, its
command-line flag (`add_arguments`, used by generate, evaluate and torch_generate) and its control
in the web app (`Control`) all come from that field, and the values the compiled decode reads at
every token (`draw_values`: temperature and the filters) are the fields declared with a dtype. So
a new filter (typical-p, say) is a field here plus its lines in `sampling.filter_logits` and in
the PyTorch twin's `filter_logits`; every tool and the app then offer it, and the settings object
travels whole from the command line or the page to either sampler.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Control:
    """The app's control for a setting: a slider over [low, high], or a number box."""

    label: str
    low: float
    high: float
    step: float
    slider: bool = False


def _setting(default: Any, help_text: str, check: Callable[[Any], bool] | None = None,
             rule: str = "", *, control: Control | None = None, drawn_as: str | None = None):
    """A user-facing setting; `drawn_as` (a dtype name) marks a value the decode reads per token."""
    return dataclasses.field(default=default, metadata={
        "help": help_text, "check": check, "rule": rule, "control": control,
        "drawn_as": drawn_as})


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """temperature 0 = greedy; top_k 0, top_p 1 and min_p 0 switch their filter off."""

    temperature: float = _setting(
        1.0, "0 = greedy", lambda v: v >= 0, "must be >= 0 (0 = greedy)",
        control=Control("Temperature", 0.0, 2.0, 0.05, slider=True), drawn_as="float32")
    top_k: int = _setting(
        0, "keep the k most likely tokens; 0 = off", lambda v: v >= 0, "must be >= 0 (0 = off)",
        control=Control("Top-k", 0, 10_000, 1), drawn_as="int32")
    top_p: float = _setting(
        1.0, "keep the most likely tokens that hold this much probability; 1 = off",
        lambda v: 0 < v <= 1, "must be in (0, 1] (1 = off)",
        control=Control("Top-p", 0.01, 1.0, 0.01, slider=True), drawn_as="float32")
    min_p: float = _setting(
        0.0, "drop tokens less likely than this fraction of the most likely one; 0 = off",
        lambda v: 0 <= v < 1, "must be in [0, 1) (0 = off)",
        control=Control("Min-p", 0.0, 0.99, 0.01, slider=True), drawn_as="float32")
    seed: int = _setting(0, "seed of the random draws",
                         control=Control("Seed", 0, 2**31 - 1, 1))
    # One default for every tool: the generate CLI's, which its users have relied on since
    # the start (the app offered 256 until the settings were stated once).
    max_new_tokens: int = _setting(512, "new tokens per sample, at most", lambda v: v >= 1,
                                   "must be >= 1",
                                   control=Control("Max new tokens", 1, 8192, 32))
    stop_at_eos: bool = True  # stop a row when it samples <EOGENAI> (if the vocab has it)
    window_keep: int | None = None  # tokens kept when the context is full; None: context // 2

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value, check = getattr(self, f.name), f.metadata.get("check")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
            if check is not None and not check(value):
                raise ValueError(f"{f.name} {f.metadata['rule']}, got {value}")

    def kept_tokens(self, context_size: int) -> int:
        """Tokens kept when the context is full; one rule for the JAX and PyTorch samplers, whose
        greedy tokens agree only if they crop alike."""
        keep = self.window_keep or max(1, context_size // 2)
        if not 1 <= keep <= context_size:
            raise ValueError(f"window_keep must be in [1, context_size={context_size}], got {keep}")
        return keep

    def draw_values(self) -> dict[str, Any]:
        """What decides each draw (temperature, the filters), by name: the samplers' filters
        take this mapping whole."""
        return {name: getattr(self, name) for name in draw_dtypes()}

    def replace(self, **changes: Any) -> SamplingSettings:
        return dataclasses.replace(self, **changes)


def draw_dtypes() -> dict[str, str]:
    """{name: dtype name} of the values the compiled decode reads at every token."""
    return {f.name: f.metadata["drawn_as"] for f in dataclasses.fields(SamplingSettings)
            if f.metadata.get("drawn_as")}


def user_settings() -> Iterator[dataclasses.Field]:
    """The settings a user chooses (a flag and a control each), in declaration order."""
    return (f for f in dataclasses.fields(SamplingSettings) if f.metadata.get("control"))


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser, leave_out: tuple[str, ...] = ()) -> None:
    """One flag per user setting, with its default and help from the field."""
    for f in user_settings():
        if f.name not in leave_out:
            parser.add_argument(flag(f.name), dest=f.name, type=type(f.default),
                                default=f.default, help=f.metadata["help"])


def from_arguments(args: argparse.Namespace, **changes: Any) -> SamplingSettings:
    """The settings a parsed command line asks for (ValueError: a value the sampler refuses)."""
    given = {f.name: getattr(args, f.name) for f in user_settings() if hasattr(args, f.name)}
    return SamplingSettings(**{**given, **changes})
