"""Field checks shared by the recipe sections: each raises one ConfigError line naming the key."""

import math

from engine.config.errors import ConfigError


def at_least(key: str, value: int | float | None, low: int | float) -> None:
    if value is not None and value < low:
        raise ConfigError(f"{key}: expected >= {low}, got {value}")


def one_of(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: expected one of {'|'.join(choices)}, got {value!r}")


def fraction(key: str, value: float, *, open_low: bool = False, closed_high: bool = False) -> None:
    low_ok = value > 0.0 if open_low else value >= 0.0
    high_ok = value <= 1.0 if closed_high else value < 1.0
    if not (low_ok and high_ok):
        interval = ("(0" if open_low else "[0") + (", 1]" if closed_high else ", 1)")
        raise ConfigError(f"{key}: expected a value in {interval}, got {value}")


def positive_float(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0.0):
        raise ConfigError(f"{key}: expected a finite number > 0, got {value}")

