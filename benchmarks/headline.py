"""The headline experiment: HomoDistil against the related baselines (BRIEF §2.5), teacher to int8 ONNX.

Students at one final shape (hidden/heads/FFN; 192/6/768 and 128/4/512) with the same distillation steps
and tokens, from ``recipes/experiments/*.yaml``:

    (a) homodistil   copy the teacher, prune iteratively while distilling (HomoDistil)
    (b) oneshot      copy, prune to the target at step 0, then distill
    (c) truncate     3 of the teacher's layers at full width (DistilBERT-style init), uniform layer mapping
    (d) minilmv2     random init at the final shape, MiniLMv2 relation transfer only
    (e) prune_only   ``homoexport.pruning.oneshot.prune_model`` to the final shape, no distillation

(c) keeps the teacher's width, so it is run once (at no shape) and listed with the 192 group. The teacher
and every student are fine-tuned with identical settings on SST-2, MRPC and CoLA (``run_glue``: best dev
checkpoint, int8 ONNX export, PyTorch / ONNX fp32 / ONNX int8 dev scores); the SST-2 seed-0 classifier
is timed at batch 1 / seq 128 in PyTorch and as its int8 ONNX file. Output: one table (markdown + JSON)
and one PNG (average int8 score vs int8 latency) under ``--results``.

Every unit of work (a distillation, a GLUE task of a model, a latency measurement) is written atomically
under ``--out`` and skipped when already there, so an interrupted run continues where it stopped: rerun
the same command. ``--scale`` picks the step counts and GLUE subsets (see ``SCALES``, benchmarks/README.md).

    python benchmarks/headline.py --scale full
    python benchmarks/headline.py --scale smoke --shapes 192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from rich.console import Console
from rich.table import Table

from homoexport.atomic import atomic_write_json, atomic_write_text
from homoexport.evaluation.glue import TASK_TITLES, GlueSettings
from homoexport.machine import fingerprint

console = Console()

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "experiments"
TASKS = ("sst2", "mrpc", "cola")
METRIC_NOTE = {"sst2": "acc", "mrpc": "F1/acc", "cola": "MCC"}
LATENCY_SEQ = 128


@dataclass(frozen=True)
class Shape:
    hidden: int
    heads: int
    ffn: int

    @property
    def key(self) -> str:
        return str(self.hidden)

    def overrides(self) -> list[str]:
        return [f"student.hidden={self.hidden}", f"student.heads={self.heads}", f"student.ffn={self.ffn}"]


SHAPES = {"192": Shape(192, 6, 768), "128": Shape(128, 4, 512)}


@dataclass(frozen=True)
class Arm:
    key: str  # the letter in the issue and the table
    name: str
    title: str
    recipe: str | None  # None: prune only (no distillation)
    per_shape: bool = True  # False: the arm has one shape of its own (truncation keeps the teacher's width)


ARMS = {
    arm.name: arm
    for arm in (
        Arm("a", "homodistil", "HomoDistil (copy + iterative pruning)", "homodistil.yaml"),
        Arm("b", "oneshot", "one-shot prune, then distill", "oneshot.yaml"),
        Arm("c", "truncate", "3-layer truncation, full width", "truncate.yaml", per_shape=False),
        Arm("d", "minilmv2", "random init + MiniLMv2 relations", "minilmv2.yaml"),
        Arm("e", "prune_only", "prune only, no distillation", None),
    )
}


@dataclass(frozen=True)
class Scale:
    """Step counts and GLUE subsets of one scale; everything else comes from the recipes."""

    steps: int
    batch_size: int
    recipe_overrides: tuple[str, ...]
    glue: GlueSettings
    seeds: Mapping[str, tuple[int, ...]]  # per task; the other settings are identical for every model
    note: str = ""  # printed in bold above the table

    def glue_settings(self, task: str) -> GlueSettings:
        return replace(self.glue, seeds=self.seeds[task])


SCALES = {
    # Minutes: shows the pipeline end to end; the students are barely trained, the ordering means little.
    "smoke": Scale(
        steps=20, batch_size=8,
        recipe_overrides=("training.eval_every=0", "training.checkpoint_every=10", "pruning.interval=2", "data.eval_blocks=32"),
        glue=GlueSettings(epochs=1, learning_rate=1e-4, batch_size=16, max_length=64, max_train_samples=320, max_eval_samples=200),
        seeds={"sst2": (42,), "mrpc": (42,), "cola": (42,)},
        note="a pipeline check, not the experiment: students distilled for a few steps, GLUE on small subsets",
    ),
    # About 40 minutes for the 192 shape on the shared 2-core CPU: a third of the full distillation, 2 seeds on the small tasks.
    "medium": Scale(
        steps=80, batch_size=8, recipe_overrides=("training.eval_every=0", "training.checkpoint_every=40"),
        glue=GlueSettings(epochs=2, learning_rate=1e-4, batch_size=32, max_length=128, max_train_samples=500, max_eval_samples=300),
        seeds={"sst2": (42,), "mrpc": (42, 43), "cola": (42, 43)},
        note="a third of the full distillation steps, GLUE on at most 500 training / 300 dev examples per task, 1-2 seeds",
    ),
    # About 2 h per shape on the idle 2-core CPU (benchmarks/README.md): 240 steps x 8 x 128 tokens per student, as
    # recipes/quickstart.yaml; GLUE on at most 2000-4000 training examples for 2 epochs at lr 3e-4 (checked on the
    # quickstart student: 500 examples or lr 1e-4 leave CoLA at the majority class, MCC 0).
    "full": Scale(
        steps=240, batch_size=8, recipe_overrides=(),
        glue=GlueSettings(epochs=2, learning_rate=3e-4, batch_size=32, max_length=128, max_train_samples=4000),
        seeds={"sst2": (42,), "mrpc": (42, 43, 44), "cola": (42, 43, 44)},
        note="240 distillation steps per student, GLUE on at most 4000 training examples per task (2 epochs, lr 3e-4), full dev sets",
    ),
}


@dataclass(frozen=True)
class Entry:
    """One row of the table: the teacher or an arm at a shape; ``run`` names its directory under --out."""

    run: str
    arm: str  # "teacher" or an ARMS key
    shape: str | None  # a SHAPES key; None for the teacher and the truncation arm

    @property
    def group(self) -> str:
        """Table group: the teacher, then each shape; truncation sits with the widest shape."""
        if self.arm == "teacher":
            return "teacher"
        return self.shape or max(SHAPES, key=lambda k: SHAPES[k].hidden)


def plan_entries(arms: Sequence[str], shapes: Sequence[str]) -> list[Entry]:
    """The teacher and every (arm, shape) asked for, in table order."""
    entries = [Entry("teacher", "teacher", None)]
    for name in arms:
        if not ARMS[name].per_shape:
            entries.append(Entry(name, name, None))
            continue
        entries.extend(Entry(f"{name}-{s}", name, s) for s in shapes)
    return sorted(entries, key=entry_order)


def glue_order(entries: Sequence[Entry]) -> list[Entry]:
    """Fine-tuning order: the widest group's students, then the teacher, then the narrower groups."""
    widest = max(SHAPES, key=lambda k: SHAPES[k].hidden)
    first = [e for e in entries if e.arm != "teacher" and e.group == widest]
    teacher = [e for e in entries if e.arm == "teacher"]
    return first + teacher + [e for e in entries if e not in first and e not in teacher]


