"""Real tasks for the SmolLM2 quality family: BIG-bench items with short exact-match answers.

The data ships on PyPI in the `bigbench==1.0.0` sdist (bigbench/benchmark_tasks/<task>/task.json);
`ensure_bigbench` fetches it with pip into the cache and extracts only the task files used here.

Every item is a (prompt, answer) pair of plain strings, e.g. ("What is 161 plus 390?\\nAnswer:",
" 551"): no chat template. The answer carries its leading space (so the prompt and the answer
tokenize separately exactly as they would together for these BPE merges); a model sees
prompt answer <eos> and is scored on the answer tokens plus <eos> only, as in tasks.py.

Splits: per task the items are de-duplicated by prompt (first target wins), filtered to at most
MAX_TOKENS tokens, shuffled with a string seed (`random.Random("bigbench/<task>/split")`, hashed
with sha512, so the same on every machine), then cut into test (first TEST_SIZE), validation
(next VAL_SIZE) and train (the rest). The three splits are disjoint by prompt.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import tarfile
from functools import lru_cache
from pathlib import Path

# task name -> (task.json folder inside benchmark_tasks, prompt template). Chosen for distinct
# skills, short single-string targets and >= 900 items each.
SOURCES = {
    "add3": ("arithmetic/3_digit_addition", "{x}\nAnswer:"),  # arithmetic: "What is 161 plus 390?"
    "unscramble": ("word_unscrambling", "{x}"),  # spelling: "The word hte is a scrambled ... word "
    "plural": ("linguistic_mappings/plural_json", "This is a {x}. Now there is another one. There are two"),
    "negation": ("linguistic_mappings/sentence_negation_json", "John thinks {x}, but"),  # syntax
    "hexcolor": ("color/hex", "{x}\nAnswer:"),  # perception-like mapping: hex code -> colour name
    "wikidata": ("qa_wikidata", "{x}"),  # factual recall: "The country of 11 de marzo de 2004 is"
    "counting": ("object_counting", "{x}\nAnswer:"),  # counting listed objects (digit answers)
}
TASKS = tuple(SOURCES)
TEST_SIZE, VAL_SIZE = 128, 64
MAX_TOKENS = 80  # prompt + answer + <eos>, in SmolLM2 tokens
BIGBENCH = "bigbench==1.0.0"


def ensure_bigbench(cache: str | Path) -> Path:
    """The benchmark_tasks folder, fetched once with `pip download` and extracted in `cache`."""
    cache = Path(cache)
    root = cache / "bigbench" / "benchmark_tasks"
    if all((root / src / "task.json").exists() for src, _ in SOURCES.values()):
        return root
    pkgs = cache / "pkgs"
    sdist = pkgs / "bigbench-1.0.0.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        BIGBENCH, "-d", str(pkgs)], check=True)
    wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{src}/task.json" for src, _ in SOURCES.values()}
    with tarfile.open(sdist) as tar:
        for member in tar:
            if member.name in wanted:
                out = root / member.name.split("benchmark_tasks/", 1)[1]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(member).read())
    return root


def _target(t) -> str:
    if isinstance(t, list):  # several accepted targets: prefer a digit string, else the first
        t = next((x for x in t if x.isdigit()), t[0])
    return t.strip()


@lru_cache(maxsize=None)
def _splits(task: str, cache: str, tok_dir: str) -> dict[str, list[tuple[str, str]]]:
    from transformers import AutoTokenizer

    src, template = SOURCES[task]
    examples = json.loads((ensure_bigbench(cache) / src / "task.json").read_text())["examples"]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    items, seen = [], set()
    for e in examples:
        p, a = template.format(x=e["input"].strip()), " " + _target(e["target"])
        if p in seen or not a.strip():
            continue
        seen.add(p)
        n = len(tok(p)["input_ids"]) + len(tok(a, add_special_tokens=False)["input_ids"]) + 1
        if n <= MAX_TOKENS:
            items.append((p, a))
    random.Random(f"bigbench/{task}/split").shuffle(items)
    return {"test": items[:TEST_SIZE], "val": items[TEST_SIZE:TEST_SIZE + VAL_SIZE],
            "train": items[TEST_SIZE + VAL_SIZE:]}


def split(task: str, name: str, cache: str | Path, tok_dir: str | Path) -> list[tuple[str, str]]:
    """Items of `task`'s split `name` ("train", "val" or "test"); `tok_dir` holds the tokenizer
    used for the length filter (the base's)."""
    return _splits(task, str(cache), str(tok_dir))[name]
