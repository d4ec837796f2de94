"""Fault injection: kill `mergepipe execute` (a real process, SIGKILL) at random moments, then check
that no partial output is visible, that the resumed run re-reads at most the blocks not yet
journaled, and that its result is bit-identical to an uninterrupted run.

    python -m bench.faults [--kills 50] [--seed 0] [--slow-ms 25] [--dir DIR]

The tiny family merges in milliseconds, so the runs being killed sleep MERGEPIPE_TEST_SLOW_MS per
output tensor (a test-only hook) to give the kills something to land in. Each trial kills one run,
or on every third trial two in a row (a resumed run killed again), then resumes in-process to the
end. The test suite runs a few kills (tests/test_faults.py); this prints a table for many.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mergepipe.config import load_config
from mergepipe.demo import demo_config
from mergepipe.errors import MergepipeError
from mergepipe.execute import MANIFEST_NAME, execute, pending_read_bytes, plan_key
from mergepipe.worker import SLOW_ENV
from mergepipe.index import Catalog
from mergepipe.manifest import load_manifest
from mergepipe.plan import plan_merge
from mergepipe.publish import staging_for
from mergepipe.synth import TINY, build_family
from mergepipe.verify import verify

import torch
import yaml


@dataclass
class Trial:
    kill_at_s: float  # after the run's journal appeared (its work began)
    kills: int
    finished_first: bool  # the run had published OUT before the kill landed
    visible_partial: bool  # OUT existed after a kill that interrupted a run
    remaining_bytes: int  # input bytes not yet journaled at resume time
    reread_bytes: int  # input bytes the resumed run read
    total_bytes: int  # input bytes an uninterrupted run reads
    resumed_output_bytes: int
    identical: bool


def setup(root: Path, method: str = "task_arithmetic", budget: str = "60%") -> tuple[Path, str]:
    """Family, manifest, and the root hash of an uninterrupted run."""
    fam = build_family(root / "family", TINY, experts=3, seed=0, shards=2)
    cfg = demo_config(fam, method)
    for m in cfg["models"]:
        m["parameters"].update({"density": 0.3} if method == "ties" else {})
    (root / "merge.yml").write_text(yaml.safe_dump(cfg))
    m = plan_merge(load_config(root / "merge.yml"), budget, Catalog(root / "catalog.sqlite"))
    m.save(root / "manifest.json")
    ref = execute(m, root / "reference", force=True)
    return root / "manifest.json", ref.execution.root_hash


def _kill_once(manifest: Path, out: Path, journal: Path, delay: float, slow_ms: int) -> bool:
    """Start execute, wait until its journal appears, sleep `delay`, SIGKILL. True: it finished first."""
    env = dict(os.environ, **{SLOW_ENV: str(slow_ms)})
    before = journal.stat().st_mtime_ns if journal.exists() else None
    p = subprocess.Popen([sys.executable, "-m", "mergepipe", "execute", str(manifest), "-o", str(out)],
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline:
        if journal.exists() and journal.stat().st_mtime_ns != before:
            break
        time.sleep(0.005)
    time.sleep(delay)
    if p.poll() is not None:
        err = p.stderr.read().decode()
        if p.returncode != 0:
            raise RuntimeError(f"execute failed on its own: {err}")
        return True
    p.send_signal(signal.SIGKILL)
    p.wait()
    return False


def _complete(out: Path, ref_hash: str) -> bool:
    try:
        m = load_manifest(out / MANIFEST_NAME)
    except MergepipeError:
        return False
    return m.execution.root_hash == ref_hash and verify(m, output=out, check_input_blocks=False).ok


def run_trials(root: Path, kills: int, seed: int = 0, slow_ms: int = 25, log=None) -> list[Trial]:
    manifest, ref_hash = setup(root)
    m = load_manifest(manifest)
    n_tensors = sum(len(f.blocks) for f in m.base.files)
    run_s = n_tensors * slow_ms / 1000
    journal = staging_for((root / "out").resolve(), plan_key(m, torch.device("cpu"))).journal
    rng = random.Random(seed)
    trials: list[Trial] = []
    done_kills = 0
    while done_kills < kills:
        out = root / "out"
        shutil.rmtree(out, ignore_errors=True)
        n = 2 if len(trials) % 3 == 2 and kills - done_kills >= 2 else 1
        delay = 0.0
        finished = partial = False
        for _ in range(n):
            delay = rng.uniform(0, run_s)
            finished = _kill_once(manifest, out, journal, delay, slow_ms)
            done_kills += 1
            if out.exists():  # killed after the publishing rename, or finished: OUT must be complete
                finished = True
                partial = not _complete(out, ref_hash)
                break
        if finished:
            trials.append(Trial(delay, n, True, partial, 0, 0, 0, 0, not partial))
            continue
        remaining, total = pending_read_bytes(m, out)
        done = execute(m, out)
        ex = done.execution
        trials.append(Trial(delay, n, False, partial, remaining, ex.expert_bytes_read + ex.base_bytes_read, total,
                            ex.resumed_bytes, ex.root_hash == ref_hash))
        if log:
            t = trials[-1]
            log(f"kill at {t.kill_at_s:.3f} s (x{t.kills}): resumed {t.resumed_output_bytes} output bytes, "
                f"re-read {t.reread_bytes} of {t.remaining_bytes} remaining ({t.total_bytes} total), "
                f"identical {t.identical}")
    return trials


def table(trials: list[Trial]) -> str:
    rows = ["| # | kill at (s) | kills | partial OUT visible | resumed output bytes | re-read bytes | "
            "remaining bytes | full-run bytes | identical |", "|---|---|---|---|---|---|---|---|---|"]
    for i, t in enumerate(trials):
        if t.finished_first:
            rows.append(f"| {i} | {t.kill_at_s:.3f} | {t.kills} | {'YES' if t.visible_partial else 'no'} | (run had "
                        f"published before the kill) | | | | {'yes' if t.identical else 'NO'} |")
            continue
        rows.append(f"| {i} | {t.kill_at_s:.3f} | {t.kills} | {'YES' if t.visible_partial else 'no'} | "
                    f"{t.resumed_output_bytes} | {t.reread_bytes} | {t.remaining_bytes} | {t.total_bytes} | "
                    f"{'yes' if t.identical else 'NO'} |")
    resumed = [t for t in trials if not t.finished_first]
    total_kills = sum(t.kills for t in trials)
    ok = all(t.identical and not t.visible_partial and t.reread_bytes <= t.remaining_bytes for t in trials)
    saved = sum(t.total_bytes - t.reread_bytes for t in resumed)
    rows.append("")
    rows.append(f"{total_kills} kills in {len(trials)} trials ({len(trials) - len(resumed)} runs finished before "
                f"their kill); all identical, none visible, re-read <= remaining: {'yes' if ok else 'NO'}; "
                f"input bytes not re-read thanks to resume: {saved} of {sum(t.total_bytes for t in resumed)}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--slow-ms", type=int, default=25)
    ap.add_argument("--dir", type=Path, default=None)
    a = ap.parse_args()
    import tempfile
    root = a.dir or Path(tempfile.mkdtemp(prefix="mergepipe-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MERGEPIPE_CACHE", str(root / "cache"))
    t0 = time.perf_counter()
    trials = run_trials(root, a.kills, a.seed, a.slow_ms, log=lambda s: print(s, file=sys.stderr))
    print(table(trials))
    print(f"\n{time.perf_counter() - t0:.1f} s")
    if a.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
