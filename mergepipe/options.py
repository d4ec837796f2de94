"""One value for the run flags, from the CLI down to the workers: nothing passes them one by one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"  # cpu, cuda or cuda:N
    force: bool = False  # replace an existing output folder
    root: str | Path | None = None  # folder that relative model paths in a manifest start from
    allow_pickle: bool = False  # load pickled .bin checkpoints (with weights_only)
    allow_nonfinite: bool = False  # merge inputs that hold NaN or Inf (a plan that allowed them always does)
    progress: Callable[[int], None] | None = None  # bytes just read
    executor: str = "local"  # local (this process) or ray (a Ray cluster's tasks)
    ray_address: str | None = None  # the cluster to join: auto, HOST:PORT, or None (RAY_ADDRESS, else a new local one)
    path_map: tuple[str, ...] | list[str] | None = ()  # DRIVER=WORKER path prefixes, for workers that mount the files elsewhere

    @property
    def root_path(self) -> Path | None:
        return Path(self.root) if self.root else None

    def worker_path(self, path: str | Path) -> str:
        """Where a Ray worker finds a file this process names `path` (the longest matching prefix of
        the path map wins)."""
        path = str(path)
        best = None
        for entry in self.path_map or ():
            here, sep, there = entry.partition("=")
            here = here.rstrip("/") or "/"
            if sep and (path == here or path.startswith(here.rstrip("/") + "/")) and (best is None or len(here) > len(best[0])):
                best = (here, there.rstrip("/") or "/")
        if best is None:
            return path
        rest = path[len(best[0]):].lstrip("/")
        return str(Path(best[1]) / rest) if rest else best[1]


@dataclass(frozen=True)
class PlanOptions:
    planner: str = "score"  # or "random", a control with the same budget
    seed: int = 0  # of the random planner
    relative_to: str | Path | None = None  # record local model paths relative to this folder
    allow_pickle: bool = False
    allow_nonfinite: bool = False  # merge inputs that hold NaN or Inf (recorded in the plan)
    progress: Callable[[int], None] | None = None  # bytes indexed
    source: str = "<config>"  # where the config came from, for error messages
    fill: str = "sketch"  # what an unread expert block counts as: its sketch from the index, or "zero"
    sketch: str = "q2"  # the sketch kind (mergepipe.sketch.KINDS), at its default parameters
