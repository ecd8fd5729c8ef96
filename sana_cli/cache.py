"""Where sana-cli keeps its own files (the tiny models, the compile cache). Torch-free."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Where sana-cli keeps its own files: $SANA_CLI_CACHE, else $XDG_CACHE_HOME/sana-cli."""
    if os.environ.get("SANA_CLI_CACHE"):
        return Path(os.environ["SANA_CLI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sana-cli"
