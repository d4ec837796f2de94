"""What the kernel reads for a set of byte ranges: whole pages, each page once.

A budget caps what the OS reads of the experts, not only the bytes mergepipe asks for: a block that
ends mid-page costs the rest of that page, two blocks that share a page cost it once, and every
file opened costs the pages of its header. The planner charges its selection by this count.
"""

from __future__ import annotations

import mmap

import numpy as np

PAGE = mmap.PAGESIZE


def touched(files: np.ndarray, starts: np.ndarray, ends: np.ndarray, page: int = PAGE) -> int:
    """Bytes of the distinct pages that the ranges [starts, ends) of the given files (integer ids)
    touch. Empty ranges touch nothing."""
    keep = ends > starts
    files, starts, ends = files[keep], starts[keep], ends[keep]
    if not len(files):
        return 0
    first, stop = starts // page, -(-ends // page)  # [first, stop) pages of each range
    order = np.lexsort((first, files))
    files, first, stop = files[order], first[order], stop[order]
    covered = _earlier_reach(stop, files)  # pages up to here are counted already
    return int(np.maximum(stop - np.maximum(first, covered), 0).sum()) * page


def _earlier_reach(stop: np.ndarray, files: np.ndarray) -> np.ndarray:
    """Per range (sorted by file, then start), the furthest page end among the earlier ranges of its
    file, -1 for a file's first: a running maximum that restarts at each file."""
    prev = np.r_[-1, stop[:-1]]
    new_file = np.r_[True, files[1:] != files[:-1]]
    # restart the running maximum at each file: lift each file's values above every earlier file's
    lift = np.cumsum(new_file) * (int(stop.max()) + 2)
    run = np.maximum.accumulate(np.where(new_file, -1, prev) + lift) - lift
    return np.where(new_file, -1, run)
