"""Where mergepipe keeps its own state."""

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("MERGEPIPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergepipe")
    return Path(base)
