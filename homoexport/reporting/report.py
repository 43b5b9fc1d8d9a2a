"""Readable reports: markdown tables and PNG plots of bench results, and ``homoexport report``, which
gathers the JSON reports of runs (distill, export, GLUE, bench) into one ``report.md``.

The gatherer reads whatever it finds and says what it skipped: each report kind is one ``Section``
(file name + renderer) in ``SECTIONS``, so a new kind of report is one more entry. Renderers show the
fields they do not know as a flat key/value table (``_field_table``), so a format change upstream
degrades the report instead of breaking it. Imports nothing heavy at module level (matplotlib lazily, never torch).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from homoexport.errors import InputNotFoundError

GLUE_VARIANTS = ("pytorch", "onnx_fp32", "onnx_int8")  # the model variants a glue_report.json evaluates
WIDTH_FIELDS = ("hidden", "heads", "head_dim", "ffn", "attention", "ratio", "remaining")


# --------------------------------------------------------------------------------------------------
# glue_report.json


def read_glue(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Accuracy rows ``{task, split, metric, variant, value, primary}`` from a glue_report.json, in points.

    Expected: ``{"results": [{"task", "split", "metric", "primary", "pytorch", "onnx_fp32", "onnx_int8"}, ...],
    "units": "... points ..."}`` as ``homoexport glue`` writes it. Also tolerated: a top-level list; a
    ``tasks`` list or ``{task: result}`` mapping; the metric name under ``metric_name``/``main_metric``;
    per-variant numbers under ``values``/``scores``, or ``metrics: {name: {variant: value}}``. Missing
    ``split`` is ""; missing ``primary`` is true. Unless ``units`` mentions points, values all within
    [-1, 1] are taken as fractions and scaled to points. Rows without a number (None) are skipped.
    """
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    items: Iterable[Any]
    if isinstance(data, list):
        items = data
    elif isinstance(data, dict):
        raw = data.get("results", data.get("tasks", []))
        items = [{"task": k, **v} for k, v in raw.items() if isinstance(v, dict)] if isinstance(raw, dict) else raw
    else:
        items = []
    rows: list[dict[str, Any]] = []
    for item in items:
        if not isinstance(item, dict) or "task" not in item:
            continue
        if isinstance(item.get("metrics"), dict):
            per_metric = {str(m): v for m, v in item["metrics"].items() if isinstance(v, dict)}
        else:
            name = item.get("metric") or item.get("metric_name") or item.get("main_metric") or "score"
            values = item.get("values") or item.get("scores") or item
            per_metric = {str(name): values if isinstance(values, dict) else {}}
        for metric, values in per_metric.items():
            for variant in GLUE_VARIANTS:
                v = values.get(variant)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    rows.append(
                        {"task": str(item["task"]), "split": str(item.get("split", "")), "metric": metric, "variant": variant,
                         "value": float(v), "primary": bool(item.get("primary", True))}
                    )
    in_points = isinstance(data, dict) and "point" in str(data.get("units", ""))
    if rows and not in_points and all(abs(r["value"]) <= 1.0 for r in rows):
        rows = [{**r, "value": r["value"] * 100.0} for r in rows]
    return rows


def find_glue_reports(specs: Sequence[str], search_dirs: Iterable[Path] = ()) -> list[tuple[str, Path]]:
    """(label, glue_report.json) for each ``PATH``/``NAME=PATH`` spec (a file or a dir holding one), then
    for each of ``search_dirs`` that holds a glue_report.json. The label (NAME or the file's directory
    name) keeps accuracy entries apart when several reports are compared."""
    found: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, raw = spec.partition("=")
        if not sep or Path(spec).exists():
            name, raw = "", spec
        path = Path(raw)
        path = path / "glue_report.json" if path.is_dir() else path
        if not path.is_file():
            raise InputNotFoundError(f"glue report not found: {path} (pass a glue_report.json or a directory holding one)")
        found.append((name or path.resolve().parent.name, path))
    for d in search_dirs:
        path = Path(d) / "glue_report.json"
        if path.is_file() and all(path.resolve() != p.resolve() for _, p in found):
            found.append((Path(d).resolve().name, path))
    return found


