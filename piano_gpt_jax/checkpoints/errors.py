"""The checkpoint layer's one error type (its own module so every other module can raise it)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message says what is wrong and what to do."""
