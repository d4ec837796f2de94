"""Merge-quality bench: a small, really trained checkpoint family and its evaluation.

    from bench.quality import build_family, evaluate
    paths = build_family("bench/cache/quality")          # base + expert_<task> HF folders
    scores = evaluate(paths["expert_add"])               # {task: {"nll", "token_acc", "exact"}}

tasks.py    seeded synthetic tasks with exact answers, and the character tokenizer
family.py   pretrain a tiny Qwen2 base on all tasks, fine-tune one expert per task
evaluate.py answer NLL, teacher-forced token accuracy, greedy exact match
"""

from .evaluate import evaluate
from .family import build_family
from .tasks import TASKS

__all__ = ["TASKS", "build_family", "evaluate"]
