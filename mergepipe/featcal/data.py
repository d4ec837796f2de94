"""FeatCal calibration data (spec §6): JSONL records -> per-expert token-id lists, plus the content
hashes a manifest needs for replay, and right-padded batches.

Each non-blank line is one JSON object holding `"text"` (tokenized with the base's tokenizer: its
default special tokens, no chat template, truncated to S) or `"input_ids"` (truncated to S, every id
in [0, vocab)). A `"task"` field routes the record to the expert of that name, so one shared file can
hold every task; a file without task fields is used whole by each expert it is given to. The first n
records (per expert) in file order are used; lines after them are not parsed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import xxhash
from torch import Tensor

from ..errors import MergepipeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class CalibData:
    """Token ids per expert, and what a replay must find unchanged."""
    ids: list[list[list[int]]]  # expert -> sequence -> token ids
    data_hashes: dict[str, str]  # file path -> xxh3_128 hex of its bytes
    tokenizer_hashes: dict[str, str]  # tokenizer file path -> xxh3_128 hex (empty when no text record)


@dataclass
class _Record:
    ids: list[int]
    task: str | None


class _Tokenizer:
    """Loads the base's tokenizer on the first text record only: id-only data needs no tokenizer."""

    def __init__(self, root: Path | None, seq_len: int) -> None:
        self.root, self.seq_len, self._tok = root, seq_len, None

    def __call__(self, text: str, where: str) -> list[int]:
        if self._tok is None:
            if self.root is None:
                raise MergepipeError(f"{where}: a text record needs the base model's tokenizer, and none was given")
            from transformers import AutoTokenizer
            try:
                self._tok = AutoTokenizer.from_pretrained(str(self.root))
            except Exception as e:  # noqa: BLE001 - transformers fails in many ways on a bad folder
                raise MergepipeError(f"{self.root}: cannot load the base tokenizer ({type(e).__name__})") from None
        return list(self._tok(text, truncation=True, max_length=self.seq_len)["input_ids"])

    def hashes(self) -> dict[str, str]:
        if self._tok is None:
            return {}
        return {str(self.root / f): xxhash.xxh3_128_hexdigest((self.root / f).read_bytes())
                for f in TOKENIZER_FILES if (self.root / f).is_file()}


