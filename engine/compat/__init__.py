"""The megatron-core CPU compatibility layer: the only place in the engine that patches anything.

`apply()` is explicit and idempotent, called by entry points (never at import), and does nothing
when CUDA is available. `self_test()` fails loudly when a patched megatron-core internal moved.
"""

from engine.compat.cpu import apply, is_applied, self_test

__all__ = ["apply", "is_applied", "self_test"]
