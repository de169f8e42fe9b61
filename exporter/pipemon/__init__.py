"""pipemon: monitoring for data pipelines."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
# The run-reporting API, imported on first use so that `import pipemon` stays light (standard library only).
_CLIENT_NAMES = ("track", "tracked", "current_run", "Reporter", "Run")
__all__ = ["__version__", *_CLIENT_NAMES]


def __getattr__(name: str) -> Any:
    if name in _CLIENT_NAMES:
        from pipemon import client

        return getattr(client, name)
    raise AttributeError(f"module 'pipemon' has no attribute {name!r}")
