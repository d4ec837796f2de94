"""verify: do the inputs still match their recorded hashes, and does the output (an existing folder,
or a fresh re-execution) reproduce the recorded output hashes?"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import xxhash

from . import blocks as B
from .checkpoint import Reader
from .errors import MergepipeError
from .execute import execute, expected_hashes, open_inputs, root_hash
from .manifest import Manifest

CHUNK = 16 << 20


@dataclass
class VerifyResult:
    problems: list[str] = field(default_factory=list)
    inputs_checked: int = 0
    outputs_checked: int = 0
    reexecuted: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


def file_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def check_inputs(m: Manifest, root: Path | None, allow_pickle: bool, result: VerifyResult) -> None:
    try:
        base, experts = open_inputs(m, root, allow_pickle)
    except MergepipeError as e:
        result.problems.append(str(e))
        return
    reader = Reader()
    try:
        for rec, model in zip([m.base, *m.experts], [base, *experts]):
            want = expected_hashes(rec, model)
            for info in model.tensors.values():
                hashes = want.get((str(info.file), info.name))
                if hashes is None:
                    continue
                for blk in B.blocks(info):
                    if xxhash.xxh3_64_intdigest(reader.read(info.file, blk.start, blk.end)) != int(hashes[blk.index]):
                        result.problems.append(f"{info.file}: block {blk.index} of tensor {info.name!r} "
                                               "does not match its recorded hash (input changed)")
                        break
            result.inputs_checked += len(rec.files)
        if m.calibration is not None:
            from .featcal.stage import calibration_problems
            result.problems += calibration_problems(m.calibration, base.root, root)
            result.inputs_checked += len(m.calibration.data) + len(m.calibration.tokenizer)
    finally:
        reader.close()


def check_output(m: Manifest, out: Path, result: VerifyResult) -> None:
    assert m.execution is not None
    for name, rec in sorted(m.execution.outputs.items()):
        p = out / name
        if not p.is_file():
            result.problems.append(f"{p}: output file recorded in the manifest is missing")
        elif p.stat().st_size != rec.size:
            result.problems.append(f"{p}: output has {p.stat().st_size} bytes, expected {rec.size}")
        elif file_hash(p) != rec.hash:
            result.problems.append(f"{p}: output does not match its recorded hash")
        result.outputs_checked += 1


def verify(m: Manifest, output: str | Path | None = None, root: str | Path | None = None,
           device: str = "cpu", allow_pickle: bool = False, check_input_blocks: bool = True) -> VerifyResult:
    if m.execution is None:
        raise MergepipeError("manifest has no execution record: verify a manifest written by execute "
                             "(OUT/mergepipe.manifest.json)")
    root_p = Path(root) if root else None
    result = VerifyResult()
    if check_input_blocks:
        check_inputs(m, root_p, allow_pickle, result)
    if output is not None:
        check_output(m, Path(output), result)
        return result
    if result.problems:
        return result  # re-executing over changed inputs would only fail again
    tmp = Path(tempfile.mkdtemp(prefix="mergepipe-verify-"))
    try:
        again = execute(m, tmp / "out", device=device, root=root_p, allow_pickle=allow_pickle)
        result.reexecuted = True
        assert again.execution is not None
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
