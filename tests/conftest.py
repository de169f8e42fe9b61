import sys
from pathlib import Path

# Tests import shared helpers as `tests.procs`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
