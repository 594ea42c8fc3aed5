"""The checkpoint package's one user-facing error type."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or does not fit the model: one line says which."""
