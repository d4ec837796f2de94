"""Memory faulted in while torch loads. On the VMs this project runs on, a fresh page costs more to
fault in than a pass of a merge over it, and importing torch keeps one core busy for a second or more
while the other idles. A whole-tensor merge's largest buffers are known from its manifest before
torch is imported: `start` faults them in on that idle core, and whole.Spares takes them before it
allocates. Plain anonymous mappings: nothing here imports torch or asks for huge pages."""

from __future__ import annotations

import json
import mmap
import threading
from pathlib import Path

import numpy as np

from . import libc

_POPULATE_WRITE = 23  # MADV_POPULATE_WRITE (Linux 5.14): fault a range in, writable, in one call
_READY: list[np.ndarray] = []
_LOCK = threading.Lock()
_THREAD: threading.Thread | None = None


def start(nbytes: int, count: int) -> None:
    """Fault in `count` buffers of `nbytes` each on a background thread."""
    _launch(lambda: (nbytes, count))


def for_manifest(path: str | Path) -> None:
    """Start warming what the manifest's merge will allocate first: for a whole-tensor method, a
    float32 buffer of its largest tensor per input and its extras (operators.WHOLE_BUFFERS). The
    manifest and the base's headers are read on the warming thread too, so nothing is added to the
    start-up; any problem with them is left to the load that follows."""
    _launch(lambda: _sizes(Path(path)))


def _sizes(path: Path) -> tuple[int, int]:
    from .checkpoint import open_model
    from .operators import WHOLE_BUFFERS
    try:
        doc = json.loads(path.read_text())
        extra = WHOLE_BUFFERS.get(doc["operator"]["name"])
        if extra is None:
            return 0, 0
        names = set(doc["plan"]["tensors"])
        model = open_model(doc["base"]["ref"])
        numel = max((t.numel for n, t in model.tensors.items() if n in names and t.is_float), default=0)
        return 4 * numel, len(doc["experts"]) + extra
    except Exception:  # noqa: BLE001 - an optimisation only: load_manifest reports what is wrong
        return 0, 0


def _launch(sizes) -> None:
    global _THREAD
    if _THREAD is not None:
        return

    def run() -> None:
        nbytes, count = sizes()
        if nbytes <= 0:
            return
        # foreign calls run without the GIL: torch's import goes on meanwhile
        madvise, memset = libc.function("madvise"), libc.function("memset")
        if memset is None:  # no C library to call: nothing is warmed
            return
        for _ in range(count):
            m = mmap.mmap(-1, nbytes)
            with libc.address(m) as addr:
                if madvise is None or madvise(addr, nbytes, _POPULATE_WRITE) != 0:  # no such advice: touch every byte
                    memset(addr, 0, nbytes)
            with _LOCK:
                _READY.append(np.frombuffer(m, np.uint8))
    _THREAD = threading.Thread(target=run, daemon=True, name="mergepipe-warm")
    _THREAD.start()


def take(nbytes: int) -> np.ndarray | None:
    """A faulted-in buffer of at least `nbytes` (uint8), or None. Waits for the warming to finish:
    what it has left to fault would cost the caller the same."""
    if _THREAD is None:
        return None
    _THREAD.join()
    with _LOCK:
        fits = [i for i, b in enumerate(_READY) if b.nbytes >= nbytes]
        return _READY.pop(fits[0]) if fits else None


def clear() -> None:
    global _THREAD
    if _THREAD is not None:
        _THREAD.join()
    with _LOCK:
        _READY.clear()
    _THREAD = None

