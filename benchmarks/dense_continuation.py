"""What continuing on the dense student saves in a whole task-agnostic run, and what it changes.

One recipe is distilled twice, back to back on this machine: with ``pruning.materialize`` (the default: once the
target width is reached for good, the loop trains the materialised student) and without it (the masked student
computes at full width to the end). Every step is logged, so the table compares the median step time of the
same steps in both runs, before and after the switch (from each step's logged throughput), and the runs' wall times. Quality: the held-out loss terms
and cosine to the teacher of both final students. The two students are not bit-identical where the student has
dropout (its masks are drawn over other shapes once the student is smaller).

    python benchmarks/dense_continuation.py --recipe recipes/quickstart.yaml

Each run lands under ``--work`` and is reused when its report is there (a killed run resumes). Prints a table
and writes ``--results``/dense_continuation_<recipe name>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any, Sequence

from homoexport.atomic import atomic_write_json
from homoexport.config.recipe import load_recipe
from homoexport.distillation.trainer import distill
from homoexport.machine import fingerprint

ARMS = {"dense": "true", "masked": "false"}  # arm -> pruning.materialize


def run_arm(recipe_path: str, overrides: list[str], out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Distil (or resume, or reuse) one arm; its report and every step's log record."""
    recipe = load_recipe(recipe_path, [*overrides, "training.log_every=1"])
    report_path = out / "report.json"
    report = json.loads(report_path.read_text()) if report_path.is_file() else distill(recipe, out, resume=out.exists())
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines() if line]
    return report, records


def step_seconds(records: list[dict[str, Any]], tokens_per_step: float) -> dict[int, float]:
    """Seconds of each step, from its logged throughput (timed from the step's start to its log record, so held-out
    evaluations and checkpoints are left out)."""
    return {rec["step"]: tokens_per_step / rec["tokens_per_s"] for rec in records}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", default="recipes/quickstart.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE (repeatable)")
    ap.add_argument("--work", default="runs/dense_continuation")
    ap.add_argument("--results", default="benchmarks/results")
    args = ap.parse_args(argv)

    name = load_recipe(args.recipe, args.overrides).name
    arms: dict[str, dict[str, Any]] = {}
    for arm, materialize in ARMS.items():
        report, records = run_arm(args.recipe, [*args.overrides, f"pruning.materialize={materialize}"], Path(args.work) / name / arm)
        arms[arm] = {"report": report, "steps": step_seconds(records, report["tokens"] / report["steps"])}
    switch = arms["dense"]["report"]["dense_from_step"]
    if switch is None:
        raise SystemExit("the dense arm never switched: the recipe's pruning never reaches its target for good")
    total = arms["dense"]["report"]["steps"]
    phases = {"masked in both (steps 1-%d)" % switch: range(1, switch + 1), "after the switch (steps %d-%d)" % (switch + 1, total): range(switch + 1, total + 1)}
    rows = []
    for phase, steps in phases.items():
        row: dict[str, Any] = {"phase": phase, "steps": len(steps)}
        for arm in ARMS:
            row[f"{arm}_median_step_s"] = round(statistics.median(arms[arm]["steps"][s] for s in steps), 3)
        row["dense_over_masked"] = round(row["dense_median_step_s"] / row["masked_median_step_s"], 3)
        rows.append(row)
    summary = {arm: {"wall_time_s": a["report"]["wall_time_s"], "precision": a["report"]["precision"],
                     "dense_from_step": a["report"]["dense_from_step"], "parity_max_abs_diff": a["report"]["parity_max_abs_diff"],
                     "evaluation": a["report"]["evaluation"], "final_loss_terms": a["report"]["final_loss_terms"],
                     "student": a["report"]["student"]["widths"]} for arm, a in arms.items()}
    result = {"schema": "homoexport.dense_continuation/1", "recipe": args.recipe, "overrides": args.overrides, "steps": total,
              "phases": rows, "arms": summary,
              "wall_ratio": round(summary["dense"]["wall_time_s"] / summary["masked"]["wall_time_s"], 3), "machine": fingerprint()}
    path = Path(args.results) / f"dense_continuation_{name}.json"
    atomic_write_json(path, result)

    print(f"{args.recipe}: {total} steps, dense from step {switch}, precision {summary['dense']['precision']}")
    print(f"{'phase':<34} {'dense s/step':>13} {'masked s/step':>14} {'ratio':>6}")
    for row in rows:
        print(f"{row['phase']:<34} {row['dense_median_step_s']:>13.3f} {row['masked_median_step_s']:>14.3f} {row['dense_over_masked']:>6.2f}")
    for arm, s in summary.items():
        ev = s["evaluation"]
        print(f"{arm:<7} wall {s['wall_time_s']:>7.1f} s   held-out loss {ev.get('eval_loss', float('nan')):.4f}   "
              f"cosine to teacher {ev.get('eval_cosine_to_teacher', float('nan')):.4f}")
    print(f"wall time dense / masked: {result['wall_ratio']:.2f}   -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
