"""What continuing on materialised students saves in a whole run (task-agnostic or task recipe), and what it changes.

One recipe is distilled once per arm, back to back on this machine:

    staged  ``pruning.materialize_at`` 0.9 (the default): the loop goes on over the materialised student whenever the
            kept widths hold at most 90% of the weights per layer of the model it trains, and pruning goes on over it
    dense   ``pruning.materialize_at: null``: the student stays masked (full width) until the target width is reached
            for good, then the loop trains the materialised student (``pruning.materialize``)
    masked  ``pruning.materialize: false``: the masked student computes at full width to the end

Every step is logged, so the table compares the time of the same steps in every run, before and after the switch to
the target width (from each step's logged throughput), and the runs' wall times. Quality: the held-out loss terms and
cosine to the teacher of the final students (a task recipe: their dev scores). The students are not bit-identical where the student has dropout (its
masks are drawn over other shapes once the student is smaller).

    python benchmarks/dense_continuation.py --recipe recipes/quickstart.yaml --arms dense,masked
    python benchmarks/dense_continuation.py --recipe recipes/quickstart.yaml --arms staged,dense --tag staged
    python benchmarks/dense_continuation.py --recipe recipes/tasks/mrpc.yaml --arms staged,dense --tag staged \
        --set teacher=runs/task_bench/teacher-mrpc/seed-42/model --set task.epochs=2 --set task.export=false

Each run lands under ``--work`` and is reused when its report is there (a killed run resumes). Prints a table
and writes ``--results``/dense_continuation_<recipe name>[-<tag>].json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from homoexport.atomic import atomic_write_json
from homoexport.config.recipe import load_recipe
from homoexport.distillation.task import distill_task
from homoexport.distillation.trainer import distill
from homoexport.machine import fingerprint

ARMS = {"staged": ["pruning.materialize=true", "pruning.materialize_at=0.9"],
        "dense": ["pruning.materialize=true", "pruning.materialize_at=null"],
        "masked": ["pruning.materialize=false"]}


def run_arm(recipe_path: str, overrides: list[str], out: Path) -> tuple[dict[str, Any], dict[int, float], int | None]:
    """Distil (or resume, or reuse) one arm: its report, each step's seconds and the first step at the target width.

    Seconds are timed from a step's start to its log record, so held-out evaluations and checkpoints are left out
    (task-agnostic runs log throughput, task runs the step's seconds)."""
    recipe = load_recipe(recipe_path, [*overrides, "training.log_every=1"])
    report_path = out / "report.json"
    if report_path.is_file():
        report = json.loads(report_path.read_text())
    elif recipe.task is not None:
        report = distill_task(recipe, out, resume=out.exists())
    else:
        report = distill(recipe, out, resume=out.exists())
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line]
    if recipe.task is not None:
        seconds = {rec["step"]: rec["step_s"] for rec in records}
    else:
        seconds = {rec["step"]: report["tokens"] / report["steps"] / rec["tokens_per_s"] for rec in records}
    return report, seconds, next((rec["step"] for rec in records if rec.get("dense")), None)


def quality(report: dict[str, Any]) -> dict[str, Any]:
    """What the final student is worth: held-out loss terms and cosine (task-agnostic), dev scores beside the teacher's (task)."""
    if "evaluation" in report:
        return {"evaluation": report["evaluation"], "final_loss_terms": report["final_loss_terms"]}
    return {"dev": report["student"]["dev"], "teacher_dev": report["teacher"]["dev"]}