def entry_order(entry: Entry) -> tuple:
    """Teacher first, then shapes widest first, arms (a)..(e) within a shape."""
    if entry.arm == "teacher":
        return (0, 0, "")
    return (1, -SHAPES[entry.group].hidden, ARMS[entry.arm].key)


# ------------------------------------------------------------------------------------------------ runs


def block_size() -> int:
    """Tokens per distillation sequence (every arm's recipe shares the data section)."""
    from homoexport.config.recipe import load_recipe

    return load_recipe(RECIPES / ARMS["homodistil"].recipe).data.block_size


def model_dir(out: Path, entry: Entry, teacher: Path) -> Path:
    return teacher if entry.arm == "teacher" else out / entry.run / "student"


def recipe_overrides(entry: Entry, scale: Scale) -> list[str]:
    """The ``--set`` overrides that turn an arm's recipe into this run (shape, steps, scale settings)."""
    shape = SHAPES[entry.shape].overrides() if entry.shape else []
    # fp32, as the committed results were trained: precision auto would choose bf16 on a CPU that multiplies it natively.
    return [*shape, f"training.steps={scale.steps}", f"training.batch_size={scale.batch_size}", f"name=exp-{entry.run}", "training.precision=fp32",
            *scale.recipe_overrides]


def make_student(entry: Entry, out: Path, scale: Scale, teacher: Path, prune_data: list[str]) -> None:
    """Distill (arms a-d) or prune (arm e) into ``out/<run>/student``; skipped when already there."""
    run_dir = out / entry.run
    arm = ARMS[entry.arm]
    done = run_dir / ("prune_report.json" if arm.recipe is None else "report.json")
    if (run_dir / "student" / "config.json").is_file() and done.is_file():
        console.print(f"[dim]{entry.run}: student exists, skipped[/]")
        return
    start = time.perf_counter()
    if arm.recipe is None:
        from homoexport.pruning.oneshot import prune_model

        shape = SHAPES[entry.shape]
        report = prune_model(teacher, run_dir / "student", shape.hidden, shape.heads, shape.ffn, data=prune_data,
                             batches=8, batch_size=scale.batch_size, overwrite=True)
        atomic_write_json(run_dir / "prune_report.json", report | {"wall_time_s": round(time.perf_counter() - start, 2)})
    else:
        from homoexport.config.recipe import load_recipe
        from homoexport.distillation.trainer import distill

        recipe = load_recipe(RECIPES / arm.recipe, recipe_overrides(entry, scale))
        resume = (run_dir / "checkpoints").is_dir()
        distill(recipe, out_dir=run_dir, resume=resume, overwrite=not resume)
    console.print(f"{entry.run}: student in {time.perf_counter() - start:.0f} s")


