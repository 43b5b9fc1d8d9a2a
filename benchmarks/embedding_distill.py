"""Sentence-embedding HomoDistil, scored as its users score it: zero-shot STS-B dev Spearman x 100.

Rows: the teacher; the teacher pruned once to each shape with no training (``homoexport prune``); and the
recipe (``recipes/embedding-quick.yaml`` by default: the in-batch similarity structure of the pooled sentence
embeddings, on Wikipedia sentences, never on STS-B) distilled to each shape, scored in PyTorch and as its
int8 ONNX file (feature-extraction export, O2 + dynamic int8). Every unit lands under ``--work`` and is skipped
when there; distillations resume. Prints a table and writes ``--results``/embedding_distill_<tag>.json, keeping
the committed rows of shapes not run this time.

With --curve-every N the run also saves its student every N steps (``training.snapshot_every``) and each
snapshot at the final width is scored in PyTorch: Spearman against distillation steps, tokens and wall time
(wall time since the run's start, as logged; a resumed run counts from its resume).

    python benchmarks/embedding_distill.py --shapes 192,128
    python benchmarks/embedding_distill.py --shapes 192 --set training.steps=2400 --tag long --curve-every 400
    python benchmarks/embedding_distill.py --shapes 192 --in-domain stsb,mrpc,rte,sst2 --tag in-domain --curve-every 50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from homoexport.atomic import atomic_write_json
from homoexport.machine import fingerprint

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"192": (192, 6, 768), "128": (128, 4, 512)}


def sts_scores(model: Path, pairs, teacher: Path, export: Path | None = None) -> dict[str, float]:
    from homoexport.evaluation.sts import run_sts

    report = run_sts(model, pairs, teacher=teacher, export_dir=export)
    return {r["name"]: r["spearman"] for r in report["results"]}


def curve(run: Path, report: dict[str, Any], pairs, teacher: Path, hidden: int) -> list[dict[str, Any]]:
    """PyTorch STS of every snapshot at the final width: the quality-vs-time curve (the final student is the row itself)."""
    log = {r["step"]: r for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())}
    tokens_per_step = report["tokens"] // report["steps"]
    points = []
    for snap in sorted((run / "snapshots").glob("step-*")):
        step = int(snap.name.removeprefix("step-"))
        if json.loads((snap / "config.json").read_text())["hidden_size"] != hidden:
            continue
        points.append({"step": step, "tokens": step * tokens_per_step, "elapsed_s": log.get(step, {}).get("elapsed_s"),
                       "pytorch": sts_scores(snap, pairs, teacher)["student (PyTorch)"]})
    return points


def unit(path: Path, make) -> dict[str, Any]:
    """The JSON at ``path``, computed by ``make`` (and written atomically) when it is not there yet."""
    if path.is_file():
        return json.loads(path.read_text())
    started = time.time()
    result = {**make(), "wall_s": round(time.time() - started, 1)}
    atomic_write_json(path, result)
    return result


def in_domain_sentences(glue_data: Path, tasks: Sequence[str], per_task: int, dev: set[str], out: Path) -> Path:
    """Unlabelled sentences of GLUE *training* splits, one per line, for the distillation text; never a dev sentence.

    Distinct sentences in file order, at most ``per_task`` per task; STS-B dev sentences (``dev``) are dropped wherever
    they recur (some STS-B captions appear in both splits).
    """
    from homoexport.atomic import atomic_write_text
    from homoexport.evaluation.glue_data import get_task, read_tsv

    if not out.is_file():
        lines: list[str] = []
        for name in tasks:
            spec = get_task(name)
            rows = read_tsv(spec, glue_data / spec.directory / "train.tsv")
            columns = [c for c in ("text_a", "text_b") if c in rows.column_names]
            taken = [t for row in rows.select(range(len(rows))) for t in (row[c] for c in columns) if t not in dev]
            lines += list(dict.fromkeys(taken))[:per_task]
        atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def kept_rows(results: Path, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Committed rows of models this run did not produce, so a run of one shape adds to the table instead of erasing it."""
    if not results.is_file():
        return []
    have = {r["model"] for r in rows}
    return [r for r in json.loads(results.read_text())["rows"] if r["model"] not in have]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "embedding-quick.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override KEY=VALUE (repeatable)")
    ap.add_argument("--shapes", default="192,128")
    ap.add_argument("--tag", default="quick", help="names this recipe + overrides in the work and result files")
    ap.add_argument("--curve-every", type=int, default=0, help="save and score the student every N steps (0: only the final one)")
    ap.add_argument("--in-domain", default="", help="GLUE tasks whose training sentences (unlabelled) go before the recipe's text, "
                    "e.g. stsb,mrpc,qnli,sst2; STS-B dev sentences are dropped")
    ap.add_argument("--in-domain-per-task", type=int, default=10000, help="at most this many distinct sentences per task")
    ap.add_argument("--glue-data", type=Path, default=Path("../shared/data/glue"))
    ap.add_argument("--work", type=Path, default=Path("runs/embedding_bench"))
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = ap.parse_args(argv)

    from homoexport.config.recipe import load_recipe
    from homoexport.deployment.export import ExportSettings, export_model
    from homoexport.distillation.trainer import distill
    from homoexport.evaluation.sts import stsb_dev
    from homoexport.pruning.oneshot import prune_model

    # fp32 unless --set says otherwise, as the committed results were trained: precision auto would choose bf16 on a CPU
    # that multiplies it natively.
    args.overrides = ["training.precision=fp32", *args.overrides]
    base = load_recipe(args.recipe, args.overrides)
    teacher = Path(base.teacher)
    pairs = stsb_dev(args.glue_data)
    if args.in_domain:
        cap = "" if args.in_domain_per_task == 10000 else f"-{args.in_domain_per_task}"  # the default's file keeps its first name
        text = in_domain_sentences(args.glue_data, args.in_domain.split(","), args.in_domain_per_task, {*pairs.first, *pairs.second},
                                   args.work / f"in-domain-{args.in_domain.replace(',', '-')}{cap}.txt")
        args.overrides = [*args.overrides, f"data.train={json.dumps([str(text), *base.data.train])}"]
    rows = [{"model": "teacher", **unit(args.work / "teacher.json", lambda: {"pytorch": sts_scores(teacher, pairs, teacher)["teacher (PyTorch)"]})}]
    for key in args.shapes.split(","):
        hidden, heads, ffn = SHAPES[key]
        pruned = args.work / f"prune-{key}"

        def prune_only() -> dict[str, Any]:
            if not (pruned / "config.json").is_file():
                prune_model(teacher, pruned, hidden=hidden, heads=heads, ffn=ffn, data=list(base.data.train), batches=8, batch_size=8,
                            overwrite=True)
            return {"pytorch": sts_scores(pruned, pairs, teacher)["student (PyTorch)"]}

        rows.append({"model": f"prune only {key}", **unit(args.work / f"prune-{key}.json", prune_only)})
        run = args.work / f"{args.tag}-{key}"
        snapshots = [f"training.snapshot_every={args.curve_every}"] if args.curve_every else []
        recipe = load_recipe(args.recipe, [*args.overrides, *snapshots, f"student.hidden={hidden}", f"student.heads={heads}", f"student.ffn={ffn}"])

        def distilled() -> dict[str, Any]:
            report = distill(recipe, out_dir=run, resume=run.exists())
            export_model(run / "student", run / "export", ExportSettings(task="feature-extraction"), overwrite=True)
            scores = sts_scores(run / "student", pairs, teacher, run / "export")
            return {"pytorch": scores["student (PyTorch)"], "onnx_int8": scores.get("student (ONNX int8)"), "steps": report["steps"],
                    "tokens": report["tokens"], "distill_wall_s": report["wall_time_s"], "parameters": report["student"]["parameters"],
                    "curve": curve(run, report, pairs, teacher, hidden)}

        rows.append({"model": f"{args.tag} {key}", **unit(args.work / f"{args.tag}-{key}.json", distilled)})
    out = args.results / f"embedding_distill_{args.tag}.json"
    rows = [rows[0], *kept_rows(out, rows), *rows[1:]]
    result = {"schema": "homoexport.benchmark.embedding_distill/1", "recipe": str(args.recipe), "overrides": args.overrides,
              "data": pairs.source, "metric": "STS-B dev Spearman x 100, zero-shot, mean pooling", "rows": rows, "machine": fingerprint()}
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print("| model | PyTorch | int8 ONNX | distill wall s |\n|---|---:|---:|---:|")
    for r in rows:
        int8 = f"{r['onnx_int8']:.2f}" if r.get("onnx_int8") is not None else "-"
        print(f"| {r['model']} | {r['pytorch']:.2f} | {int8} | {r.get('distill_wall_s', '-')} |")
    for r in rows:
        if r.get("curve"):
            print(f"\n{r['model']}: | step | tokens | wall s | PyTorch |\n|---:|---:|---:|---:|")
            for p in [*r["curve"], {"step": r["steps"], "tokens": r["tokens"], "elapsed_s": r["distill_wall_s"], "pytorch": r["pytorch"]}]:
                print(f"| {p['step']} | {p['tokens']} | {p['elapsed_s']} | {p['pytorch']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
