"""Prompt layouts: the special tokens around the notes, and the one builder of every prompt.

Training records (data/records.py) and generation (generate.py, the web app) build their prompts
here, so the layout a model was trained on is the layout it is prompted with.

Tokens. Each record starts with a dataset and a composer token (the reference MusicManager's
lists and rules: order decides ids, so it is kept). A PIANO-task record then names its task and
its target, and `<GENAI>` separates the prompt from the answer.

Layouts of a PIANO-task prompt (the names piano-gpt's commits would give them are aliases):
  * "annotated" (piano-gpt HEAD; alias "head"): `[dataset, composer, <N_NOTES_k>] + task tokens
    + [<MUSIC_TIME_a>, <MUSIC_TIME_b>] + ET(source) + <GENAI>`, the answer `ET(target) +
    <EOGENAI>` — the prompt announces how many notes to write and when they start;
  * "plain" (piano-gpt f37ac14; alias "f37ac14"): `[dataset, composer] + task tokens +
    ET(source) + <GENAI>`, the answer `ET(target)`; such vocabularies have no N_NOTES /
    MUSIC_TIME / <EOGENAI> tokens and usually no room for the 1,395 of them.
A continuation prompt is `[dataset, composer] + ET(notes)` in both.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

# Prefix tokens of the reference MusicManager, in the reference order (the order decides ids).
DATASET_TOKENS = (
    "<MAESTRO>",
    "<PIJAMA>",
    "<VGMIDI>",
    "<MUSIC-NET>",
    "<PIANO-MIDI-DE>",
    "<LAKH-LMD-FULL>",
    "<GIANT-MIDI>",
    "<IMSLP>",
    "<ATEPP-1.1>",
    "<PIANO_FOR_AI>",
)
FALLBACK_DATASET_TOKEN = "<PIANO_FOR_AI>"
COMPOSER_TOKENS = (
    "<SCRIABIN>",
    "<FRANCK>",
    "<MOZART>",
    "<CHOPIN>",
    "<MENDELSSON>",
    "<LISZT>",
    "<SCHUBERT>",
    "<BRAHMS>",
    "<HAYDN>",
    "<BEETHOVEN>",
    "<BALAKIREV>",
    "<SCHUMANN>",
    "<RACHMANIOFF>",
    "<UNKNOWN_COMPOSER>",
    "<BACH>",
)
UNKNOWN_COMPOSER_TOKEN = "<UNKNOWN_COMPOSER>"

# composer key -> (surname spellings matched as whole words, reference token). The reference token
# names misspell two composers; we also accept the usual spellings so that "Felix Mendelssohn" and
# "Sergei Rachmaninoff" are recognised (the reference regex missed them).
COMPOSERS: dict[str, tuple[tuple[str, ...], str]] = {
    "scriabin": (("scriabin", "skryabin"), "<SCRIABIN>"),
    "franck": (("franck",), "<FRANCK>"),
    "mozart": (("mozart",), "<MOZART>"),
    "chopin": (("chopin",), "<CHOPIN>"),
    "mendelssohn": (("mendelssohn", "mendelsson"), "<MENDELSSON>"),
    "liszt": (("liszt",), "<LISZT>"),
    "schubert": (("schubert",), "<SCHUBERT>"),
    "brahms": (("brahms",), "<BRAHMS>"),
    "haydn": (("haydn",), "<HAYDN>"),
    "beethoven": (("beethoven",), "<BEETHOVEN>"),
    "balakirev": (("balakirev",), "<BALAKIREV>"),
    "schumann": (("schumann",), "<SCHUMANN>"),
    "rachmaninoff": (("rachmaninoff", "rachmaninov", "rachmanioff"), "<RACHMANIOFF>"),
    "bach": (("bach",), "<BACH>"),
}
_COMPOSER_PATTERNS = {
    key: re.compile(r"\b(?:" + "|".join(names) + r")\b", re.IGNORECASE)
    for key, (names, _) in COMPOSERS.items()
}



GENAI = "<GENAI>"
EOGENAI = "<EOGENAI>"
MAX_MUSIC_TIME_S = 120.0


def n_notes_token(n: int) -> str:
    return f"<N_NOTES_{int(n)}>"


def music_time_token(t: float) -> str:
    """Absolute time token at 100 ms resolution, clipped at 120 s (NaN -> 0), as MusicManager."""
    t = 0.0 if t is None or not np.isfinite(t) else min(float(t), MAX_MUSIC_TIME_S)
    return f"<MUSIC_TIME_{int(10 * round(t, 1))}>"


ANNOTATED, PLAIN = "annotated", "plain"
PROMPT_LAYOUTS = (ANNOTATED, PLAIN)
# What configs and checkpoints written before these names said (the piano-gpt commits).
LAYOUT_ALIASES = {"head": ANNOTATED, "f37ac14": PLAIN}


def check_prompt_layout(layout: str) -> str:
    """The canonical name of a layout (aliases accepted); ValueError for anything else."""
    layout = LAYOUT_ALIASES.get(layout, layout)
    if layout not in PROMPT_LAYOUTS:
        names = [*PROMPT_LAYOUTS, *LAYOUT_ALIASES]
        raise ValueError(f"prompt layout must be one of {names}, got {layout!r}")
    return layout


def layout_prefix_tokens(layout: str, max_n_notes: int) -> list[str]:
    """The record-prefix tokens a layout needs, in the order a fresh vocab gets them: plain only
    has the dataset and composer tokens; annotated adds N_NOTES and MUSIC_TIME."""
    if check_prompt_layout(layout) == PLAIN:
        return [*DATASET_TOKENS, *COMPOSER_TOKENS]
    return music_special_tokens(max_n_notes)


def detect_prompt_layout(tokenizer: Any, max_n_notes: int | None = None) -> str:
    """The layout a (checkpoint's) tokenizer was made for.

    A vocabulary holding <MUSIC_TIME_0> was built for the annotated layout. One holding <GENAI>
    but no <MUSIC_TIME_0> was trained on plain (f37ac14) records. Any other vocabulary takes the
    annotated layout when the caller may add tokens (training: `max_n_notes` given, the N_NOTES
    range it would add) and the missing MusicManager tokens fit its free slots; otherwise (or
    with `max_n_notes` None: the vocabulary is used as it is, as for generation) only the plain
    layout fits in it.
    """
    made_for = vocabulary_layout(tokenizer.token_to_id)
    if made_for is not None:
        return made_for
    if max_n_notes is not None:
        missing = [t for t in music_special_tokens(max_n_notes) if t not in tokenizer.token_to_id]
        if len(missing) <= tokenizer.free_special_slots:
            return ANNOTATED
    return PLAIN


def vocabulary_layout(tokens: Collection[str]) -> str | None:
    """The layout a vocabulary was made for, when its tokens say: <MUSIC_TIME_0> means
    annotated; <GENAI> without it means plain (PIANO tasks without MUSIC_TIME: f37ac14)."""
    if "<MUSIC_TIME_0>" in tokens:
        return ANNOTATED
    if GENAI in tokens:
        return PLAIN
    return None


def checkpoint_layout(recorded: str | None, vocabulary: Collection[str] | None) -> str:
    """The layout a checkpoint's prompts are built in, the one rule every reader of a checkpoint
    asks (generate, the app, the model folder, the `.pt` export): the layout its run recorded
    (what its PIANO-task records were), else the one its vocabulary was made for with nothing
    added (detect_prompt_layout without room to add: plain when its tokens do not say), else,
    with no vocabulary to read, the annotated layout of piano-gpt's current form."""
    if recorded:
        return check_prompt_layout(recorded)
    if vocabulary is None:
        return ANNOTATED
    return vocabulary_layout(vocabulary) or PLAIN


def music_special_tokens(max_n_notes: int) -> list[str]:
    """The MusicManager tokens in reference order: dataset, composer, N_NOTES, MUSIC_TIME."""
    return [
        *DATASET_TOKENS,
        *COMPOSER_TOKENS,
        *(n_notes_token(k) for k in range(int(max_n_notes) + 1)),
        *(f"<MUSIC_TIME_{k}>" for k in range(int(10 * MAX_MUSIC_TIME_S) + 1)),
    ]


# ------------------------------------------------------------------------------ the builders
def task_prompt_tokens(layout: str, dataset_token: str | None, composer_token: str | None,
                       task_tokens: Sequence[str], target_starts: np.ndarray) -> list[str]:
    """The special tokens before a PIANO-task prompt's source notes, in `layout`. A None
    dataset/composer token is left out (a vocabulary without them)."""
    head = [t for t in (dataset_token, composer_token) if t is not None]
    if check_prompt_layout(layout) == PLAIN:
        return [*head, *task_tokens]
    starts = np.asarray(target_starts, np.float64)
    t_min = float(starts.min()) if len(starts) else float("nan")
    t_max = float(starts.max()) if len(starts) else float("nan")
    return [*head, n_notes_token(len(starts)), *task_tokens, music_time_token(t_min),
            music_time_token(t_max)]


def task_prompt(tokenizer: Any, layout: str, split: Any, dataset_token: str | None,
                composer_token: str | None) -> np.ndarray:
    """Ids of a PIANO-task prompt: special tokens, ET(source), <GENAI> (tasks.TaskSplit)."""
    head = task_prompt_tokens(layout, dataset_token, composer_token, split.prefix_tokens,
                              split.target["start"])
    return np.concatenate([token_ids(tokenizer, head), tokenizer.encode(split.source),
                           token_ids(tokenizer, [GENAI])]).astype(np.int32)


def answer_end(tokenizer: Any, layout: str) -> list[int]:
    """Ids that close a task's answer (ET(target) + this): <EOGENAI> in the annotated layout."""
    return [tokenizer.token_to_id[EOGENAI]] if check_prompt_layout(layout) == ANNOTATED else []


def continuation_prompt(tokenizer: Any, notes: Any, dataset_token: str | None,
                        composer_token: str | None) -> np.ndarray:
    """Ids of a continuation prompt: [dataset, composer] + ET(notes) (a None token left out)."""
    head = [t for t in (dataset_token, composer_token) if t is not None]
    return np.concatenate([token_ids(tokenizer, head),
                           tokenizer.encode(notes)]).astype(np.int32)


class MissingTokens(KeyError):
    """A prompt needs tokens this vocabulary does not have."""

    def __init__(self, missing: Sequence[str]):
        self.missing = list(missing)
        super().__init__(f"the vocabulary has no {self.missing}; the model was not trained "
                         "with them")

    def __str__(self) -> str:
        return str(self.args[0])


def token_ids(tokenizer: Any, tokens: Sequence[str]) -> np.ndarray:
    missing = [t for t in tokens if t not in tokenizer.token_to_id]
    if missing:
        raise MissingTokens(missing)
    return np.asarray([tokenizer.token_to_id[t] for t in tokens], np.int32)


# ------------------------------------------------------------------------------ sources
def parse_source(source: Any) -> dict:
    """A record's ``source`` as a dict; tolerant of None, bad JSON and non-dict JSON."""
    if isinstance(source, Mapping):
        return dict(source)
    if isinstance(source, (str, bytes)):
        try:
            value = json.loads(source)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def composer_key(source_json: Any) -> str | None:
    """Lower-case composer key when exactly one known surname occurs in ``source["composer"]``."""
    composer = parse_source(source_json).get("composer")
    if not isinstance(composer, str) or not composer:
        return None
    matches = [key for key, pattern in _COMPOSER_PATTERNS.items() if pattern.search(composer)]
    return matches[0] if len(matches) == 1 else None


def composer_token(source: Any) -> str:
    key = composer_key(source)
    return COMPOSERS[key][1] if key is not None else UNKNOWN_COMPOSER_TOKEN


def dataset_token(source: Any) -> str:
    """The dataset prefix token; a missing or unknown ``dataset`` falls back to <PIANO_FOR_AI>."""
    name = parse_source(source).get("dataset")
    if isinstance(name, str):
        wanted = name.strip().lower()
        for token in DATASET_TOKENS:
            if token[1:-1].lower() == wanted:
                return token
    return FALLBACK_DATASET_TOKEN