def describe(s: dict[str, Any]) -> str:
    if "evaluation" in s:
        ev = s["evaluation"]
        return f"held-out loss {ev.get('eval_loss', float('nan')):.4f}   cosine to teacher {ev.get('eval_cosine_to_teacher', float('nan')):.4f}"
    return "dev " + ", ".join(f"{k} {v:.2f}" for k, v in s["dev"].items()) + "   teacher " + ", ".join(f"{k} {v:.2f}" for k, v in s["teacher_dev"].items())


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE (repeatable)")
    ap.add_argument("--arms", default="staged,dense,masked", help=f"comma-separated, of {', '.join(ARMS)}; ratios are to the last")
    ap.add_argument("--tag", default="", help="suffix of the results file, to keep another comparison's")
    ap.add_argument("--work", default="runs/dense_continuation")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args(argv)
    names = [a.strip() for a in args.arms.split(",") if a.strip()]
    if len(names) < 2 or any(a not in ARMS for a in names):
        raise SystemExit(f"--arms needs two or more of {', '.join(ARMS)}; got {args.arms!r}")
    base = names[-1]

    name = load_recipe(args.recipe, args.overrides).name
    arms: dict[str, dict[str, Any]] = {}
    for arm in names:
        report, seconds, dense_from = run_arm(args.recipe, [*args.overrides, *ARMS[arm]], Path(args.work) / name / arm)
        arms[arm] = {"report": report, "steps": seconds, "dense_from": dense_from}
    switch = next((a["dense_from"] for a in arms.values() if a["dense_from"] is not None), None)
    if switch is None:
        raise SystemExit("no arm switched to the target width: the recipe's pruning never reaches its target for good")
    total = arms[names[0]]["report"]["steps"]
    phases = {"pruning (steps 1-%d)" % switch: range(1, switch + 1), "at the target (steps %d-%d)" % (switch + 1, total): range(switch + 1, total + 1)}
    rows = []
    for phase, steps in phases.items():
        row: dict[str, Any] = {"phase": phase, "steps": len(steps)}
        for arm in names:
            row[f"{arm}_median_step_s"] = round(statistics.median(arms[arm]["steps"][s] for s in steps), 3)
            row[f"{arm}_phase_s"] = round(sum(arms[arm]["steps"][s] for s in steps), 1)
        for arm in names[:-1]:
            row[f"{arm}_over_{base}"] = round(row[f"{arm}_phase_s"] / row[f"{base}_phase_s"], 3)
        rows.append(row)
    summary = {arm: {"overrides": ARMS[arm], "wall_time_s": a["report"]["wall_time_s"], "precision": a["report"]["precision"],
                     "dense_from_step": a["dense_from"], "parity_max_abs_diff": a["report"]["parity_max_abs_diff"],
                     **quality(a["report"]), "student": a["report"]["student"]["widths"]} for arm, a in arms.items()}
    result = {"schema": "homoexport.dense_continuation/2", "recipe": args.recipe, "overrides": args.overrides, "steps": total,
              "arms_order": names, "phases": rows, "arms": summary,
              "wall_ratio": {f"{arm}_over_{base}": round(summary[arm]["wall_time_s"] / summary[base]["wall_time_s"], 3) for arm in names[:-1]},
              "machine": fingerprint()}
    path = Path(args.results) / f"dense_continuation_{name}{'-' + args.tag if args.tag else ''}.json"
    atomic_write_json(path, result)

    print(f"{args.recipe}: {total} steps, at the target from step {switch}, precision {summary[names[0]]['precision']}")
    print(f"{'phase':<30} " + " ".join(f"{arm + ' s':>10}" for arm in names) + " " + " ".join(f"{arm + '/' + base:>14}" for arm in names[:-1]))
    for row in rows:
        print(f"{row['phase']:<30} " + " ".join(f"{row[f'{arm}_phase_s']:>10.1f}" for arm in names) + " "
              + " ".join(f"{row[f'{arm}_over_{base}']:>14.2f}" for arm in names[:-1]))
    for arm, s in summary.items():
        print(f"{arm:<7} wall {s['wall_time_s']:>7.1f} s   {describe(s)}")
    print("wall time " + ", ".join(f"{k.replace('_over_', ' / ')}: {v:.2f}" for k, v in result["wall_ratio"].items()) + f"   -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
