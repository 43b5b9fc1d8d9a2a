"""Direct HomoDistil vs teacher-assistant HomoDistil (MiniDisc) at an extreme target, same step budget.

Both arms distill the same teacher on the same text to the same target shape with ``--steps`` optimizer
steps in total: the direct arm in one HomoDistil run, the assistant arm split between teacher ->
assistant and assistant -> student (``--stage1-fraction``), after a sandwich run of ``--sandwich-steps``
steps that chooses the assistant by the λ-tradeoff (the "one extra run"; its steps are reported
separately, not counted in the budget). Each student is then fine-tuned and scored on GLUE dev with
``homoexport.evaluation.glue.run_glue_suite`` (PyTorch only, no export). Prints a table and writes JSON.

From a clean checkout (real data at ../shared; full scale needs a GPU or many CPU hours):

    python benchmarks/assistant.py --teacher ../shared/models/all-MiniLM-L6-v2 \\
        --corpus '../shared/data/corpus/wikipedia-en-wikiextractor/*.txt.gz' \\
        --eval-text ../shared/data/corpus/wikitext-103/valid.txt --glue-dir ../shared/data/glue \\
        --steps 2000 --batch-size 32 --sandwich-steps 200 --tasks sst2,mrpc,cola

Smoke scale on a shared CPU: add ``--steps 40 --batch-size 8 --max-blocks 2000 --sandwich-steps 10
--glue-epochs 1 --max-train-samples 500``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from homoexport.atomic import atomic_write_json
from homoexport.cli.tables import tradeoff_table
from homoexport.config.recipe import validate_recipe
from homoexport.distillation.assistant import distill_with_assistant
from homoexport.distillation.models import quiet_transformers
from homoexport.distillation.trainer import distill
from homoexport.evaluation.glue import GlueSettings, run_glue_suite
from homoexport.machine import fingerprint

console = Console()


def base_recipe(args: argparse.Namespace) -> dict:
    """The recipe both arms share (the assistant section is off here)."""
    return {
        "name": "assistant-bench",
        "teacher": str(args.teacher),
        "student": {"hidden": args.hidden, "heads": args.heads, "ffn": args.ffn},
        "data": {"train": args.corpus, "eval": [str(args.eval_text)] if args.eval_text else [], "block_size": args.block_size,
                 "eval_blocks": args.eval_blocks, "max_blocks": args.max_blocks},
        "pruning": {"interval": args.interval, "t_f": 0.3, "multiple": 8},
        "optimizer": {"lr": args.lr, "warmup": 0.05},
        # fp32, as the committed results were trained: precision auto would choose bf16 on a CPU that multiplies it natively.
        "training": {"steps": args.steps, "batch_size": args.batch_size, "log_every": 10, "checkpoint_every": args.checkpoint_every, "precision": "fp32",
                     "seed": args.seed},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, type=Path, help="teacher model directory (e.g. all-MiniLM-L6-v2)")
    ap.add_argument("--corpus", required=True, nargs="+", help="training text: files, globs or dirs (WikiExtractor .txt.gz works)")
    ap.add_argument("--eval-text", type=Path, help="held-out text for evaluation and the assistant choice (default: from the corpus)")
    ap.add_argument("--glue-dir", type=Path, help="GLUE in the original TSV layout; without it GLUE is skipped")
    ap.add_argument("--tasks", default="sst2,mrpc,cola", help="GLUE tasks, comma-separated")
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--heads", type=int, default=3)
    ap.add_argument("--ffn", type=int, default=384)
    ap.add_argument("--steps", type=int, default=2000, help="total distillation steps of each arm")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--max-blocks", type=int, help="cap on training blocks")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--interval", type=int, default=10, help="pruning interval (ΔT)")
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sandwich-steps", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=4, help="evenly spaced assistant widths between target and teacher")
    ap.add_argument("--lambda", dest="lam", type=float, default=1.0, help="weight of sparsity in the tradeoff score")
    ap.add_argument("--stage1-fraction", type=float, default=0.5)
    ap.add_argument("--glue-epochs", type=float, default=3.0)
    ap.add_argument("--glue-lr", type=float, default=1e-4)
    ap.add_argument("--max-train-samples", type=int, help="subsample GLUE training sets (for time)")
    ap.add_argument("--max-eval-samples", type=int)
    ap.add_argument("--work", type=Path, default=Path("runs/assistant-bench"), help="run directories of both arms")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/assistant.json"))
    ap.add_argument("--overwrite", action="store_true", help="replace existing run directories")
    args = ap.parse_args()
    quiet_transformers()

    recipe = base_recipe(args)
    arms: dict[str, dict] = {}
    t0 = time.perf_counter()
    arms["direct"] = {"report": distill(validate_recipe(recipe), out_dir=args.work / "direct", overwrite=args.overwrite)}
    arms["direct"]["distill_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with_ta = dict(recipe, assistant={"mode": "auto", "candidates": args.candidates, "lambda": args.lam,
                                      "sandwich_steps": args.sandwich_steps, "stage1_fraction": args.stage1_fraction})
    report = distill_with_assistant(validate_recipe(with_ta), out_dir=args.work / "assistant", overwrite=args.overwrite)
    arms["assistant"] = {"report": report, "distill_s": time.perf_counter() - t0}
    console.print(tradeoff_table(report["selection"]))

    tasks = [t for t in args.tasks.split(",") if t]
    settings = GlueSettings(epochs=args.glue_epochs, learning_rate=args.glue_lr, max_train_samples=args.max_train_samples,
                            max_eval_samples=args.max_eval_samples, seeds=(args.seed + 42,), export=False)
    for name, arm in arms.items():
        if args.glue_dir and tasks:
            suite = run_glue_suite(args.work / name / "student", tasks, args.work / f"glue-{name}", settings, data_dir=args.glue_dir,
                                   overwrite=True)
            arm["glue"] = {task: suite["scores"]["pytorch"].get(task) for task in [*suite["tasks"], "average"]}

    table = Table(title=f"direct vs assistant HomoDistil, target h{args.hidden}/a{args.heads}/f{args.ffn}, {args.steps} steps each")
    cols = ["arm", "student params", "assistant", "cosine to own teacher", "distill s", *[t for t in tasks], "GLUE avg"]
    for c in cols:
        table.add_column(c, justify="right")
    rows = []
    for name, arm in arms.items():
        r = arm["report"]
        ev = r.get("evaluation") or {}
        glue = arm.get("glue", {})
        aw = r.get("assistant", {}).get("widths")
        row = {"arm": name, "student_parameters": r["student"]["parameters"], "assistant_widths": aw,
               "eval_cosine_to_own_teacher": ev.get("eval_cosine_to_teacher"), "distill_wall_s": round(arm["distill_s"], 1),
               "glue": glue}
        rows.append(row)
        table.add_row(name, f"{row['student_parameters'] / 1e6:.2f}M", f"h{aw['hidden']}/f{aw['ffn']}" if aw else "-",
                      f"{row['eval_cosine_to_own_teacher']:.4f}" if row["eval_cosine_to_own_teacher"] is not None else "-",
                      f"{row['distill_wall_s']:.0f}", *[f"{glue[t]:.1f}" if glue.get(t) is not None else "-" for t in tasks],
                      f"{glue['average']:.1f}" if glue.get("average") is not None else "-")
    # The held-out cosine goes through the run's learned projection onto its own teacher's width: for the
    # assistant arm that teacher is the assistant, so it is not comparable across arms (GLUE is).
    table.caption = "cosine to own teacher: the direct arm's is the teacher, the assistant arm's is the assistant (not comparable)"
    console.print(table)
    atomic_write_json(args.out, {"kind": "homoexport.assistant_benchmark", "command": " ".join(sys.argv), "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                                 "rows": rows, "selection": arms["assistant"]["report"]["selection"],
                                 "stage_steps": arms["assistant"]["report"]["stage_steps"], "machine": fingerprint()})
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