def run_tasks(entry: Entry, out: Path, scale: Scale, teacher: Path, glue_data: Path) -> None:
    """``run_glue`` for each task into ``out/<run>/glue/<task>``; finished tasks are skipped."""
    from homoexport.evaluation.glue import run_glue

    for task in TASKS:
        task_dir = out / entry.run / "glue" / task
        if (task_dir / "glue_report.json").is_file():
            console.print(f"[dim]{entry.run} {task}: done, skipped[/]")
            continue
        console.print(f"[bold]{entry.run}: GLUE {task}[/]")
        run_glue(model_dir(out, entry, teacher), task, task_dir, scale.glue_settings(task), data_dir=glue_data, overwrite=True)


def torch_latency_ms(model, ids, threads: int, warmup: int = 3, repeats: int = 20) -> float:
    """Median batch-1 PyTorch fp32 forward time (ms) of a loaded classifier on ``ids`` [1, seq] (full mask).

    homoexport.deployment.bench times ONNX sessions only; the table needs the PyTorch figure next to them.
    """
    import numpy as np
    import torch

    mask = torch.ones_like(ids)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(input_ids=ids, attention_mask=mask)
            samples = []
            for _ in range(repeats):
                t0 = time.perf_counter_ns()
                model(input_ids=ids, attention_mask=mask)
                samples.append((time.perf_counter_ns() - t0) / 1e6)
    finally:
        torch.set_num_threads(before)
    return float(np.median(samples))


