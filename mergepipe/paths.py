"""Where mergepipe keeps its own state, and how a manifest names local paths."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    base = os.environ.get("MERGEPIPE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mergepipe")
    return Path(base)


def recorded_path(ref: str, relative_to: Path | None) -> str:
    """How a manifest records a local path: absolute, or relative to `relative_to`; other refs (hub
    ids) as given."""
    local = Path(ref).expanduser()
    if not local.exists():
        return ref
    local = local.resolve()
    # "./" keeps a relative path from reading as a hub id (org/name)
    return os.path.join(".", os.path.relpath(local, relative_to)) if relative_to else str(local)