def _parse(raw: bytes, where: str, tokenize: _Tokenizer, vocab_size: int, seq_len: int) -> _Record | None:
    """One JSONL line -> a record (None for a blank line); any defect is a one-line error at `where`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MergepipeError(f"{where}: not UTF-8") from None
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise MergepipeError(f"{where}: not a JSON object") from None
    if not isinstance(obj, dict):
        raise MergepipeError(f"{where}: not a JSON object")
    if ("text" in obj) == ("input_ids" in obj):
        raise MergepipeError(f"{where}: expected exactly one of \"text\" and \"input_ids\"")
    task = obj.get("task")
    if task is not None and not isinstance(task, str):
        raise MergepipeError(f"{where}: \"task\" must be a string")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise MergepipeError(f"{where}: \"text\" must be a string")
        ids = tokenize(obj["text"], where)
    else:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise MergepipeError(f"{where}: \"input_ids\" must be a list of integers")
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise MergepipeError(f"{where}: token id {bad} is outside [0, {vocab_size})")
    ids = ids[:seq_len]
    if not ids:
        raise MergepipeError(f"{where}: empty sequence")
    return _Record(ids, task)


def _read(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MergepipeError(f"{path}: calibration file not found") from None
    except OSError as e:
        raise MergepipeError(f"{path}: cannot read calibration file ({e.strerror})") from None
    if not data.strip():
        raise MergepipeError(f"{path}: calibration file is empty")
    return data


def _records(path: Path, data: bytes, wanted: dict[str | None, int], tokenize: _Tokenizer, vocab_size: int,
             seq_len: int) -> dict[str | None, list[list[int]]]:
    """The first `wanted[task]` records of each task (key None: records without a task field, for a
    file shared by experts without routing). Stops parsing once every quota is filled."""
    out: dict[str | None, list[list[int]]] = {k: [] for k in wanted}
    routed = None  # whether this file's records carry task fields; all or none must
    for no, raw in enumerate(data.split(b"\n"), start=1):
        if all(len(out[k]) >= n for k, n in wanted.items()):
            break
        where = f"{path}:{no}"
        rec = _parse(raw, where, tokenize, vocab_size, seq_len)
        if rec is None:
            continue
        if routed is None:
            routed = rec.task is not None
        if routed != (rec.task is not None):
            raise MergepipeError(f"{where}: records must all carry a \"task\" field or none may")
        key = rec.task if None not in wanted else None
        if key not in out:
            raise MergepipeError(f"{where}: task {rec.task!r} is not one of the experts' tasks {sorted(out)}")
        if len(out[key]) < wanted[key]:
            out[key].append(rec.ids)
    for key, seqs in out.items():
        if not seqs:
            what = "records" if key is None else f"records for task {key!r}"
            raise MergepipeError(f"{path}: no calibration {what}")
    return out


def load_calibration(files: Sequence[str | Path], experts: int, vocab_size: int, n: int, seq_len: int,
                     tokenizer_root: str | Path | None = None, tasks: Sequence[str] | None = None) -> CalibData:
    """Token ids for each of `experts` experts from one shared file or one file per expert.

    With `tasks` (one name per expert) a file's records are routed by their "task" field; a shared
    file with task fields requires `tasks`. Without task fields every expert given a file uses its
    first n records."""
    files = [Path(f) for f in files]
    if len(files) not in (1, experts):
        raise MergepipeError(f"calibration: {len(files)} files for {experts} experts (give one shared file or one per expert)")
    if tasks is not None and len(tasks) != experts:
        raise MergepipeError(f"calibration: {len(tasks)} task names for {experts} experts")
    if n < 1 or seq_len < 1:
        raise MergepipeError(f"calibration: n and seq_len must be positive (got {n}, {seq_len})")
    tokenize = _Tokenizer(Path(tokenizer_root) if tokenizer_root is not None else None, seq_len)
    hashes: dict[str, str] = {}
    ids: list[list[list[int]]] = []
    shared = len(files) == 1
    for path in dict.fromkeys(files):
        data = _read(path)
        hashes[str(path)] = xxhash.xxh3_128_hexdigest(data)
        routed = _first_task(path, data) is not None
        mine = range(experts) if shared else [i for i, f in enumerate(files) if f == path]
        if routed and tasks is None:
            raise MergepipeError(f"{path}: records carry \"task\" fields; the experts' task names are needed to route them")
        wanted = {tasks[i]: n for i in mine} if routed else {None: n}
        got = _records(path, data, wanted, tokenize, vocab_size, seq_len)
        for i in mine:
            ids.append((i, got[tasks[i] if routed else None]))
    ids.sort(key=lambda p: p[0])
    return CalibData([seqs for _, seqs in ids], hashes, tokenize.hashes())


def _first_task(path: Path, data: bytes) -> str | None:
    """The task field of the first record, which decides whether the file is routed by task."""
    for raw in data.split(b"\n"):
        if raw.strip():
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError, UnicodeDecodeError):
                return None  # _records reports the line
            return obj.get("task") if isinstance(obj, dict) and isinstance(obj.get("task"), str) else None
    return None


def batches(seqs: Sequence[Sequence[int]], batch_size: int, pad_id: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
    """Consecutive batches in sequence order: ids [B, S_b] right-padded with pad_id (any valid id; it is
    masked) and mask [B, S_b] (1 real, 0 padding). Right padding keeps every query row unmasked."""
    for j in range(0, len(seqs), batch_size):
        chunk = seqs[j:j + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, s in enumerate(chunk):
            ids[b, :len(s)] = torch.tensor(list(s), dtype=torch.long)
            mask[b, :len(s)] = 1
        yield ids, mask
