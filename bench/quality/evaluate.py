"""Score a causal LM folder on the held-out synthetic tasks.

Per task, over the first n test items:
  nll        mean negative log-likelihood per answer token, teacher-forced (the primary metric:
             smooth, so it shows small merge effects that exact match hides)
  token_acc  fraction of answer tokens that are the teacher-forced argmax
  exact      fraction of items whose greedy generation equals the answer exactly
Answer tokens are the answer's characters plus <eos> (a model must also know when to stop).
Computation is float32, batched, no sampling: the numbers are deterministic for a given folder.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .tasks import TASKS, test_set, val_set


@torch.no_grad()
def _teacher_forced(model, tok, items, batch_size):
    nll_sum = correct = count = 0.0
    for i in range(0, len(items), batch_size):
        seqs, spans = [], []
        for p, a in items[i:i + batch_size]:
            ctx = tok(p)["input_ids"]  # <bos> + prompt
            ans = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(ctx + ans)
            spans.append((len(ctx), len(ans)))
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        mask = torch.zeros_like(ids)
        tgt = torch.zeros(len(seqs), width, dtype=torch.bool)  # positions whose token is scored
        for j, (s, (c, n)) in enumerate(zip(seqs, spans)):
            ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
            tgt[j, c:c + n] = True
        dev = next(model.parameters()).device
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu()
        # logits at position t predict token t+1.
        logp = F.log_softmax(logits[:, :-1], -1)
        lbl, sel = ids[:, 1:], tgt[:, 1:]
        nll = -logp.gather(-1, lbl[..., None])[..., 0]
        nll_sum += nll[sel].sum().item()
        correct += (logp.argmax(-1) == lbl)[sel].sum().item()
        count += sel.sum().item()
    return nll_sum / count, correct / count


@torch.no_grad()
def _greedy_exact(model, tok, items, batch_size, max_new):
    """Greedy decoding with left padding; position ids follow the mask so padding is invisible."""
    hits = 0
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        ctx = [tok(p)["input_ids"] for p, _ in chunk]
        width = max(map(len, ctx))
        ids = torch.tensor([[tok.pad_token_id] * (width - len(c)) + c for c in ctx])
        mask = (torch.arange(width)[None] >= torch.tensor([width - len(c) for c in ctx])[:, None]).long()
        dev = next(model.parameters()).device
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=False, max_new_tokens=max_new,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        for (_, a), gen in zip(chunk, out[:, width:].cpu().tolist()):
            if tok.eos_token_id in gen:  # an answer counts only if the model also stopped
                hits += tok.decode(gen[:gen.index(tok.eos_token_id)]) == a
    return hits / len(items)


def evaluate_model(model, tok, tasks=TASKS, n: int = 200, batch_size: int = 250, test_seed: int = 0,
                   split: str = "test"):
    """Metrics for an in-memory model (used directly by the family builder's checks), on the test
    split or (split="val") the validation split."""
    model.eval()
    res = {}
    for task in tasks:
        items = test_set(task, n, test_seed) if split == "test" else val_set(task, n, test_seed=test_seed)
        nll, acc = _teacher_forced(model, tok, items, batch_size)
        max_new = max(len(a) for _, a in items) + 1
        res[task] = {"nll": nll, "token_acc": acc, "exact": _greedy_exact(model, tok, items, batch_size, max_new)}
    return res


def evaluate(model_dir: str | Path, tasks=TASKS, n: int = 200, batch_size: int = 250,
             test_seed: int = 0, split: str = "test") -> dict[str, dict[str, float]]:
    """{task: {"nll", "token_acc", "exact"}} for the Hugging Face folder `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return evaluate_model(model, tok, tasks, n, batch_size, test_seed, split)


def _table(cache_dir: str, scale: str = "full", weights=(0.3, 0.5, 1.0)) -> None:
    """Build/reuse the family, then print nll / token_acc / exact for base, experts and
    throwaway task-arithmetic merges W = base + w * sum_k (expert_k - base)."""
    import time

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .family import SCALES, build_family

    t0 = time.perf_counter()
    paths = build_family(cache_dir, scale)
    print(f"family ready in {time.perf_counter() - t0:.1f}s: {SCALES[scale]}")
    tasks = SCALES[scale].tasks
    tok = AutoTokenizer.from_pretrained(paths["base"])
    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    sd = {n: load_file(p / "model.safetensors") for n, p in paths.items()}
    rows = {n: sd[n] for n in paths}
    for w in weights:
        rows[f"ta_w{w}"] = {k: v + w * sum(sd[n][k] - v for n in sd if n != "base") for k, v in sd["base"].items()}
    print(f"{'model':12s}" + "".join(f"{t + ' nll/acc/exact':>24s}" for t in tasks))
    for name, weights_ in rows.items():
        model.load_state_dict(weights_)
        res = evaluate_model(model, tok, tasks)
        print(f"{name:12s}" + "".join(f"{r['nll']:10.3f} /{r['token_acc']:5.2f} /{r['exact']:5.2f}" for r in res.values()))


if __name__ == "__main__":  # python -m bench.quality.evaluate [cache_dir] [scale]
    import sys

    _table(*(sys.argv[1:] or ["bench/cache/quality"]))