def measure_latencies(entries: Sequence[Entry], out: Path, teacher: Path, rounds: int = 3) -> None:
    """Params and batch-1/seq-128 latency (PyTorch fp32, int8 ONNX) of each entry's SST-2 first-seed classifier.

    The machine is shared, so the models are timed in interleaved rounds (every model once per round) and
    each keeps its fastest round's median: a load spike then slows one round, not one model. Entries
    with a latency.json already, or without an SST-2 run yet, are left alone.
    """
    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification

    from homoexport.deployment.bench import load_session, measure_latency
    from homoexport.deployment.export import deployed_model_path
    from homoexport.machine import physical_cores

    todo = []
    for entry in entries:
        report_path = out / entry.run / "glue" / TASKS[0] / "glue_report.json"
        if (out / entry.run / "latency.json").is_file() or not report_path.is_file():
            continue
        seed = json.loads(report_path.read_text())["settings"]["seeds"][0]
        todo.append((entry, out / entry.run / "glue" / TASKS[0] / f"seed-{seed}"))
    if not todo:
        return
    threads = physical_cores()
    loaded = []
    for entry, seed_dir in todo:
        model = AutoModelForSequenceClassification.from_pretrained(seed_dir / "model").eval()
        ids = torch.from_numpy(np.random.default_rng(0).integers(1000, model.config.vocab_size, size=(1, LATENCY_SEQ)))
        int8 = deployed_model_path(seed_dir / "onnx")
        loaded.append((entry, model, ids, int8, load_session(int8, threads)))
    times: dict[str, dict[str, list[float]]] = {e.run: {"pytorch": [], "int8": []} for e, *_ in loaded}
    for _ in range(rounds):
        for entry, model, ids, int8, session in loaded:
            times[entry.run]["pytorch"].append(torch_latency_ms(model, ids, threads))
            times[entry.run]["int8"].append(measure_latency(int8, 1, LATENCY_SEQ, threads, warmup=3, repeats=30, session=session).p50_ms)
    for entry, _model, _ids, int8, _session in loaded:
        t = times[entry.run]
        atomic_write_json(out / entry.run / "latency.json", {
            **_encoder_params(model_dir(out, entry, teacher)),
            "pytorch_ms": min(t["pytorch"]), "int8_ms": min(t["int8"]), "rounds_ms": t,
            "int8_file": str(int8.relative_to(out)), "batch": 1, "seq": LATENCY_SEQ, "threads": threads,
            "load_average_1m": os.getloadavg()[0],
        })


def _encoder_params(path: Path) -> dict[str, Any]:
    """Parameter count of the encoder (no task head) and its shape, from a model directory."""
    from transformers import AutoConfig, AutoModel

    from homoexport.distillation.models import quiet_transformers

    quiet_transformers()
    model = AutoModel.from_pretrained(path)
    c = AutoConfig.from_pretrained(path)
    emb = sum(p.numel() for p in model.embeddings.parameters())
    total = sum(p.numel() for p in model.parameters())
    return {"params": total, "params_embedding": emb, "params_backbone": total - emb,
            "layers": c.num_hidden_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads, "ffn": c.intermediate_size}


# ----------------------------------------------------------------------------------------- the table


