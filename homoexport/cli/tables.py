"""Rich tables of the library's reports, for the terminal (the library itself draws nothing)."""

from __future__ import annotations

from typing import Any, Mapping

from rich import box
from rich.table import Table

from homoexport.deployment.budget import MB
from homoexport.deployment.export import FP32_FILE, OPTIMIZED_FILE, QUANTIZED_FILE
from homoexport.evaluation.glue import report_rows, settings_line, suite_rows
from homoexport.reporting.report import TRADEOFF_COLUMNS, tradeoff_rows


def _grid(title: str, caption: str, header: list[str], rows: list[list[str]]) -> Table:
    """A table whose first column is a label and the others numbers."""
    table = Table(title=title, caption=caption)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def glue_table(report: dict[str, Any]) -> Table:
    """The run's rich table (metrics in points, mean ± std over seeds; dev-set forward latency)."""
    title = f"GLUE {report['task']} (dev)" if report["task"] != "custom" else f"{report['data'].get('path')} (dev)"
    return _grid(title, settings_line(report), *report_rows(report))


def glue_suite_table(suite: dict[str, Any]) -> Table:
    """The suite's rich table, columns in the GLUE paper's order."""
    return _grid("GLUE dev", suite["units"], *suite_rows(suite))


def export_table(report: dict[str, Any]) -> Table:
    """A rich Table summarising an export report: per file size, latency and parity, then the checks."""
    parity, latency = report["parity"], report["latency_ms"]["by_file"]
    check = {FP32_FILE: parity.get("onnx_fp32_vs_pytorch"), OPTIMIZED_FILE: parity.get("onnx_optimized_vs_pytorch"), QUANTIZED_FILE: parity.get("int8_vs_fp32")}
    table = Table(title=f"export {report['model_dir']} -> {report['export_dir']} ({report['task']})")
    for column in ("file", "MB", f"p50 ms (b1, s{report['latency_ms']['seq']})", "check", "deployed"):
        table.add_column(column, justify="right" if column not in ("file", "check") else "left")
    for name, size in report["files"].items():
        p50 = latency.get(name, {}).get("p50_ms")
        table.add_row(name, f"{size / 2**20:.1f}", "-" if p50 is None else f"{p50:.2f}", _check_text(check.get(name)), "yes" if name == report["deployed_file"] else "")
    fusion, quant = report["fusion"], report["quantization"]
    if "attention_nodes" in fusion:
        note = "" if fusion["all_layers_fused"] else f" ({fusion['reason']})"
        table.caption = f"{fusion['level']}: {fusion['attention_nodes']}/{fusion['layers']} layers with fused Attention{note}"
    if quant.get("mode", "none") != "none":
        caption = f"int8 {quant['mode']} {quant['schema']} for {quant['target']}, per-channel {quant['per_channel']}, order {quant['order']} ({quant['order_reason']})"
        kept = quant.get("kept_fp32") or {}
        if kept.get("nodes"):
            caption += f"; {len(kept['nodes'])} MatMuls kept fp32 ({', '.join(kept['groups'])})"
        table.caption = f"{table.caption}\n{caption}" if table.caption else caption
    inputs = report["validation_inputs"]
    checked = f"checks on {inputs['texts']} " + ("given inputs" if inputs.get("source") == "given" else "built-in texts (--validation-data: your own)")
    table.caption = f"{table.caption}\n{checked}" if table.caption else checked
    return table


def _check_text(entry: dict[str, Any] | None) -> str:
    if not entry:
        return ""
    if "cosine_min" in entry:
        return f"cosine vs fp32 min {entry['cosine_min']:.4f} / mean {entry['cosine_mean']:.4f}"
    if "agreement" in entry:
        return f"agreement vs fp32 {entry['agreement']:.1%}, max |diff| {entry['max_abs_diff']:.3g}"
    return f"max |diff| vs PyTorch {entry['max_abs_diff']:.2e} <= {entry['atol']:g}"


