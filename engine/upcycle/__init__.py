"""EfficientScale (AquilaMoE, arXiv 2408.06567): grow a pretrained dense model (Scale-Up,
`scale_up.py`) and turn it into a mixture of experts (Scale-Out, `scale_out.py`). The math is pure
functions on unsharded state dicts; `io.py` reads and writes checkpoints around it."""


class UpcycleError(ValueError):
    """Bad upcycling input (shapes, options, output directory): one line for the user."""