def task_summary(report: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """A task's score for one backend: per seed, the mean of its metrics (points); then mean ± std over seeds."""
    rows = report["results"]
    per_seed_rows = [r["per_seed"].get(backend) for r in rows]
    if any(v is None for v in per_seed_rows):
        return {"mean": None, "std": None, "per_seed": [], "seeds": rows[0]["seeds"]}
    per_seed = [statistics.fmean(values) for values in zip(*per_seed_rows)]
    return {
        "mean": statistics.fmean(per_seed),
        "std": statistics.stdev(per_seed) if len(per_seed) > 1 else None,
        "per_seed": per_seed,
        "seeds": rows[0]["seeds"],
    }


def build_row(entry: Entry, reports: Mapping[str, Mapping[str, Any]], latency: Mapping[str, Any] | None) -> dict[str, Any]:
    """One table row: shape, params, latency, per-task scores (PyTorch and int8 ONNX) and their averages.

    The average is the mean of the task means over ``TASKS`` (None unless every task has a score).
    """
    row: dict[str, Any] = {
        "run": entry.run,
        "arm": entry.arm,
        "key": "-" if entry.arm == "teacher" else ARMS[entry.arm].key,
        "title": "teacher (all-MiniLM-L6-v2)" if entry.arm == "teacher" else ARMS[entry.arm].title,
        "shape": entry.shape,
        "group": entry.group,
        "latency": latency,
        "tasks": {},
    }
    for backend in ("pytorch", "onnx_int8"):
        scores = {task: task_summary(reports[task], backend) for task in TASKS if task in reports}
        for task, summary in scores.items():
            row["tasks"].setdefault(task, {})[backend] = summary
        means = [scores[t]["mean"] for t in TASKS if t in scores]
        complete = len(means) == len(TASKS) and all(m is not None for m in means)
        row[f"average_{backend}"] = statistics.fmean(means) if complete else None
    return row


def order_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Teacher first, then shapes widest first, arms (a)..(e) within a shape."""
    return sorted(rows, key=lambda r: entry_order(Entry(r["run"], r["arm"], r["shape"])))


def comparisons(rows: Sequence[dict[str, Any]], backend: str = "onnx_int8") -> list[dict[str, Any]]:
    """Per shape group: average score of (a) minus each other arm's, in points (positive: HomoDistil ahead)."""
    out = []
    for group in dict.fromkeys(r["group"] for r in rows if r["arm"] != "teacher"):
        members = [r for r in rows if r["group"] == group]
        ours = next((r for r in members if r["arm"] == "homodistil"), None)
        if ours is None or ours[f"average_{backend}"] is None:
            continue
        for other in members:
            if other["arm"] != "homodistil" and other[f"average_{backend}"] is not None:
                out.append({"group": group, "versus": other["run"], "key": other["key"],
                            "delta": ours[f"average_{backend}"] - other[f"average_{backend}"]})
    return out


def _fmt(summary: Mapping[str, Any] | None) -> str:
    if not summary or summary["mean"] is None:
        return "-"
    return f"{summary['mean']:.1f}" if summary["std"] is None else f"{summary['mean']:.1f} ± {summary['std']:.1f}"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the table: each task cell is 'PyTorch / int8 ONNX' (mean ± std over seeds)."""
    header = ["", "student", "L/H/A/FFN", "params (M)", "PyTorch ms", "int8 ONNX ms",
              *(f"{TASK_TITLES[t]} ({METRIC_NOTE[t]})" for t in TASKS), "Avg PyTorch", "Avg int8"]
    cells = []
    for r in rows:
        lat = r["latency"] or {}
        shape = f"{lat['layers']}/{lat['hidden']}/{lat['heads']}/{lat['ffn']}" if lat else "-"
        cells.append([
            r["key"], r["title"], shape,
            _num(lat["params"] / 1e6, 2) if lat else "-",
            _num(lat["pytorch_ms"]) if lat else "-",
            _num(lat["int8_ms"]) if lat else "-",
            *(f"{_fmt(r['tasks'].get(t, {}).get('pytorch'))} / {_fmt(r['tasks'].get(t, {}).get('onnx_int8'))}" for t in TASKS),
            _num(r["average_pytorch"]), _num(r["average_onnx_int8"]),
        ])
    return header, cells


def markdown(result: Mapping[str, Any]) -> str:
    """The table, the settings, and the measured comparison of (a) with the other arms."""
    header, cells = table_rows(result["rows"])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c) + " |" for c in cells]
    s, g = result["scale"], result["glue_settings"]
    text = [
        f"## Headline experiment: HomoDistil vs baselines (scale: {result['scale_name']})\n",
        *([f"**{result['scale_name']} scale: {result['scale_note']}**\n"] if result.get("scale_note") else []),
        "\n".join(lines) + "\n",
        f"Task cells: PyTorch / int8 ONNX dev score in points (SST-2 acc, MRPC mean of F1 and acc, CoLA MCC), "
        f"mean ± sample std over seeds (no ± with one seed). Avg: mean of the three task means. Latency (ms): batch-1, seq-{LATENCY_SEQ} "
        f"forward of the SST-2 classifier on {result['threads']} threads (PyTorch fp32; the deployed int8 ONNX file), the "
        f"fastest of 3 interleaved rounds' medians{_load_note(result['rows'])}. Params: encoder without the task head.\n",
        f"Distillation: {s['steps']} steps x batch {s['batch_size']} x {result['block_size']} tokens = "
        f"{s['steps'] * s['batch_size'] * result['block_size']} tokens per distilled student; recipes/experiments/*.yaml "
        f"with overrides {', '.join(s['recipe_overrides']) or 'none'}. Fine-tuning: epochs {g['epochs']}, lr {g['learning_rate']}, "
        f"batch {g['batch_size']}, max_length {g['max_length']}, max train samples {g['max_train_samples']}, "
        f"max eval samples {g['max_eval_samples']}, seeds {', '.join(f'{t}: {list(v)}' for t, v in s['seeds'].items())}; "
        f"dynamic int8, O2.\n",
        "### (a) against the others (average int8 score, points)\n",
    ]
    deltas = result["comparisons"]
    if deltas:
        text += [f"- shape {d['group']}: (a) − ({d['key']}) {d['versus']} = {d['delta']:+.1f}" for d in deltas]
        ahead = sum(d["delta"] > 0 for d in deltas)
        text.append(f"\n(a) is ahead in {ahead} of {len(deltas)} comparisons, as measured at this scale.")
    else:
        text.append("- no complete rows to compare yet")
    text.append(f"\nCommand: `{result['command']}`. Wall time of this invocation: {result['wall_s']:.0f} s "
                f"(skipped units not counted; per-unit wall times in headline.json).")
    return "\n".join(text) + "\n"


def _load_note(rows: Sequence[Mapping[str, Any]]) -> str:
    """The 1-minute load average recorded when the latencies were taken (the machine may be shared)."""
    loads = [r["latency"]["load_average_1m"] for r in rows if r.get("latency") and "load_average_1m" in r["latency"]]
    return f", at load average {min(loads):.1f}-{max(loads):.1f} on this machine" if loads else ""


def plot(result: Mapping[str, Any], path: Path) -> None:
    """Average int8 score against int8 ONNX latency, one labelled point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {"teacher": "*", **{k: m for k, m in zip(SHAPES, "os^")}}
    for r in result["rows"]:
        if r["latency"] is None or r["average_onnx_int8"] is None:
            continue
        x, y = r["latency"]["int8_ms"], r["average_onnx_int8"]
        ax.scatter(x, y, marker=markers.get(r["group"], "o"), s=120 if r["arm"] == "teacher" else 50)
        ax.annotate(r["run"] if r["arm"] != "teacher" else "teacher", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(f"int8 ONNX latency, batch 1, seq {LATENCY_SEQ} (ms)")
    ax.set_ylabel("average GLUE dev score, int8 ONNX (SST-2, MRPC, CoLA)")
    ax.set_title(f"Headline experiment (scale: {result['scale_name']})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def print_table(result: Mapping[str, Any]) -> None:
    header, cells = table_rows(result["rows"])
    table = Table(title=f"Headline experiment (scale: {result['scale_name']})")
    for name in header:
        table.add_column(name)
    for c in cells:
        table.add_row(*c)
    console.print(table)


# ------------------------------------------------------------------------------------------------ main


def collect(entries: Sequence[Entry], out: Path) -> list[dict[str, Any]]:
    """Rows from whatever is on disk under ``out`` (missing tasks or latency give '-' cells)."""
    rows = []
    for entry in entries:
        reports = {}
        for task in TASKS:
            path = out / entry.run / "glue" / task / "glue_report.json"
            if path.is_file():
                reports[task] = json.loads(path.read_text())
        lat_path = out / entry.run / "latency.json"
        latency = json.loads(lat_path.read_text()) if lat_path.is_file() else None
        row = build_row(entry, reports, latency)
        row["wall_s"] = {"student": _student_wall(out / entry.run), **{t: r.get("wall_s") for t, r in reports.items()}}
        rows.append(row)
    return order_rows(rows)


def _student_wall(run_dir: Path) -> float | None:
    """Seconds the distillation (report.json) or the pruning (prune_report.json) took; None for the teacher."""
    for name in ("report.json", "prune_report.json"):
        if (run_dir / name).is_file():
            return json.loads((run_dir / name).read_text()).get("wall_time_s")
    return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", choices=sorted(SCALES), default="full", help="step counts and GLUE subsets (see SCALES)")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated final shapes (hidden sizes): {', '.join(SHAPES)}")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated arms: {', '.join(ARMS)}")
    ap.add_argument("--teacher", type=Path, default=Path("../shared/models/all-MiniLM-L6-v2"), help="teacher model directory "
                    "(must match the recipes' teacher)")
    ap.add_argument("--glue-data", type=Path, default=Path("../shared/data/glue"), help="GLUE data in the original TSV layout")
    ap.add_argument("--prune-data", nargs="+", default=["../shared/data/corpus/wikipedia-en-wikiextractor"],
                    help="text scored by the prune-only arm (e)")
    ap.add_argument("--out", type=Path, default=None, help="run directory (default runs/headline-<scale>); finished units are skipped")
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results", help="where headline.{md,json,png} go")
    ap.add_argument("--distill-only", action="store_true", help="make the students and stop (no GLUE, no table)")
    ap.add_argument("--table-only", action="store_true", help="no distillation or fine-tuning: time the finished classifiers "
                    "not timed yet, then rebuild the table from what is on disk under --out")
    args = ap.parse_args(argv)

    shapes = [s for s in args.shapes.split(",") if s]
    arms = [a for a in args.arms.split(",") if a]
    bad = [s for s in shapes if s not in SHAPES] + [a for a in arms if a not in ARMS]
    if bad:
        ap.error(f"unknown shape/arm {', '.join(bad)} (shapes: {', '.join(SHAPES)}; arms: {', '.join(ARMS)})")
    for path, what in ((args.teacher, "--teacher"), (args.glue_data, "--glue-data")):
        if not path.exists():
            ap.error(f"{what} {path} does not exist")
    scale = SCALES[args.scale]
    out = args.out or Path("runs") / f"headline-{args.scale}"
    entries = plan_entries(arms, shapes)
    start = time.perf_counter()
    walls: dict[str, dict[str, float]] = {}
    if not args.table_only:
        # Students first, then GLUE widest group first with the teacher after it: a run cut short still
        # compares the arms at one shape against the teacher.
        students = [e for e in entries if e.arm != "teacher"]
        for entry in students:
            t0 = time.perf_counter()
            make_student(entry, out, scale, args.teacher, args.prune_data)
            walls[entry.run] = {"student_s": time.perf_counter() - t0}
        if args.distill_only:
            return 0
        for entry in glue_order(entries):
            t0 = time.perf_counter()
            run_tasks(entry, out, scale, args.teacher, args.glue_data)
            walls.setdefault(entry.run, {})["glue_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    measure_latencies(entries, out, args.teacher)
    walls["latency"] = {"latency_s": time.perf_counter() - t0}

    from homoexport.machine import physical_cores

    rows = collect(entries, out)
    result = {
        "kind": "homoexport.headline",
        "scale_name": args.scale,
        "scale_note": scale.note,
        "scale": {"steps": scale.steps, "batch_size": scale.batch_size, "recipe_overrides": list(scale.recipe_overrides),
                  "seeds": {t: list(v) for t, v in scale.seeds.items()}},
        "glue_settings": asdict(scale.glue),
        "block_size": block_size(),
        "tasks": list(TASKS),
        "threads": physical_cores(),
        "rows": rows,
        "comparisons": comparisons(rows),
        "wall_s_per_run": walls,
        "wall_s": time.perf_counter() - start,
        "command": "python benchmarks/headline.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "out": str(out),
        "machine": fingerprint(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.results / "headline.json", result)
    atomic_write_text(args.results / "headline.md", markdown(result))
    plot(result, args.results / "headline.png")
    print_table(result)
    console.print(f"wrote {args.results / 'headline.md'}, headline.json, headline.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
