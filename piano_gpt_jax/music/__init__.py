"""The music layer, JAX-free: notes (pieces.py), MIDI files (midi.py), the tokenizer, PIANO
tasks, prompt layouts and their special tokens (layouts.py), and music time (time_steps.py).
Data records, sampling, generation, metrics and the PyTorch sampler all build on it."""
