"""Which objective, data unit and learning rate recover a pruned sentence encoder fastest?

Every arm starts from the same student: the teacher pruned once to --shape (``homoexport prune``, no
training, the "prune only" row of embedding_distill.py), and trains it for --steps dense steps on the same
Wikipedia text with one choice of loss weights, data unit (64-token blocks or one row per sentence) and
learning rate. Each student is then scored as users score it: zero-shot STS-B dev Spearman x 100 in PyTorch
(STS-B is never trained on). The arms isolate the objective from the pruning schedule, at a fraction of a
full run's cost, to choose the embedding recipe; results in --results/embedding_objectives.json.

    python benchmarks/embedding_objectives.py --steps 200
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Sequence

from embedding_distill import SHAPES, sts_scores, unit

from homoexport.atomic import atomic_write_json
from homoexport.machine import fingerprint

REPO = Path(__file__).resolve().parents[1]
WIKI = "../shared/data/corpus/wikipedia-en-wikiextractor"
# name: (loss weights hidden/sentence/similarity, data unit, learning rate)
ARMS: dict[str, tuple[dict[str, float], str, float]] = {
    "quick mix, blocks": ({"hidden": 1.0, "sentence": 1.0, "similarity": 1.0}, "block", 3e-4),
    "quick mix, sentences": ({"hidden": 1.0, "sentence": 1.0, "similarity": 1.0}, "sentence", 3e-4),
    "sentence + similarity x10, sentences": ({"sentence": 1.0, "similarity": 10.0}, "sentence", 3e-4),
    "sentence + similarity x10, sentences, lr 1e-4": ({"sentence": 1.0, "similarity": 10.0}, "sentence", 1e-4),
    "similarity x10 only, sentences": ({"similarity": 10.0}, "sentence", 3e-4),
}


def train_arm(student_dir: Path, teacher_dir: Path, out: Path, weights: dict[str, float], data_unit: str, lr: float,
              args: argparse.Namespace) -> dict[str, Any]:
    """--steps of AdamW (linear warmup 5%, then linear decay) on the pruned student; saves it to ``out``."""
    import torch
    from transformers import AutoModel, AutoTokenizer, get_scheduler

    from homoexport.config.recipe import LossSpec
    from homoexport.distillation.data import BlockBatcher, CorpusSpec, build_blocks
    from homoexport.distillation.losses import DistillationLoss, EncoderOutputs

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    rows, _ = build_blocks(CorpusSpec(sources=[WIKI], block_size=64, eval_blocks=0, max_blocks=args.steps * args.batch_size,
                                      cache_dir=".cache/homoexport", unit=data_unit), tok)
    batcher = BlockBatcher(rows, tok, args.batch_size, mlm_probability=None, padded=data_unit == "sentence")
    teacher = AutoModel.from_pretrained(str(teacher_dir)).eval().requires_grad_(False)
    student = AutoModel.from_pretrained(str(student_dir)).train()
    spec = LossSpec(mlm=0.0, kl=0.0, attention=0.0, embedding=0.0, **{"hidden": 0.0, "sentence": 0.0, "similarity": 0.0, **weights})
    loss_fn = DistillationLoss(spec, student.config.hidden_size, teacher.config.hidden_size, student.config.num_hidden_layers,
                               teacher.config.num_hidden_layers, has_mlm=False)
    optimizer = torch.optim.AdamW([*student.parameters(), *loss_fn.parameters()], lr=lr, weight_decay=0.01)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=max(1, args.steps // 20), num_training_steps=args.steps)
    started = time.time()
    for step in range(args.steps):
        batch = batcher.batch_at(step)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        with torch.no_grad():
            t = teacher(**inputs, output_hidden_states=True)
        s = student(**inputs, output_hidden_states=True)
        total, _ = loss_fn(EncoderOutputs(hidden=s.hidden_states), EncoderOutputs(hidden=t.hidden_states), inputs["attention_mask"], None, None)
        total.backward()
        optimizer_step(student, optimizer, scheduler)
    wall = time.time() - started
    save_arm(student, tok, teacher_dir, out)
    real_tokens = args.steps * args.batch_size * batcher.tokens_per_row
    return {"train_s": round(wall, 1), "tokens": int(real_tokens)}


def dense_arm_parser(doc: str | None) -> argparse.ArgumentParser:
    """The options every dense-arm benchmark shares (this one and embedding_batching.py)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", type=Path, default=Path("../shared/models/all-MiniLM-L6-v2"))
    ap.add_argument("--shape", default="192", choices=sorted(SHAPES))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--glue-data", type=Path, default=Path("../shared/data/glue"))
    ap.add_argument("--work", type=Path, default=Path("runs/embedding_bench"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    return ap


def optimizer_step(student, optimizer, scheduler) -> None:
    """One update of a dense arm: clip at 1.0, step, advance the schedule, clear the gradients."""
    import torch

    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def save_arm(student, tok, teacher_dir, out) -> None:
    """Save a trained arm as a student folder that ``homoexport sts`` scores (the teacher's pooling carried over)."""
    from homoexport.evaluation.sts import carry_pooling

    student.eval().save_pretrained(out)
    tok.save_pretrained(out)
    carry_pooling(teacher_dir, out, student.config.hidden_size, 64)


def pruned_start(args: argparse.Namespace) -> Path:
    """The arms' common start: the teacher pruned once to --shape (no training), made once under --work."""
    from homoexport.pruning.oneshot import prune_model

    hidden, heads, ffn = SHAPES[args.shape]
    pruned = args.work / f"prune-{args.shape}"
    if not (pruned / "config.json").is_file():
        prune_model(args.teacher, pruned, hidden=hidden, heads=heads, ffn=ffn, data=[WIKI], batches=8, batch_size=8, overwrite=True)
    return pruned


def print_arms(rows: Sequence[dict[str, Any]]) -> None:
    print("\n| arm | STS-B dev | train s | tokens |\n|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arm']} | {r['pytorch']:.2f} | {r.get('train_s', '-')} | {r.get('tokens', '-')} |")


def main(argv: Sequence[str] | None = None) -> int:
    ap = dense_arm_parser(__doc__)
    ap.add_argument("--arms", default=",".join(str(i) for i in range(len(ARMS))), help="indices into the arm list, comma-separated")
    args = ap.parse_args(argv)

    from homoexport.evaluation.sts import stsb_dev

    pairs = stsb_dev(args.glue_data)
    pruned = pruned_start(args)
    rows = [{"arm": "prune only (start)", "pytorch": sts_scores(pruned, pairs, args.teacher)["student (PyTorch)"]}]
    names = list(ARMS)
    for index in (int(i) for i in args.arms.split(",")):
        name = names[index]
        weights, data_unit, lr = ARMS[name]
        out = args.work / f"objective-{args.shape}-{args.steps}x{args.batch_size}-{index}"

        def run(out: Path = out, weights: dict[str, float] = weights, data_unit: str = data_unit, lr: float = lr) -> dict[str, Any]:
            trained = train_arm(pruned, args.teacher, out / "student", weights, data_unit, lr, args)
            return {**trained, "pytorch": sts_scores(out / "student", pairs, args.teacher)["student (PyTorch)"]}

        result = unit(out / "result.json", run)
        rows.append({"arm": name, "weights": weights, "unit": data_unit, "lr": lr, **result})
        print(f"{name}: {result['pytorch']:.2f} ({result['train_s']} s)", flush=True)
    atomic_write_json(args.results / "embedding_objectives.json",
                      {"schema": "homoexport.benchmark.embedding_objectives/1", "shape": args.shape, "steps": args.steps,
                       "batch_size": args.batch_size, "data": WIKI, "metric": "STS-B dev Spearman x 100, zero-shot, PyTorch",
                       "rows": rows, "machine": fingerprint()})
    print_arms(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
