"""Will a train step fit? One device's memory estimated from the config, before anything is
built or compiled.

Why: `data.batch_size=100000000` or `model.n_layer=100000` used to run silently for minutes while
memory grew, and `context_size=1e9` ended in a RESOURCE_EXHAUSTED traceback for a 512 GB buffer.
The estimate is closed-form (the parameter count is exact; tested against init_params), so it
costs nothing whatever the setting, and the refusal names the need, the budget
(memory_limits.py: the device's memory, or on CPU the host's, `ulimit -v`, the cgroup) and the
largest batch size, depth or context that fits with the other settings unchanged.

What one device holds during a step (float32 master weights; sharded over fsdp when enabled):
  params 4 B, AdamW mu and nu 8 B, MultiSteps' gradient accumulator 4 B, the gradients 4 B per
  parameter, plus a compute-dtype copy of the weights (bfloat16/float16: 2 B);
  activations kept for the backward pass, per token of the device's micro-batch and per layer:
  ~17 x n_embd values in the compute dtype (LayerNorm outputs, q/k/v, attention output, residuals,
  the MLP's 4 x n_embd input and GELU output) and, for our softmax attention (CPU, dropout,
  float16), the float32 scores and probabilities of every head (2 x T per head; "fused"
  attention keeps none); with `remat` on an accelerator only each block's input stays, plus one
  block recomputed (XLA:CPU's buffer assignment came out the same with and without remat: 566 MB
  for 6 x 128, 32 x 128 tokens, so on CPU remat saves nothing here);
  the logits in float32 with their softmax and gradient (3 x vocab per token).
Checked against XLA:CPU's compiled step (`memory_analysis()`: arguments + outputs + temporaries)
on six shapes from 1 to 4 x 512 x 512 tokens, float32 and bfloat16: the estimate is 0.75-1.16 of
XLA's figure (tiny preset: 410 MB against 466 MB). It leaves out XLA's fragmentation, the data
workers and the evaluation batches, so only what cannot fit is refused, and the settings it
suggests fill at most SUGGEST_SHARE of the budget.
"""

from __future__ import annotations

import dataclasses

import jax

from piano_gpt_jax import kernels, memory_limits
from piano_gpt_jax.model import N_TIME_STEPS, ModelConfig
from piano_gpt_jax.precision import compute_dtype

# Suggested settings fill at most this share of the budget: the estimate leaves out XLA's
# fragmentation, the data workers and the evaluation batches.
SUGGEST_SHARE = 0.8


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What decides one device's memory in a train step."""

    model: ModelConfig
    batch_size: int  # global micro-batch
    context_size: int  # tokens per row
    data_parallel: int  # devices the batch is split over
    fsdp: int  # devices the parameters are sharded over (1 = replicated)
    attention_kind: str  # kernels.attention_kind: einsum | blocked | fused
    remat_saves: bool = True  # False on XLA:CPU (see above)


def param_count(m: ModelConfig) -> int:
    """Exactly init_params' size (model_test pins it), computed without building anything."""
    c = m.n_embd
    per_layer = 12 * c * c + (13 * c if m.bias else 2 * c)
    count = m.vocab_size * c + m.context_size * c + m.n_layer * per_layer
    count += 2 * c if m.bias else c  # ln_f
    if m.use_time_embedding:
        count += N_TIME_STEPS * c
    return count


def step_bytes(shape: StepShape) -> dict[str, int]:
    """Estimated bytes one device holds during a train step, by part."""
    m = shape.model
    p = param_count(m) / max(shape.fsdp, 1)
    low = compute_dtype(m.dtype).itemsize
    state = p * (4 + 8 + 4 + 4) + (p * low if low < 4 else 0)
    tokens = -(-shape.batch_size // max(shape.data_parallel * shape.fsdp, 1)) * shape.context_size
    per_layer_token = 17 * m.n_embd * low
    if shape.attention_kind in ("einsum", "blocked"):
        per_layer_token += 2 * 4 * m.n_head * shape.context_size
    if m.remat and shape.remat_saves:
        layers = tokens * (m.n_layer * m.n_embd * low + per_layer_token)
    else:
        layers = tokens * m.n_layer * per_layer_token
    logits = tokens * m.vocab_size * 4 * 3
    return {"weights and optimizer state": int(state), "activations": int(layers + logits)}


def _need(shape: StepShape) -> int:
    return sum(step_bytes(shape).values())


def _largest(shape: StepShape, field: str, budget: int, step: int = 1) -> int:
    """The largest value of `field` (a multiple of `step`) whose step fits `budget`; 0 if none."""
    def fits(v: int) -> bool:
        return _need(_with(shape, field, v)) <= budget

    if not fits(step):
        return 0
    lo, hi = 1, 2
    while fits(hi * step) and hi < 2**40:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid * step) else (lo, mid)
    return lo * step


def _with(shape: StepShape, field: str, value: int) -> StepShape:
    if field == "batch_size":
        return dataclasses.replace(shape, batch_size=value)
    if field == "context_size":
        return dataclasses.replace(shape, context_size=value, model=dataclasses.replace(
            shape.model, context_size=value))
    return dataclasses.replace(shape, model=dataclasses.replace(shape.model, **{field: value}))


def refusal(shape: StepShape, budget: memory_limits.Budget) -> str | None:
    """None when the step fits `budget`; else the line that says why and what would fit."""
    parts = step_bytes(shape)
    need = sum(parts.values())
    if need <= budget.bytes:
        return None
    m = shape.model
    devices = shape.data_parallel * shape.fsdp
    room = int(budget.bytes * SUGGEST_SHARE)
    options = []
    batch = _largest(shape, "batch_size", room, step=devices)
    if batch:
        options.append(f"data.batch_size={batch}")
    layers = _largest(shape, "n_layer", room)
    if layers and layers < m.n_layer:
        options.append(f"model.n_layer={layers}")
    context = _largest(shape, "context_size", room)
    if context and context < shape.context_size:
        options.append(f"model.context_size and data.context_size={context}")
    detail = ", ".join(f"{k} {memory_limits.gib(v)}" for k, v in parts.items())
    where = "per device" if devices > 1 else "for the step"
    advice = ("one of these (each the largest that fits with the rest unchanged): " + ", ".join(
        options)) if options else "a smaller model: no batch size, depth or context fits"
    extra = "" if m.remat or not shape.remat_saves else "; model.remat=True keeps fewer activations"
    return (f"this run needs about {memory_limits.gib(need)} {where} ({detail}; "
            f"{param_count(m) / 1e6:,.1f}M parameters, {shape.batch_size} x "
            f"{shape.context_size} tokens per micro-batch over {devices} device(s)) but "
            f"{budget.what} leaves {memory_limits.gib(budget.bytes)}. Lower it to {advice}"
            f"{extra}.")


def shape_of(model: ModelConfig, batch_size: int, context_size: int, mesh_shape: dict) -> StepShape:
    """The StepShape of a run on a mesh {"data": n, "fsdp": k}."""
    kind = kernels.attention_kind(model.attention, model.dtype, model.dropout > 0)
    return StepShape(model, batch_size, context_size, int(mesh_shape.get("data", 1)),
                     int(mesh_shape.get("fsdp", 1)), kind, jax.default_backend() != "cpu")
