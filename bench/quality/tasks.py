"""Synthetic text tasks with exact answers, and the character-level tokenizer they share.

Every item is a (prompt, answer) pair of plain strings, e.g. ("add:48+75=", "123"). A model sees
<bos> prompt answer <eos> and is scored on the answer (+ <eos>) only. Each prompt starts with a
task tag, so one model can be trained on a mixture and the experts are clearly specialised.

Splits are seeded with string seeds (`random.Random("add/test/0")`), which Python hashes with
sha512, so items are identical across runs and machines regardless of PYTHONHASHSEED. The train
stream skips every prompt that is in the test set, so train and test are disjoint; the validation
split (for choosing hyperparameters) is disjoint from test too.
"""

from __future__ import annotations

import random
import string
from pathlib import Path

DIGITS, LETTERS = string.digits, string.ascii_lowercase[:16]  # a-p: small alphabet, short vocab


def _add(r: random.Random) -> tuple[str, str]:
    # Zero-padded 2-digit operands put digits at fixed offsets (learnable by a tiny model); the
    # carry still makes it hard enough that a briefly trained base is mediocre.
    a, b = r.randrange(100), r.randrange(100)
    return f"add:{a:02d}+{b:02d}=", str(a + b)


def _sub(r: random.Random) -> tuple[str, str]:
    a, b = sorted((r.randrange(100), r.randrange(100)), reverse=True)
    return f"sub:{a:02d}-{b:02d}=", str(a - b)


def _rot(r: random.Random) -> tuple[str, str]:
    # Caesar shift over the 16-letter alphabet: a per-character lookup table (k, c) -> c', so
    # accuracy grows gradually with task-specific training.
    k, s = r.randint(1, 9), "".join(r.choices(LETTERS, k=r.randint(4, 10)))
    return f"rot{k}:{s}=", "".join(LETTERS[(LETTERS.index(c) + k) % 16] for c in s)


def _mul(r: random.Random) -> tuple[str, str]:
    a, b = r.randrange(1000), r.randrange(10)
    return f"mul:{a:03d}*{b}=", str(a * b)


def _rev(r: random.Random) -> tuple[str, str]:
    s = "".join(r.choices(LETTERS, k=r.randint(6, 16)))
    return f"rev:{s}=", s[::-1]


def _sort(r: random.Random) -> tuple[str, str]:
    s = "".join(r.choices(DIGITS, k=r.randint(6, 18)))
    return f"sort:{s}=", "".join(sorted(s))


def _get(r: random.Random) -> tuple[str, str]:
    # Key-value lookup: distinct letter keys with digit values; the query is one of the keys.
    keys = r.sample(LETTERS, r.randint(3, 6))
    vals = r.choices(DIGITS, k=len(keys))
    q = r.randrange(len(keys))
    return "get:" + "".join(k + v for k, v in zip(keys, vals)) + f"?{keys[q]}=", vals[q]


GENERATORS = {"add": _add, "sub": _sub, "mul": _mul, "rot": _rot, "rev": _rev, "sort": _sort, "get": _get}
TASKS = ("add", "sub", "rev", "sort")  # the family's tasks; mul/rot/get are spares (see family.py)
TEST_SIZE = 500  # the fixed held-out pool; evaluate() takes its first n items


def test_set(task: str, n: int = TEST_SIZE, seed: int = 0) -> list[tuple[str, str]]:
    """The first n held-out items of `task` (distinct prompts)."""
    r, seen, out = random.Random(f"{task}/test/{seed}"), set(), []
    while len(out) < n:
        p, a = GENERATORS[task](r)
        if p not in seen:
            seen.add(p)
            out.append((p, a))
    return out


def val_set(task: str, n: int = 200, seed: int = 0, test_seed: int = 0) -> list[tuple[str, str]]:
    """n validation items of `task` (distinct prompts), none in the held-out test pool: what
    hyperparameters are chosen on. They may coincide with training items (the small tasks have
    only ten thousand prompts); they never do with test items."""
    held = {p for p, _ in test_set(task, TEST_SIZE, test_seed)}
    r, seen, out = random.Random(f"{task}/val/{seed}"), set(), []
    while len(out) < n:
        p, a = GENERATORS[task](r)
        if p not in held and p not in seen:
            seen.add(p)
            out.append((p, a))
    return out


def train_set(task: str, n: int, seed: int = 0, test_seed: int = 0) -> list[tuple[str, str]]:
    """n training items of `task`, none of whose prompts is in the held-out pool."""
    held = {p for p, _ in test_set(task, TEST_SIZE, test_seed)}
    r, out = random.Random(f"{task}/train/{seed}"), []
    while len(out) < n:
        p, a = GENERATORS[task](r)
        if p not in held:
            out.append((p, a))
    return out


# ---------------------------------------------------------------------------------------------
# Tokenizer: one token per character, plus <pad> (id 0), <bos> (1), <eos> (2).

SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = DIGITS + LETTERS + string.ascii_lowercase[16:] + ":+-*=?"
VOCAB = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
PAD, BOS, EOS = 0, 1, 2


def encode(s: str) -> list[int]:
    """Fast path used in training; equals the saved tokenizer's ids (checked in the test)."""
    return [VOCAB[c] for c in s]


def make_tokenizer():
    """A PreTrainedTokenizerFast over VOCAB, built offline with the `tokenizers` library."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every char a token
    tok.decoder = decoders.Fuse()  # join tokens without spaces
    # Prepend <bos> like training does, so tokenizer(prompt) gives exactly the model's context.
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<pad>", model_max_length=64)


def save_tokenizer(folder: Path) -> None:
    make_tokenizer().save_pretrained(folder)