def plan_table(report: Mapping[str, Any]) -> Table:
    """A rich table of the candidates: shape, params, measured figures, fit; the chosen row in bold.

    Drawn without vertical rules, units in the caption and the rss column only when measured, so that it reads at 80 columns."""
    s = report["settings"]
    title = (f"plan for {report['budget']} ({report['statistic']}, batch {s['batch']}, seq {s['seq']}, {s['threads_resolved']} threads, "
             f"{s['precision']}, margin {report['margin']:.0%})")
    rows = [r for r in report["candidates"] if r["measurement"] or r["fits"] is not None]
    has_rss = any((r["measurement"] or {}).get("rss_mb") is not None for r in rows)
    table = Table(title=title, box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0),
                  caption="params, backbone (non-embedding): millions; p50, p90: ms; MB: the deployed file" + (", rss: peak MB" if has_rss else "")
                  + "; *: on its depth's params-vs-latency Pareto front")
    columns = ["shape", "params", "backbone", "p50", "p90", "MB", *(["rss"] if has_rss else []), "source", "fits"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("shape", "source") else "right", no_wrap=True)
    chosen = (report.get("chosen") or {}).get("name")
    front = {name for d in report.get("depths", []) for name in d["pareto"]}
    for r in rows:
        m = r["measurement"] or {}
        cells = [r["name"], f"{r['params'] / 1e6:.2f}", f"{r['backbone_params'] / 1e6:.2f}", _num(m.get("p50_ms")), _num(m.get("p90_ms")),
                 _num(m["file_bytes"] / MB if m else None, 1),
                 *([_num(m.get("rss_mb"), 0)] if has_rss else []), m.get("source", "-"),
                 {True: "yes", False: "no", None: "-"}[r["fits"]] + (" *" if r["name"] in front else "  ")]
        table.add_row(*cells, style="bold green" if r["name"] == chosen else None)
    return table


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def depth_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per searched depth (only when more than one was searched): its best fitting shape."""
    depths = report.get("depths", [])
    if len(depths) < 2:
        return []
    return [f"{d['layers']} layers: " + (f"best {d['best']} ({d['best_backbone_params'] / 1e6:.2f}M non-embedding params)" if d["best"]
                                         else "nothing fits") for d in depths] + [f"choice: {report['depth_rule']}"]


def tradeoff_table(selection: dict[str, Any]) -> Table:
    """The candidates table as a rich Table (width, parameters, sparsity, quality, score, choice)."""
    table = Table(title=f"teacher-assistant candidates (metric {selection['metric']}, λ={selection['lambda']})")
    for col in TRADEOFF_COLUMNS:
        table.add_column(col, justify="right")
    for cells in tradeoff_rows(selection):
        table.add_row(*cells)
    return table


def family_table(report: Mapping[str, Any]) -> Table:
    """A task run's students, widest first, beside its teacher: dev score in PyTorch and as int8 ONNX, the drop the
    int8 file shows, its latency (side by side, batch 1) and file size; the deployed one marked as the one that ships."""
    from homoexport.distillation.task import deployed_score

    metric, teacher = report["primary_metric"], report["teacher"]["dev"][report["primary_metric"]]
    deployed = (report.get("deployed") or {}).get("student")
    layers = report["student"]["layers"]
    table = Table(title=f"students of {report['recipe']}, {layers} layers (dev {metric}; teacher {teacher:.2f})")
    for col in ("hidden/heads/ffn", "params", "PyTorch", "int8", "drop", "p50 ms", "MB", "ships"):
        table.add_column(col, justify="left" if col.startswith("hidden") else "right", no_wrap=col.startswith("hidden"))
    for m in report["family"]:
        w, int8 = m["widths"], m.get("int8") or {}
        score = deployed_score(m, metric)
        table.add_row(f"{w['hidden']}/{w['heads']}/{w['ffn']}", f"{m['parameters'] / 1e6:.2f}M", _num(m["dev"][metric]),
                      _num(int8["dev"][metric]) if int8 else "-", _num(teacher - score), _num(int8.get("p50_ms")),
                      "-" if int8.get("file_mb") is None else f"{int8['file_mb']:.1f}", "yes" if m["path"] == deployed else "")
    return table
