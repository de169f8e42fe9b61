"""The old import path of the SQLite state (pipemon.backends.sqlite); kept for callers of `Storage`."""

from pipemon.backends import StorageError
from pipemon.backends.sqlite import FAULT_ENV, SQLiteBackend, state_path

Storage = SQLiteBackend

__all__ = ["FAULT_ENV", "SQLiteBackend", "Storage", "StorageError", "state_path"]
