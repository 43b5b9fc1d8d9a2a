"""homoexport.reporting.report: reading glue reports in the shapes we expect, bench tables and plots, the Pareto
front, and ``homoexport report`` gathering whatever the run directories hold into report.md."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from homoexport.cli import app
from homoexport.deployment.bench import SCHEMA
from homoexport.reporting import report

MACHINE = {"id": "abc", "cpu_model": "Test CPU", "arch": "x86_64", "isa": ["avx2"], "physical_cores": 4, "os": "Linux", "versions": {"onnxruntime": "1.31.1"}}


def glue_report(task: str, pytorch: float, int8: float | None) -> dict:
    """A glue_report.json as ``homoexport glue`` writes it (points, one row per split x metric)."""
    row = {"task": task, "split": "validation", "metric": "accuracy", "primary": True, "pytorch": pytorch, "pytorch_std": None,
           "onnx_fp32": pytorch, "onnx_int8": int8, "int8_delta": None if int8 is None else int8 - pytorch, "per_seed": {"pytorch": [pytorch]}}
    f1 = dict(row, metric="f1", primary=False, pytorch=pytorch - 1, onnx_fp32=pytorch - 1, onnx_int8=None)
    return {"schema": "homoexport.glue_report/1", "units": "metric values are points (metric x 100)", "results": [row, f1], "machine": MACHINE}


def bench_report(model: str, p50s: dict[tuple[int, int], float]) -> dict:
    """A bench.json with entries (batch, seq) -> p50 at 4 threads."""
    results = [
        {"model": model, "batch": b, "seq": s, "threads": 4, "seq_dist": "fixed", "p50_ms": v, "p90_ms": v * 1.1, "p99_ms": v * 1.3,
         "mean_ms": v * 1.05, "std_ms": 0.1, "min_ms": v * 0.9, "max_ms": v * 1.5, "n": 50, "throughput_per_s": b * 1000 / v}
        for (b, s), v in p50s.items()
    ]
    models = {model: {"path": f"/x/{model}.onnx", "file_mb": 12.5, "load_ms": 80.0, "peak_rss_mb": 120.0, "session_rss_mb": 60.0, "inputs": "random ids"}}
    return {"schema": SCHEMA, "machine": MACHINE, "settings": {}, "models": models, "results": results, "accuracy": []}


def write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


# ----------------------------------------------------------------------------------------- glue


def test_read_glue_homoexport_format(tmp_path: Path):
    rows = report.read_glue(write_json(tmp_path / "glue_report.json", glue_report("sst2", 91.0, 90.5)))
    by = {(r["metric"], r["variant"]): r for r in rows}
    assert set(by) == {("accuracy", "pytorch"), ("accuracy", "onnx_fp32"), ("accuracy", "onnx_int8"), ("f1", "pytorch"), ("f1", "onnx_fp32")}
    assert by[("accuracy", "onnx_int8")] == {"task": "sst2", "split": "validation", "metric": "accuracy", "variant": "onnx_int8", "value": 90.5, "primary": True}
    assert by[("f1", "pytorch")]["primary"] is False  # None values (f1 int8) are skipped, not zero


def test_read_glue_tolerated_shapes(tmp_path: Path):
    fractions = [{"task": "rte", "metric_name": "accuracy", "values": {"pytorch": 0.7, "onnx_int8": 0.69}}]
    rows = report.read_glue(write_json(tmp_path / "a.json", fractions))
    assert [(r["variant"], round(r["value"], 6)) for r in rows] == [("pytorch", 70.0), ("onnx_int8", 69.0)]
    nested = {"tasks": {"cola": {"metrics": {"mcc": {"pytorch": 40.0, "onnx_int8": 38.0}}}}}
    rows = report.read_glue(write_json(tmp_path / "b.json", nested))
    assert [(r["task"], r["metric"], r["variant"], r["split"]) for r in rows] == [("cola", "mcc", "pytorch", ""), ("cola", "mcc", "onnx_int8", "")]
    # A report in points with values near zero is not rescaled.
    near_zero = {"units": "points", "results": [{"task": "cola", "metric": "mcc", "pytorch": 0.5}]}
    assert report.read_glue(write_json(tmp_path / "c.json", near_zero))[0]["value"] == 0.5
    assert report.read_glue(write_json(tmp_path / "d.json", {"something": "else"})) == []


def test_find_glue_reports(tmp_path: Path):
    write_json(tmp_path / "runs" / "glue" / "glue_report.json", glue_report("sst2", 90.0, 89.0))
    write_json(tmp_path / "export" / "glue_report.json", glue_report("mrpc", 85.0, 84.0))
    found = report.find_glue_reports([str(tmp_path / "runs" / "glue"), f"mine={tmp_path / 'runs' / 'glue' / 'glue_report.json'}"], [tmp_path / "export", tmp_path])
    assert [label for label, _ in found] == ["glue", "mine", "export"]
    with pytest.raises(FileNotFoundError, match="glue report not found"):
        report.find_glue_reports([str(tmp_path / "nowhere")])


# ------------------------------------------------------------------------------------------ bench


def test_bench_markdown_and_plots(tmp_path: Path):
    r = bench_report("student/model_quantized", {(1, 32): 1.0, (1, 128): 2.0, (8, 32): 4.0, (8, 128): 9.0})
    md = report.bench_markdown(r)
    assert "`abc`: Test CPU (4 cores, ISA avx2)" in md
    assert "| student/model_quantized | 12.50 | 80.0 | 120.0 | 60.0 | random ids |" in md
    assert "| student/model_quantized | 4 | 8 | 128 | 9.000 | 9.900 | 11.700 |" in md
    written = report.plot_latency(r, tmp_path / "plots")
    assert [p.name for p in written] == ["latency_student_model_quantized.png", "latency_models.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in written)


# ---------------------------------------------------------------------------------------- report


def test_pareto_front(tmp_path: Path):
    runs = {"a": (90.0, 10.0), "b": (85.0, 5.0), "c": (80.0, 8.0)}  # c is slower and less accurate than b
    for name, (score, p50) in runs.items():
        write_json(tmp_path / name / "glue" / "glue_report.json", glue_report("sst2", score + 1, score))
        write_json(tmp_path / name / "bench.json", bench_report(f"{name}/m", {(1, 128): p50, (8, 128): p50 * 4, (1, 32): p50 / 3}))
    points = {p["run"]: p for p in report.pareto_points(report.gather([tmp_path / n for n in runs]))}
    assert {k: p["pareto"] for k, p in points.items()} == {"a": True, "b": True, "c": False}
    assert points["a"]["score"] == 90.0 and points["a"]["variant"] == "onnx_int8"  # primary metric only
    assert (points["b"]["p50_ms"], points["b"]["batch"], points["b"]["seq"]) == (5.0, 1, 128)


def test_width_history_from_train_log(tmp_path: Path):
    log = tmp_path / "train_log.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0, "widths": {"hidden": 384 - 32 * s, "heads": 12, "head_dim": 32, "ffn": 1536 - 128 * s}}) for s in range(4)]
    log.write_text("\n".join([json.dumps({"step": 0, "loss": 2.0}), *lines, '{"step": 9, "wid']))  # torn last line
    history = report.width_history(report.read_jsonl(log))
    assert [p["step"] for p in history] == [0, 1, 2, 3]
    assert history[-1] == {"step": 3.0, "hidden": 288.0, "heads": 12.0, "head_dim": 32.0, "ffn": 1152.0}
    assert report.width_history({"history": [{"step": 1, "ratio": 0.5}]}) == [{"step": 1.0, "ratio": 0.5}]
    assert report.width_history({"recipe": "x"}) == []


def make_runs(root: Path) -> list[Path]:
    """'small' has every report (distill with a train log, export, glue, bench); 'tiny' glue + bench and a
    broken export report."""
    small, tiny = root / "small", root / "tiny"
    write_json(small / "report.json", {"recipe": "homobert-small", "student": {"params": 17_300_000, "hidden": 256}, "machine": MACHINE})
    (small / "train_log.jsonl").write_text("\n".join(json.dumps({"step": s, "widths": {"hidden": 384 - 64 * s, "ffn": 1536 - 256 * s}}) for s in range(3)))
    write_json(small / "export" / "export_report.json", {
        "deployed_file": "model_quantized.onnx", "files": {"model.onnx": 90 * 2**20, "model_quantized.onnx": 23 * 2**20},
        "latency_ms": {"batch": 1, "seq": 128, "by_file": {"model.onnx": {"p50_ms": 9.0}, "model_quantized.onnx": {"p50_ms": 4.0}}},
        "parity": {"max_abs_diff": 1e-5, "passed": True}, "machine": MACHINE,
    })
    write_json(small / "glue" / "glue_report.json", glue_report("sst2", 90.0, 89.5))
    write_json(small / "bench.json", bench_report("export/model_quantized", {(1, 128): 4.0}))
    write_json(tiny / "glue" / "glue_report.json", glue_report("sst2", 85.0, 84.0))
    gated = bench_report("export/model_quantized", {(1, 128): 2.0}) | {"comparison": {"baseline": "base.json", "exit_code": 1, "diffs": [{"status": "regressed"}, {"status": "ok"}]}}
    write_json(tiny / "bench.json", gated)
    (tiny / "export").mkdir()
    (tiny / "export" / "export_report.json").write_text("{not json")
    write_json(tiny / ".export.partial" / "export_report.json", {"half": "written"})  # staging dirs are ignored
    return [small, tiny]


def test_write_report(tmp_path: Path):
    runs = make_runs(tmp_path / "runs")
    path, gathered = report.write_report(runs, tmp_path / "out")
    md = path.read_text()
    assert [len(gathered.found[k]) for k in ("distill", "export", "glue", "bench")] == [1, 1, 2, 2]
    for heading in ("## Accuracy vs latency", "## Distillation", "## Export", "## GLUE accuracy", "## Latency and memory", "## Problems"):
        assert heading in md
    assert "| model_quantized.onnx | 23.00 | 4.000 | yes |" in md
    assert "| small | sst2 (validation) | accuracy | 90.00 | 90.00 | 89.50 | -0.50 |" in md
    assert "Widths at step 2: hidden 256, ffn 1024." in md
    assert "Gate against `base.json`: exit 1, 1 entries regressed or missing." in md
    assert "export_report.json: unreadable" in md and "half" not in md
    assert "'machine'" not in md and "machine." not in md  # bulky fields are left out
    for image in ("pareto.png", "widths_small.png", "bench0_small/latency_export_model_quantized.png"):
        assert (tmp_path / "out" / image).is_file() and f"]({image})" in md
    with pytest.raises(FileExistsError, match="--overwrite"):
        report.write_report(runs, tmp_path / "out")


def test_report_skips_missing_sections(tmp_path: Path):
    run = tmp_path / "only-bench"
    write_json(run / "bench.json", bench_report("m/model", {(1, 128): 2.0}))
    md = report.write_report([run], tmp_path / "out")[0].read_text()
    assert "_No report.json found in these runs; section skipped._" in md
    assert "_No glue_report.json found in these runs; section skipped._" in md
    assert "## Accuracy vs latency" not in md  # no accuracy: no Pareto
    with pytest.raises(FileNotFoundError, match="no reports"):
        report.write_report([tmp_path / "out"], tmp_path / "out2")


def test_report_command(tmp_path: Path):
    runs = make_runs(tmp_path / "runs")
    r = CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.md").is_file()
    again = CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "rep")])
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert CliRunner().invoke(app, ["report", *map(str, runs), "--out", str(tmp_path / "rep"), "--overwrite"]).exit_code == 0
    assert CliRunner().invoke(app, ["report", str(tmp_path / "missing")]).exit_code == 2


def test_a_file_under_two_given_directories_is_reported_once(tmp_path: Path):
    run = tmp_path / "run"
    write_json(run / "export" / "export_report.json", {"files": {"model.onnx": 1024}, "deployed_file": "model.onnx"})
    g = report.gather([run, run / "export"])
    assert [(f.run, f.path.name) for f in g.found["export"]] == [("export", "export_report.json")]


def test_report_and_bench_default_outputs_land_where_report_finds_them(tmp_path: Path):
    runs = make_runs(tmp_path / "runs")
    first = CliRunner().invoke(app, ["report", *map(str, runs)])
    assert first.exit_code == 0, first.output
    assert (runs[0] / "report" / "report.md").is_file()
    again = CliRunner().invoke(app, ["report", *map(str, runs)])  # the default output is rewritten, not refused
    assert again.exit_code == 0, again.output