# --------------------------------------------------------------------------------------------------
# bench.json: tables and plots


def _num(x: Any, digits: int = 2) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else "-"


def bench_markdown(report: Mapping[str, Any]) -> str:
    """Markdown: the machine, a per-model table (size, load, memory) and the latency grid."""
    m = report.get("machine", {})
    ort = m.get("versions", {}).get("onnxruntime")
    lines = [
        f"**Machine** `{m.get('id', '?')}`: {m.get('cpu_model', '?')} ({m.get('physical_cores', '?')} cores, "
        f"ISA {' '.join(m.get('isa', [])) or '?'}), {m.get('os', '?')}, onnxruntime {ort}",
        "",
        "| model | file MB | load ms | peak RSS MB | session RSS MB | inputs |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, info in report.get("models", {}).items():
        lines.append(
            f"| {name} | {_num(info.get('file_mb'))} | {_num(info.get('load_ms'), 1)} | {_num(info.get('peak_rss_mb'), 1)} "
            f"| {_num(info.get('session_rss_mb'), 1)} | {info.get('inputs', '-')} |"
        )
    lines += [
        "",
        "| model | threads | batch | seq | p50 ms | p90 ms | p99 ms | mean ± std ms | seq/s | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in report.get("results", []):
        seq = f"≤{e['seq']} ({e['seq_dist']})" if e.get("seq_dist", "fixed") != "fixed" else e["seq"]
        lines.append(
            f"| {e['model']} | {e['threads']} | {e['batch']} | {seq} | {_num(e['p50_ms'], 3)} | {_num(e['p90_ms'], 3)} "
            f"| {_num(e['p99_ms'], 3)} | {_num(e['mean_ms'], 3)} ± {_num(e['std_ms'], 3)} | {_num(e['throughput_per_s'], 1)} | {e['n']} |"
        )
    if report.get("accuracy"):
        lines += ["", glue_markdown(report["accuracy"])]
    return "\n".join(lines) + "\n"


def glue_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """One line per (source, task, metric), one column per variant, in points."""
    table: dict[tuple[str, str, str], dict[str, float]] = {}
    for r in rows:
        task = f"{r['task']} ({r['split']})" if r.get("split") else r["task"]
        table.setdefault((r.get("source", ""), task, r["metric"]), {})[r["variant"]] = r["value"]
    lines = ["| source | task | metric | " + " | ".join(GLUE_VARIANTS) + " | int8 - pytorch |", "|---|---|---|" + "---:|" * (len(GLUE_VARIANTS) + 1)]
    for (source, task, metric), v in table.items():
        delta = v["onnx_int8"] - v["pytorch"] if "onnx_int8" in v and "pytorch" in v else None
        cells = " | ".join(_num(v.get(k)) for k in GLUE_VARIANTS)
        lines.append(f"| {source} | {task} | {metric} | {cells} | {_num(delta) if delta is None else f'{delta:+.2f}'} |")
    return "\n".join(lines) + "\n"


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "model"


def figure(ncols: int = 1) -> tuple[Any, Any]:
    """A matplotlib Figure without pyplot: no backend is chosen and no global state of the caller changes."""
    from matplotlib.figure import Figure  # lazy: only plotting needs matplotlib

    fig = Figure(figsize=(6 * ncols, 4.2), layout="constrained")
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def plot_latency(report: Mapping[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """Per model, ``latency_<model>.png``: p50 (band to p90) vs seq (a line per batch x threads) and vs
    batch (a line per seq x threads); plus ``latency_models.png``, p50 vs seq of every model at the
    smallest batch and most threads. Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = report.get("results", [])
    written: list[Path] = []
    for model in dict.fromkeys(e["model"] for e in results):
        rows = [e for e in results if e["model"] == model]
        fig, (ax_seq, ax_batch) = figure(2)
        for ax, x_key, line_key in ((ax_seq, "seq", "batch"), (ax_batch, "batch", "seq")):
            for (t, k) in sorted({(e["threads"], e[line_key]) for e in rows}):
                pts = sorted((e[x_key], e["p50_ms"], e["p90_ms"]) for e in rows if e["threads"] == t and e[line_key] == k)
                xs, p50, p90 = zip(*pts)
                ax.plot(xs, p50, marker="o", label=f"{line_key}={k}, threads={t}")
                ax.fill_between(xs, p50, p90, alpha=0.15)
            ax.set_xlabel(x_key)
            ax.set_ylabel("latency p50 ms (band: to p90)")
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(model)
        path = out / f"latency_{_slug(model)}.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    if results:
        batch, threads = min(e["batch"] for e in results), max(e["threads"] for e in results)
        fig, (ax,) = figure(1)
        for model in dict.fromkeys(e["model"] for e in results):
            pts = sorted((e["seq"], e["p50_ms"]) for e in results if e["model"] == model and e["batch"] == batch and e["threads"] == threads)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=model)
        ax.set(xlabel="seq", ylabel="latency p50 ms", title=f"all models, batch={batch}, threads={threads}")
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out / "latency_models.png"
        fig.savefig(path, dpi=110)
        written.append(path)
    return written


# --------------------------------------------------------------------------------------------------
# teacher-assistant selection (homoexport.distillation.assistant's report.json)


TRADEOFF_COLUMNS = ("hidden", "heads", "ffn", "params", "sparsity", "quality", "score", "")


def tradeoff_rows(selection: Mapping[str, Any]) -> list[list[str]]:
    """One row of cells (``TRADEOFF_COLUMNS``) per assistant candidate and the target, the choice marked."""
    chosen = selection["chosen"]["widths"]
    rows = []
    for row in selection["candidates"]:
        w = row["widths"]
        mark = "chosen" if w == chosen and row["role"] == "candidate" else ("target" if row["role"] == "target" else "")
        rows.append([str(w["hidden"]), str(w["heads"]), str(w["ffn"]), f"{row['parameters'] / 1e6:.2f}M", f"{row['sparsity']:.3f}",
                     f"{row['quality']:.4f}", f"{row['score']:.4f}", mark])
    return rows


def tradeoff_markdown(selection: Mapping[str, Any]) -> str:
    """Every assistant candidate's width, parameters, sparsity, held-out quality and λ-tradeoff score."""
    lines = [f"Teacher-assistant candidates (metric {selection['metric']}, λ = {selection['lambda']}):", "",
             "| " + " | ".join(TRADEOFF_COLUMNS) + " |", "|" + "---:|" * (len(TRADEOFF_COLUMNS) - 1) + "---|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in tradeoff_rows(selection)]
    return "\n".join(lines) + "\n"


def plot_tradeoff(selection: dict[str, Any], path: Path) -> Path:
    """Quality vs sparsity of every candidate, the target and the chosen assistant marked."""
    fig, (ax,) = figure(1)
    rows = selection["candidates"]
    cand = [r for r in rows if r["role"] == "candidate"]
    ax.plot([r["sparsity"] for r in cand], [r["quality"] for r in cand], "o-", label="candidates")
    for r in rows:
        ax.annotate(f"h{r['widths']['hidden']}/f{r['widths']['ffn']}", (r["sparsity"], r["quality"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    tgt = [r for r in rows if r["role"] == "target"]
    ax.plot([r["sparsity"] for r in tgt], [r["quality"] for r in tgt], "s", color="gray", label="target (direct)")
    ch = selection["chosen"]
    ax.plot([ch["sparsity"]], [ch["quality"]], "*", markersize=14, color="red", label=f"chosen (λ={selection['lambda']})")
    ax.set_xlabel("sparsity (1 - params / teacher params)")
    ax.set_ylabel(f"quality ({selection['metric']})")
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)
    return path

# --------------------------------------------------------------------------------------------------
# `homoexport report`: gather the reports of run directories into report.md


@dataclass
class Found:
    """One report file found in a run directory, parsed."""

    run: str
    path: Path
    data: Any


@dataclass
class Gathered:
    """Everything found under the run directories, by section key, plus what could not be read."""

    runs: list[Path]
    found: dict[str, list[Found]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Section:
    """A kind of report: the file name to look for, a title, and how to render the files found."""

    key: str
    filename: str
    title: str
    render: Callable[[list[Found], Path], tuple[str, list[Path]]]  # (markdown, figures written)


def gather(run_dirs: Sequence[str | os.PathLike]) -> Gathered:
    """Find every section's file anywhere under each run directory and parse it (bad JSON is reported,
    not fatal). Runs are labelled by directory name, or by the path as given when names collide."""
    runs = [Path(r) for r in run_dirs]
    for r in runs:
        if not r.is_dir():
            raise InputNotFoundError(f"run directory not found: {r}")
    g = Gathered(runs)
    names = [r.resolve().name for r in runs]
    labels = names if len(set(names)) == len(names) else [r.as_posix() for r in runs]
    # A file under two of the given directories (a run and its export/) belongs to the innermost one, once.
    order = sorted(zip(runs, labels), key=lambda rl: -len(rl[0].resolve().parts))
    seen: set[Path] = set()
    for section in SECTIONS:
        for run, label in order:
            for path in sorted(run.rglob(section.filename)):
                if any(part.startswith(".") for part in path.relative_to(run).parts):
                    continue  # staging / hidden dirs hold unfinished work
                if path.resolve() in seen:
                    continue
                seen.add(path.resolve())
                try:
                    data = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, json.JSONDecodeError) as e:
                    g.problems.append(f"{path}: unreadable ({e})")
                    continue
                g.found.setdefault(section.key, []).append(Found(label, path, data))
    return g


SKIPPED_FIELDS = ("machine", "runs", "per_seed")  # bulky or repeated in every report; not for reading


def flat_items(data: Any, prefix: str = "", depth: int = 3) -> list[tuple[str, str]]:
    """Scalar fields of nested dicts as (dotted key, value), ``depth`` levels deep; deeper dicts and lists
    are summarised by their size. For fields no renderer knows."""
    out: list[tuple[str, str]] = []
    if isinstance(data, dict):
        for k, v in data.items():
            key = f"{prefix}{k}"
            if k in SKIPPED_FIELDS:
                continue
            if isinstance(v, dict):
                out += flat_items(v, f"{key}.", depth - 1) if depth > 1 else [(key, f"{{{len(v)} fields}}")]
            elif isinstance(v, list):
                out.append((key, f"[{len(v)} items]"))
            else:
                out.append((key, f"{v:.4g}" if isinstance(v, float) else str(v)))
    return out


def _field_table(data: Any, limit: int = 60) -> str:
    rows = flat_items(data)
    more = [("…", f"{len(rows) - limit} more fields in the file")] if len(rows) > limit else []
    return "| field | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows[:limit] + more) + "\n"


def _export(found: list[Found], out_dir: Path) -> tuple[str, list[Path]]:
    """Files (size, p50 from the export's own latency check, which one deploys), then the other fields."""
    parts = []
    for f in found:
        d = f.data if isinstance(f.data, dict) else {}
        files = d.get("files") if isinstance(d.get("files"), dict) else {}
        latency = d.get("latency_ms", {}).get("by_file", {}) if isinstance(d.get("latency_ms"), dict) else {}
        text = f"**{f.run}** (`{f.path}`)\n\n"
        if files:
            text += "| file | MB | p50 ms | deployed |\n|---|---:|---:|---|\n"
            for name, size in files.items():
                p50 = latency.get(name, {}).get("p50_ms") if isinstance(latency.get(name), dict) else None
                text += f"| {name} | {_num(size / 1024 / 1024 if isinstance(size, (int, float)) else None)} | {_num(p50, 3)} | {'yes' if d.get('deployed_file') == name else ''} |\n"
            text += "\n"
        rest = {k: v for k, v in d.items() if k not in ("files", "latency_ms")}
        parts.append(text + _field_table(rest))
    return "\n".join(parts), []


def width_history(data: Any) -> list[dict[str, float]]:
    """A width-over-training series: the first list of dicts that have a ``step`` and numeric width fields
    (``hidden``, ``heads``, ``head_dim``, ``ffn``, ...; flat or under ``widths``), searched in ``data``
    and its dict values. Records without widths are skipped."""
    candidates: list[Any] = [data] if isinstance(data, list) else []
    if isinstance(data, dict):
        candidates = [v for v in data.values() if isinstance(v, list)] + [v for d in data.values() if isinstance(d, dict) for v in d.values() if isinstance(v, list)]
    for seq in candidates:
        points = []
        for item in seq:
            if not isinstance(item, dict) or "step" not in item:
                continue
            widths = item.get("widths") if isinstance(item.get("widths"), dict) else item
            point = {k: float(widths[k]) for k in WIDTH_FIELDS if isinstance(widths.get(k), (int, float))}
            if point:
                points.append({"step": float(item["step"]), **point})
        if points:
            return points
    return []


TRAIN_LOG = "train_log.jsonl"  # written by the trainer next to report.json: one JSON record per logged step


def read_jsonl(path: Path) -> list[Any]:
    """Records of a JSON-lines file; a torn last line (a run still writing) is ignored."""
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def task_scores_markdown(report: Mapping[str, Any]) -> str:
    """A task run's dev scores side by side: the teacher and the student in PyTorch, the shipped int8 file, and what
    its budgets said (accuracy-drop selection, latency of the shipped file)."""
    teacher, student, deployed = report["teacher"]["dev"], report["student"]["dev"], report.get("deployed") or {}
    metrics = list(teacher)
    rows = [("teacher (PyTorch)", teacher), ("student (PyTorch)", student)]
    if deployed.get("dev"):
        rows.append((f"shipped int8 ONNX (`{deployed['path']}`)", deployed["dev"]))
    lines = ["| dev | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(_num(scores.get(m)) for m in metrics) + " |" for name, scores in rows]
    primary = report["primary_metric"]
    shipped = deployed.get("dev", student)
    lines.append(f"\nDrop of the shipped model: {_num(teacher[primary] - shipped[primary])} points of {primary}.")
    sel = report.get("selection")
    if sel:
        verdict = f"chose `{sel['chosen']}`" if sel["met"] else f"missed (smallest drop {_num(sel.get('best_drop'))})"
        lines.append(f"Budget accuracy-drop <= {sel['max_drop']:g}: {verdict}.")
    check = report.get("latency_check")
    if check:
        lines.append(f"Budget {check['budget']}: the shipped int8 file times {_num(check['p50_ms'])} ms at batch 1 / seq {check['seq']}, "
                     f"{'within' if check['met'] else 'over'} it.")
    return "\n".join(lines) + "\n"


def _distill(found: list[Found], out_dir: Path) -> tuple[str, list[Path]]:
    """The report's fields, and the width schedule from the report or from train_log.jsonl beside it; for a task run,
    its dev scores beside the teacher's first."""
    parts, figs = [], []
    for f in found:
        scores = task_scores_markdown(f.data) if isinstance(f.data, dict) and str(f.data.get("schema", "")).startswith("homoexport.task_distill/") else ""
        text = f"**{f.run}** (`{f.path}`)\n\n{scores}\n{_field_table(f.data)}"
        log = f.path.with_name(TRAIN_LOG)
        history = width_history(f.data) or (width_history(read_jsonl(log)) if log.is_file() else [])
        if not history:
            text += f"\n_No width history (records of step + hidden/heads/head_dim/ffn) in {f.path.name} or {TRAIN_LOG}._\n"
        else:
            fig, (ax,) = figure(1)
            for key in WIDTH_FIELDS:
                first = next((p[key] for p in history if key in p), None)
                pts = [(p["step"], p[key] / first) for p in history if key in p] if first else []
                if pts:
                    ax.plot(*zip(*pts), label=key, drawstyle="steps-post")
            ax.set(xlabel="step", ylabel="width / first logged width", title=f"width schedule: {f.run}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            path = out_dir / f"widths_{_slug(f.run)}.png"
            fig.savefig(path, dpi=110)
            figs.append(path)
            last = history[-1]
            shape = ", ".join(f"{k} {int(last[k])}" for k in WIDTH_FIELDS if k in last)
            text += f"\nWidths at step {int(last['step'])}: {shape}.\n\n![width schedule {f.run}]({path.name})\n"
        selection = f.data.get("selection") if isinstance(f.data, dict) else None
        if selection and selection.get("candidates"):
            path = plot_tradeoff(selection, out_dir / f"assistant_tradeoff_{_slug(f.run)}.png")
            figs.append(path)
            text += f"\n{tradeoff_markdown(selection)}\n![assistant tradeoff {f.run}]({path.name})\n"
        parts.append(text)
    return "\n".join(parts), figs


def _glue(found: list[Found], out_dir: Path) -> tuple[str, list[Path]]:
    parts = []
    for f in found:
        rows = read_glue(f.path)
        if rows:
            parts.append(f"**{f.run}** (`{f.path}`)\n\n" + glue_markdown([{**r, "source": f.run} for r in rows]))
        else:
            parts.append(f"**{f.run}**: no results in the expected shape in `{f.path}` (see `read_glue`)\n")
    return "\n".join(parts), []


def _bench(found: list[Found], out_dir: Path) -> tuple[str, list[Path]]:
    parts, figs = [], []
    for i, f in enumerate(found):
        if not isinstance(f.data, dict) or "results" not in f.data:
            parts.append(f"**{f.run}**: `{f.path}` is not a bench report\n")
            continue
        run_dir = out_dir / f"bench{i}_{_slug(f.run)}"
        written = plot_latency(f.data, run_dir)
        figs += written
        images = "\n".join(f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in written)
        gate = f.data.get("comparison")
        verdict = ""
        if isinstance(gate, dict):
            failed = [d for d in gate.get("diffs", []) if d.get("status") in ("regressed", "missing")]
            verdict = f"Gate against `{gate.get('baseline')}`: exit {gate.get('exit_code')}, {len(failed)} entries regressed or missing.\n\n"
        parts.append(f"**{f.run}** (`{f.path}`)\n\n{verdict}{bench_markdown(f.data)}\n{images}\n")
    return "\n".join(parts), figs


SECTIONS: tuple[Section, ...] = (
    Section("distill", "report.json", "Distillation", _distill),
    Section("export", "export_report.json", "Export", _export),
    Section("glue", "glue_report.json", "GLUE accuracy", _glue),
    Section("bench", "bench.json", "Latency and memory", _bench),
)

PARETO_VARIANTS = ("onnx_int8", "onnx_fp32", "pytorch")  # which accuracy a run is plotted with, first present


def pareto_points(g: Gathered) -> list[dict[str, Any]]:
    """Per run: mean primary GLUE score (of the first variant present, in PARETO_VARIANTS order) and the lowest
    p50 at the run's smallest batch, largest seq and most threads. Runs lacking either are left out."""
    points = []
    for run in {f.run: None for key in ("glue", "bench") for f in g.found.get(key, [])}:
        rows = [r for f in g.found.get("glue", []) if f.run == run for r in read_glue(f.path)]
        variant = next((v for v in PARETO_VARIANTS if any(r["variant"] == v for r in rows)), None)
        results = [e for f in g.found.get("bench", []) if f.run == run and isinstance(f.data, dict) for e in f.data.get("results", [])]
        if variant is None or not results:
            continue
        b, s, t = min(e["batch"] for e in results), max(e["seq"] for e in results), max(e["threads"] for e in results)
        best = min((e for e in results if (e["batch"], e["seq"], e["threads"]) == (b, s, t)), key=lambda e: e["p50_ms"])
        primary = [r for r in rows if r["variant"] == variant and r.get("primary", True)]
        scores = [r["value"] for r in primary or [r for r in rows if r["variant"] == variant]]
        points.append({"run": run, "score": sum(scores) / len(scores), "variant": variant, "tasks": sorted({r["task"] for r in primary or rows}), "p50_ms": best["p50_ms"], "model": best["model"], "batch": b, "seq": s, "threads": t})
    front_best = math.inf
    for p in sorted(points, key=lambda p: (-p["score"], p["p50_ms"])):
        p["pareto"] = p["p50_ms"] < front_best
        front_best = min(front_best, p["p50_ms"])
    return points


def _paretofigure(points: list[dict[str, Any]], out_dir: Path) -> Path:
    fig, (ax,) = figure(1)
    for p in points:
        ax.scatter(p["p50_ms"], p["score"], color="C0" if p["pareto"] else "C7", zorder=3)
        ax.annotate(p["run"], (p["p50_ms"], p["score"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    front = sorted((p["p50_ms"], p["score"]) for p in points if p["pareto"])
    if len(front) > 1:  # one point is no front: no line and no legend entry for it
        ax.plot(*zip(*front), color="C0", linestyle="--", label="Pareto front")
        ax.legend(fontsize=8)
    tasks = sorted({t for p in points for t in p.get("tasks", ())})
    ylabel = f"{tasks[0]} primary metric (points)" if len(tasks) == 1 else f"mean primary GLUE score over {len(tasks)} tasks (points)"
    ax.set(xlabel="latency p50 ms", ylabel=ylabel, title="accuracy vs latency")
    ax.grid(alpha=0.3)
    path = out_dir / "pareto.png"
    fig.savefig(path, dpi=110)
    return path


def render_report(g: Gathered, out_dir: Path) -> tuple[str, list[Path]]:
    """The markdown of the whole report (figures written into ``out_dir``), sections in SECTIONS order."""
    figs: list[Path] = []
    lines = ["# homoexport report", "", "Runs: " + ", ".join(f"`{r}`" for r in g.runs), ""]
    points = pareto_points(g)
    if points:
        lines += [
            "## Accuracy vs latency",
            "",
            "Score: mean of the primary GLUE metrics of the run (points); latency: the run's fastest model at its smallest "
            "batch, longest sequence and most threads. Pareto: no other run is both more accurate and faster.",
            "",
            "| run | model | score | variant | p50 ms | at | Pareto |",
            "|---|---|---:|---|---:|---|---|",
        ]
        for p in sorted(points, key=lambda p: p["p50_ms"]):
            at = f"b={p['batch']} s={p['seq']} t={p['threads']}"
            lines.append(f"| {p['run']} | {p['model']} | {p['score']:.2f} | {p['variant']} | {p['p50_ms']:.3f} | {at} | {'yes' if p['pareto'] else ''} |")
        figs.append(_paretofigure(points, out_dir))
        lines += ["", "![accuracy vs latency](pareto.png)", ""]
    for section in SECTIONS:
        found = g.found.get(section.key, [])
        lines += [f"## {section.title}", ""]
        if not found:
            lines += [f"_No {section.filename} found in these runs; section skipped._", ""]
            continue
        text, written = section.render(found, out_dir)
        figs += written
        lines += [text, ""]
    if g.problems:
        lines += ["## Problems", ""] + [f"- {p}" for p in g.problems] + [""]
    return "\n".join(lines), figs


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Gathered]:
    """Gather ``run_dirs`` and write ``out_dir``/report.md with its PNGs; the directory appears whole or
    not at all. Returns the report path and what was gathered (to tell the user what was skipped)."""
    from homoexport.atomic import staging_dir

    g = gather(run_dirs)
    if not g.found:
        names = ", ".join(s.filename for s in SECTIONS)
        raise InputNotFoundError(f"no reports ({names}) found under {', '.join(map(str, run_dirs))}")
    final = Path(out_dir)
    with staging_dir(final, overwrite=overwrite) as tmp:
        markdown, _ = render_report(g, tmp)
        (tmp / "report.md").write_text(markdown, encoding="utf-8")
    return final / "report.md", g
