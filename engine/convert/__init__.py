"""HF interop: import HF checkpoints into engine checkpoints and export them back, verified
against transformers. The maps are the families' tables (`engine.models`); this package holds the
generic driver, the file I/O and the verification."""


class ConvertError(ValueError):
    """Bad conversion input (file, key, shape, architecture): one line for the user."""
