"""verify: do the inputs still match their recorded hashes, and does the output (an existing folder,
or a fresh re-execution) reproduce the recorded output hashes?"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from . import blocks as B
from . import stages
from .checkpoint import Reader
from .errors import MergepipeError
from .execute import MANIFEST_NAME, execute, root_hash
from .manifest import Manifest, dumps, load_manifest
from .options import RunOptions
from .sink import hash_file
from .sources import Exact, open_recorded


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)
    inputs_checked: int = 0
    outputs_checked: int = 0
    reexecuted: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def check_inputs(m: Manifest, opts: RunOptions, result: VerifyResult) -> None:
    try:
        opened = open_recorded([m.base, *m.experts], opts.root_path, opts.allow_pickle)
    except MergepipeError as e:
        result.problems.append(str(e))
        return
    reader = Reader()
    try:
        for index, (o, rec) in enumerate(zip(opened, [m.base, *m.experts]), start=-1):
            for name, info in o.model.tensors.items():
                if not any((f.name, name) in o.hashes for f in rec.files):
                    continue
                stored = o.stored(index, name)
                for blk in B.blocks(info):
                    try:
                        Exact(stored, blk).check(reader.read(info.file, blk.start, blk.end), name)
                    except MergepipeError as e:
                        result.problems.append(f"{e} (input changed)")
                        break
            result.inputs_checked += len(rec.files)
            _check_sketches(o, reader, result)
        for st in m.stages:
            module = stages.get(st.kind)
            record = module.load(st.record, f"manifest: stage {st.kind}", len(m.experts))
            result.problems += module.input_problems(record, opened[0].model.root, opts.root_path)
    finally:
        reader.close()


def _check_sketches(o, reader: Reader, result: VerifyResult) -> None:
    """The sketch blocks the plan fills from, against their recorded hashes."""
    for name, st in (o.sketch or {}).items():
        for b, (start, end, want) in enumerate(zip(st.starts, st.ends, st.hashes)):
            if xxhash.xxh3_64_intdigest(reader.read(st.file, start, end)) != want:
                result.problems.append(f"{st.file}: the sketch of block {b} of tensor {name!r} does not match its "
                                       "recorded hash (sidecar changed)")
                break
    if o.sketch:
        result.inputs_checked += 1


def check_output(m: Manifest, out: Path, result: VerifyResult) -> None:
    assert m.execution is not None
    for name, rec in sorted(m.execution.outputs.items()):
        p = out / name
        if not p.is_file():
            result.problems.append(f"{p}: output file recorded in the manifest is missing")
        elif p.stat().st_size != rec.size:
            result.problems.append(f"{p}: output has {p.stat().st_size} bytes, expected {rec.size}")
        elif hash_file(p)[0] != rec.hash:
            result.problems.append(f"{p}: output does not match its recorded hash")
        result.outputs_checked += 1


def target(given: str | Path, output: str | Path | None) -> tuple[Manifest, Path | None]:
    """What `mergepipe verify GIVEN [--output OUT]` checks: GIVEN is an output folder (its own
    manifest, against itself), a completed manifest, or the plan manifest that OUT was executed
    from (then OUT's completed manifest, which must be that plan's)."""
    given = Path(given)
    if given.is_dir():
        if output is not None and Path(output).resolve() != given.resolve():
            raise MergepipeError(f"{given}: is an output folder; --output {output} names another")
        return load_manifest(given / MANIFEST_NAME), given
    m = load_manifest(given)
    if m.execution is not None:
        return m, Path(output) if output is not None else None
    if output is None:
        raise MergepipeError(f"{given}: is a plan (no execution record): give --output OUT, the folder it was "
                             "executed into, or verify OUT itself")
    done = load_manifest(Path(output) / MANIFEST_NAME)
    if _planned(done) != _planned(m):
        raise MergepipeError(f"{Path(output) / MANIFEST_NAME}: was not executed from the plan {given} (their plans differ)")
    return done, Path(output)


def _planned(m: Manifest) -> str:
    doc = dataclasses.asdict(m)
    doc["execution"] = None
    return dumps(doc)


def verify(m: Manifest, output: str | Path | None = None, options: RunOptions | None = None,
           check_input_blocks: bool = True, **flags) -> VerifyResult:
    if m.execution is None:
        raise MergepipeError("manifest has no execution record: verify a manifest written by execute "
                             "(OUT/mergepipe.manifest.json)")
    opts = options or RunOptions(**flags)
    result = VerifyResult()
    if check_input_blocks:
        check_inputs(m, opts, result)
    if output is not None:
        check_output(m, Path(output), result)
        return result
    if result.problems:
        return result  # re-executing over changed inputs would only fail again
    tmp = Path(tempfile.mkdtemp(prefix="mergepipe-verify-"))
    try:
        again = execute(m, tmp / "out", RunOptions(opts.device, root=opts.root, allow_pickle=opts.allow_pickle))
        result.reexecuted = True
        if root_hash(again.execution.outputs) != m.execution.root_hash:
            for name, rec in sorted(m.execution.outputs.items()):
                got = again.execution.outputs.get(name)
                if got is None or got.hash != rec.hash:
                    bad = [t for t, h in rec.tensors.items() if got is None or got.tensors.get(t) != h]
                    result.problems.append(f"{name}: re-execution differs from the recorded output "
                                           f"(tensors {', '.join(bad[:3])}{'...' if len(bad) > 3 else ''})")
        result.outputs_checked = len(again.execution.outputs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
