"""Prometheus-style durations ("90s", "15m", "1h30m", "1d") in configuration files."""

from __future__ import annotations

import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
_DURATION = re.compile(r"^((\d+)(ms|s|m|h|d|w|y))+$")
_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")


def parse_duration(value: str | int | float) -> float:
    """Seconds in a duration given as a Prometheus duration string or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as '15m' or '1d', got {value!r}")
    if isinstance(value, int | float):
        if value < 0 or value != value:
            raise ValueError(f"a duration must be a non-negative number of seconds, got {value!r}")
        return float(value)
    if not _DURATION.match(value):
        raise ValueError(f"expected a duration such as '90s', '15m', '1h30m' or '1d', got {value!r}")
    return float(sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(value)))


def format_duration(seconds: float) -> str:
    """The shortest Prometheus duration string for a whole number of seconds (or milliseconds)."""
    if seconds <= 0:
        return "0s"
    millis = round(seconds * 1000)
    if millis % 1000:
        return f"{millis}ms"
    rest = millis // 1000
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
