"""How much the fine-tuned teachers of ``task_distill.py`` memorised their training sets, and so how much a student
distilled on those rows can learn from their predictions beyond the gold labels.

Task distillation trains the student on the teacher's outputs for the task's training rows (Hinton et al., 2015). A
teacher fine-tuned to its best dev checkpoint can be near-certain and right on almost every training row while far
less sure, and often wrong, on the dev set: on such rows its soft targets say little more than the labels, and what
it does on unseen inputs (its dev score) is carried only by inputs it did not fit. For each teacher this scores the
task's training rows (a fixed sample of ``--max-rows``) and dev rows in PyTorch: the task's metrics, the mean
probability of the predicted class, the share of rows predicted with more than ``CONFIDENT``, and the mean entropy of
the prediction at the distillation temperature (``task_distill.py``'s KL term, T = 2).

    python benchmarks/teacher_fit.py --tasks mrpc,rte,cola,sst2

Reads the teachers under ``--work`` (``task_distill.py`` fine-tunes them); prints a table and writes
``--results``/teacher_fit.json.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from homoexport.atomic import atomic_write_json
from homoexport.evaluation.glue_data import get_task, load_tsv, predictions, score, subsample
from homoexport.machine import fingerprint

REPO = Path(__file__).resolve().parents[1]
CONFIDENT = 0.9
TEMPERATURE = 2.0


def teacher_logits(model_dir: Path, rows, batch_size: int = 64, max_length: int = 128) -> np.ndarray:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows.select(range(start, min(len(rows), start + batch_size)))
        pair = list(batch["text_b"]) if "text_b" in batch.column_names else None
        enc = tokenizer(list(batch["text_a"]), pair, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        with torch.no_grad():
            out.append(model(**enc).logits.float().numpy())
    return np.concatenate(out)


def fit_figures(task_name: str, logits: np.ndarray, labels: Sequence[int]) -> dict[str, Any]:
    """The task's metrics (in points) and the confidence of the predictions, from logits [rows, classes]."""
    task = get_task(task_name)
    probs = torch.tensor(logits).softmax(-1)
    soft = torch.tensor(logits / TEMPERATURE).softmax(-1)
    entropy = -(soft * soft.clamp_min(1e-12).log()).sum(-1) / math.log(logits.shape[1])
    metrics = {k: 100 * v for k, v in score(task, predictions(task, logits), labels).items()}
    return {"rows": len(labels), "metrics": metrics, "score": sum(metrics.values()) / len(metrics),
            "mean_max_prob": float(probs.max(-1).values.mean()), "share_confident": float((probs.max(-1).values > CONFIDENT).float().mean()),
            "mean_normalised_entropy_at_t": float(entropy.mean())}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="mrpc,rte,cola,sst2")
    ap.add_argument("--work", type=Path, default=Path("runs/task_bench"), help="task_distill.py's work directory (its teachers)")
    ap.add_argument("--glue-data", type=Path, default=Path("../shared/data/glue"))
    ap.add_argument("--max-rows", type=int, default=5000, help="training rows scored per task (a fixed sample; all when fewer)")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for name in args.tasks.split(","):
        model = args.work / f"teacher-{name}" / "seed-42" / "model"
        if not model.is_dir():
            raise SystemExit(f"no teacher for {name} at {model}: run benchmarks/task_distill.py --tasks {name} first")
        task = get_task(name)
        data = load_tsv(task, args.glue_data)
        for split, ds in (("train", subsample(data["train"], args.max_rows)), ("dev", data[task.dev_splits[0]])):
            figures = fit_figures(name, teacher_logits(model, ds), list(ds["label"]))
            rows.append({"task": name, "split": split, "train_rows_total": len(data["train"]), **figures})
    print(f"| task | split | rows | score | mean p(predicted) | share p > {CONFIDENT} | entropy at T={TEMPERATURE:g} (of max) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['task']} | {r['split']} | {r['rows']} | {r['score']:.1f} | {r['mean_max_prob']:.3f} | {r['share_confident']:.2f} | "
              f"{r['mean_normalised_entropy_at_t']:.2f} |")
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "teacher_fit.json", {"schema": "homoexport.teacher_fit/1", "confident": CONFIDENT,
                                                          "temperature": TEMPERATURE, "max_rows": args.max_rows, "rows": rows,
                                                          "machine": fingerprint()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
