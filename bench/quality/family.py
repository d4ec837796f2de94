"""A small, really trained checkpoint family: one base and one expert per task.

The base is a Qwen2ForCausalLM pretrained *briefly* on a mixture of all tasks, so it knows the
formats and is mediocre at each. Each expert continues from the base on its own task only, with a
small learning rate and few steps. The experts therefore stay close to a shared, competent base,
which is the regime where weight-space merges (task arithmetic, TIES, ...) keep skills: a merge
should lower every task's answer NLL relative to the base.

Determinism: init and batch order come from explicit seeds, training runs on a fixed number of
CPU threads with deterministic algorithms, so a rebuild gives bit-identical safetensors. A stamp
file with the recipe lets later calls reuse the family and rebuild only when the recipe changes.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from .tasks import BOS, EOS, PAD, TASKS, VOCAB, encode, save_tokenizer, train_set


@dataclass(frozen=True)
class Recipe:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    pre_steps: int       # base: steps on the task mixture
    pre_lr: float
    ft_steps: int        # expert: steps on its own task
    ft_lr: float
    ft_replay: float     # expert batches: this fraction is replayed from the pretraining mixture
    batch: int
    train_items: int     # distinct training items per task
    threads: int = 2     # part of the recipe: float sums depend on the thread split
    tasks: tuple[str, ...] = TASKS


SCALES = {
    "full": Recipe(hidden=192, layers=4, heads=4, kv_heads=2, intermediate=512, pre_steps=400,
                   pre_lr=2e-3, ft_steps=600, ft_lr=1e-3, ft_replay=0.25, batch=64, train_items=20000),
    "mini": Recipe(hidden=32, layers=1, heads=2, kv_heads=1, intermediate=64, pre_steps=30,
                   pre_lr=3e-3, ft_steps=15, ft_lr=3e-3, ft_replay=0.25, batch=16, train_items=500, threads=1),
}
STAMP = "family.json"


def model_config(r: Recipe):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=len(VOCAB), hidden_size=r.hidden, intermediate_size=r.intermediate,
                       num_hidden_layers=r.layers, num_attention_heads=r.heads,
                       num_key_value_heads=r.kv_heads, max_position_embeddings=64,
                       tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)


def _encode(items):
    """(ids, first scored position, length) per item: <bos> prompt answer <eos>."""
    return [([BOS] + encode(p) + encode(a) + [EOS], len(p) + 1) for p, a in items]


def _batch(rows):
    """Right-padded batch; `tgt` marks the answer and <eos> tokens, the only ones with loss."""
    width = max(len(s) for s, _ in rows)
    ids = torch.full((len(rows), width), PAD)
    tgt = torch.zeros(len(rows), width, dtype=torch.bool)
    for j, (s, start) in enumerate(rows):
        ids[j, :len(s)] = torch.tensor(s)
        tgt[j, start:len(s)] = True
    return ids, tgt


def train(model, data, steps: int, lr: float, batch: int, gen: torch.Generator, warmup: int = 20,
          replay=(), n_replay: int = 0):
    """AdamW on answer tokens, linear warmup then cosine decay to 10% of lr.

    Each batch holds n_replay items from `replay` and the rest from `data`.
    """
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    model.train()
    for _ in range(steps):
        rows = [data[i] for i in torch.randint(len(data), (batch - n_replay,), generator=gen).tolist()]
        rows += [replay[i] for i in torch.randint(len(replay), (n_replay,), generator=gen).tolist()] if n_replay else []
        ids, tgt = (x.to(dev) for x in _batch(rows))
        # Causal mask alone suffices: padding is on the right and never scored.
        logits = model(input_ids=ids).logits[:, :-1]
        loss = F.cross_entropy(logits[tgt[:, 1:]], ids[:, 1:][tgt[:, 1:]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return model


def _save(model, folder: Path):
    # Plain safetensors + config (what save_pretrained writes, minus its progress bar).
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    save_tokenizer(folder)


def build_family(cache_dir: str | Path, scale: str = "full", seed: int = 0, force: bool = False,
                 recipe: Recipe | None = None, device: str = "cpu") -> dict[str, Path]:
    """Build (or reuse) {"base": path, "expert_<task>": path, ...} under cache_dir."""
    from transformers import Qwen2ForCausalLM

    r = recipe or SCALES[scale]
    cache = Path(cache_dir)
    names = ["base"] + [f"expert_{t}" for t in r.tasks]
    paths = {n: cache / n for n in names}
    # JSON round trip so the in-memory stamp compares equal to the one read back (tuples -> lists).
    stamp = json.loads(json.dumps({"recipe": asdict(r), "seed": seed, "torch": torch.__version__.split("+")[0]}))
    if not force and (cache / STAMP).exists() and all((p / "model.safetensors").exists() for p in paths.values()):
        if json.loads((cache / STAMP).read_text()).get("recipe_stamp") == stamp:
            return paths
    for p in [cache / STAMP, *paths.values()]:  # a stale or partial family is rebuilt from scratch
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    cache.mkdir(parents=True, exist_ok=True)

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(r.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()
    try:
        data = {t: _encode(train_set(t, r.train_items, seed)) for t in r.tasks}
        mix = [x for t in r.tasks for x in data[t]]
        torch.manual_seed(seed)  # HF init draws from the global generator
        base = Qwen2ForCausalLM(model_config(r)).float().to(device)
        train(base, mix, r.pre_steps, r.pre_lr, r.batch, torch.Generator().manual_seed(seed))
        _save(base, paths["base"])
        base_sd = {k: v.clone() for k, v in base.state_dict().items()}
        for i, t in enumerate(r.tasks):
            base.load_state_dict(base_sd)  # every expert starts from the same base weights
            g = torch.Generator().manual_seed(seed * 1000 + i + 1)
            train(base, data[t], r.ft_steps, r.ft_lr, r.batch, g, replay=mix, n_replay=round(r.ft_replay * r.batch))
            _save(base, paths[f"expert_{t}"])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
    (cache / STAMP).write_text(json.dumps({"recipe_stamp": stamp, "build_s": round(time.perf_counter() - t0, 1)},
                                          indent=2))
    return paths
