"""piano-gpt-jax: a JAX/Flax trainer for piano-music GPT models, checkpoint-compatible with
PyTorch piano-gpt.

Importing the package sets the host allocator to keep freed memory (host_memory.py: ~25% off a
CPU train step); it runs here because it must precede XLA's worker threads.
"""

from piano_gpt_jax.host_memory import keep_freed_memory

HOST_MEMORY_KEPT = keep_freed_memory()
