"""Score a causal LM folder on the held-out real tasks (real_tasks.py), as evaluate.py does.

Per task, over its test split (plain text, no chat template, the tokenizer's own specials):
  nll        mean negative log-likelihood per answer token, teacher-forced; the answer tokens are
             the answer's BPE tokens plus <eos> (the primary metric)
  nll_noeos  the same without the <eos> token: every expert learns to stop after a short answer,
             a skill shared by all tasks; this column shows the task skill alone
  token_acc  fraction of answer tokens (with <eos>) that are the teacher-forced argmax
  exact      fraction of items whose greedy generation (answer length + 3 new tokens), cut at the
             first <eos> and then at the first newline, equals the answer after strip()
Computation is float32, batched, no sampling: the numbers are deterministic for a given folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .real_family import CACHE
from .real_tasks import TASKS, split


def _encode(tok, items):
    return [(tok(p)["input_ids"], tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            for p, a in items]


@torch.no_grad()
def _teacher_forced(model, tok, items, batch_size):
    nll_sum = eos_sum = correct = count = 0.0
    for i in range(0, len(items), batch_size):
        rows = _encode(tok, items[i:i + batch_size])
        width = max(len(c) + len(a) for c, a in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        tgt = torch.zeros(len(rows), width, dtype=torch.bool)  # positions whose token is scored
        last = torch.zeros_like(tgt)  # the <eos> position of each row
        for j, (c, a) in enumerate(rows):
            ids[j, :len(c) + len(a)], mask[j, :len(c) + len(a)] = torch.tensor(c + a), 1
            tgt[j, len(c):len(c) + len(a)] = True
            last[j, len(c) + len(a) - 1] = True
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]  # position t predicts t+1
        sel = tgt[:, 1:]
        logp = F.log_softmax(logits[sel].float(), -1)
        lbl = ids[:, 1:][sel]
        nll = -logp.gather(-1, lbl[:, None])[:, 0]
        nll_sum += nll.sum().item()
        eos_sum += nll[last[:, 1:][sel]].sum().item()
        correct += (logp.argmax(-1) == lbl).sum().item()
        count += sel.sum().item()
    return nll_sum / count, (nll_sum - eos_sum) / (count - len(items)), correct / count


@torch.no_grad()
def _greedy_exact(model, tok, items, batch_size):
    """Greedy decoding with left padding; position ids follow the mask so padding is invisible."""
    hits = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        rows = _encode(tok, chunk)
        width = max(len(c) for c, _ in rows)
        ids = torch.tensor([[tok.pad_token_id] * (width - len(c)) + c for c, _ in rows])
        pads = torch.tensor([width - len(c) for c, _ in rows])
        mask = (torch.arange(width)[None] >= pads[:, None]).long()
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max(len(a) for _, a in rows) + 3,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for (_, a), gen in zip(chunk, out[:, width:].tolist()):
            if tok.eos_token_id in gen:
                gen = gen[:gen.index(tok.eos_token_id)]
            hits += tok.decode(gen).split("\n")[0].strip() == a.strip()
    return hits / len(items)


def evaluate_model(model, tok, tasks=TASKS, cache: str | Path = CACHE, tok_dir: str | Path | None = None,
                   batch_size: int = 16, split_name: str = "test") -> dict[str, dict[str, float]]:
    """{task: {"nll", "nll_noeos", "token_acc", "exact"}} for an in-memory model. The splits are
    cut with the tokenizer in `tok_dir` (default: the family's base)."""
    tok_dir = tok_dir or Path(cache) / "smollm2" / "base"
    model.eval()
    res = {}
    for task in tasks:
        items = split(task, split_name, cache, tok_dir)
        nll, nll_noeos, acc = _teacher_forced(model, tok, items, batch_size)
        res[task] = {"nll": nll, "nll_noeos": nll_noeos, "token_acc": acc,
                     "exact": _greedy_exact(model, tok, items, batch_size)}
    return res


def evaluate(model_dir: str | Path, tasks=TASKS, cache: str | Path = CACHE,
             split_name: str = "test") -> dict[str, dict[str, float]]:
    """Metrics for the Hugging Face folder `model_dir` (loaded in float32), on the test split or
    (split_name="val") the validation split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return evaluate_model(model, tok, tasks, cache, split_name=split_name)
