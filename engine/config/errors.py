"""The one exception type of the config package.

Owns `ConfigError`; imports nothing from the engine. A `ConfigError` message is one line: where
(file, dotted key), what was expected, what was found.
"""


class ConfigError(ValueError):
    """A recipe, an override or a parallel layout is invalid; the message is one line."""
