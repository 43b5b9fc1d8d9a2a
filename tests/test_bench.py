"""homoexport.deployment.bench: percentile math, measurement on a tiny ONNX BERT, realistic inputs, the compare
logic and its exit codes, and that the measuring path never imports torch."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import make_model, make_tokenizer, random_batch
from typer.testing import CliRunner

from homoexport.cli import app
from homoexport.deployment import bench

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    """An export-like directory: tiny BERT as model.onnx, with config.json and tokenizer files."""
    d = tmp_path_factory.mktemp("export")
    tok = make_tokenizer(d)
    model = make_model("base", vocab_size=len(tok))
    model.config.save_pretrained(d)
    b = random_batch(model.config.vocab_size)
    with torch.no_grad():
        torch.onnx.export(
            model,
            tuple(b[k] for k in INPUT_NAMES),
            str(d / "model.onnx"),
            input_names=INPUT_NAMES,
            output_names=["last_hidden_state"],
            dynamic_axes={k: {0: "batch", 1: "seq"} for k in INPUT_NAMES},
            dynamo=False,
        )
    return d


@pytest.fixture(scope="session")
def onnx_path(export_dir: Path) -> Path:
    return export_dir / "model.onnx"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


# ------------------------------------------------------------------------------------------ the math


def test_percentiles_known_samples():
    s = bench.percentiles(list(range(1, 101)))  # 1..100
    assert s["mean"] == pytest.approx(50.5)
    assert s["p50"] == pytest.approx(50.5)
    assert s["p90"] == pytest.approx(90.1)  # linear interpolation: 1 + 0.9 * 99
    assert s["p99"] == pytest.approx(99.01)
    assert s["std"] == pytest.approx(np.sqrt(100 * 101 / 12))  # sample std of 1..n = sqrt(n(n+1)/12)
    assert (s["min"], s["max"]) == (1.0, 100.0)


def test_percentiles_single_sample_and_unsorted():
    assert bench.percentiles([3.0]) == {"mean": 3.0, "p50": 3.0, "p90": 3.0, "p99": 3.0, "std": 0.0, "min": 3.0, "max": 3.0}
    assert bench.percentiles([5, 1, 3])["p50"] == 3.0
    with pytest.raises(ValueError, match="non-empty"):
        bench.percentiles([])


def test_parse_options():
    assert bench.parse_int_list("1, 8,32", "--batch") == (1, 8, 32)
    with pytest.raises(ValueError, match="--batch"):
        bench.parse_int_list("1,x", "--batch")
    with pytest.raises(ValueError, match="--seq"):
        bench.parse_int_list("0", "--seq")
    assert bench.parse_threads("1,all") == (1, bench.physical_cores())
    assert bench.parse_fraction("10%") == pytest.approx(0.10)
    assert bench.parse_fraction("0.25") == pytest.approx(0.25)
    for bad in ("10", "ten%", "-5%"):
        with pytest.raises(ValueError, match="10% or 0.1"):
            bench.parse_fraction(bad)


# ------------------------------------------------------------------------------------- measurement


def test_measure_latency_fields(onnx_path: Path):
    stats = bench.measure_latency(onnx_path, batch=2, seq=16, threads=1, warmup=2, repeats=7)
    assert (stats.n, stats.batch, stats.seq, stats.threads) == (7, 2, 16, 1)
    assert 0 < stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms <= stats.max_ms
    assert stats.throughput_per_s == pytest.approx(2 * 1000 / stats.mean_ms)
    assert set(stats.to_dict()) >= {"mean_ms", "p50_ms", "p90_ms", "p99_ms", "std_ms", "n", "throughput_per_s"}


def test_measure_latency_duration_and_errors(onnx_path: Path):
    stats = bench.measure_latency(onnx_path, batch=1, seq=8, threads=1, warmup=0, duration_s=0.05)
    assert stats.n >= 1
    with pytest.raises(FileNotFoundError, match="nowhere.onnx"):
        bench.measure_latency(onnx_path.parent / "nowhere.onnx")
    with pytest.raises(ValueError, match="batch and seq"):
        bench.measure_latency(onnx_path, batch=0)


def test_random_ids_respect_vocabulary(onnx_path: Path):
    rng = np.random.default_rng(0)
    assert bench.vocab_size_near(onnx_path) == json.loads((onnx_path.parent / "config.json").read_text())["vocab_size"]
    big = bench.random_token_ids(4, 64, 30522, rng)
    assert big.min() >= bench.LOW_ID and big.max() < 30522
    small = bench.random_token_ids(4, 64, 60, rng)
    assert small.min() >= 1 and small.max() < 60
    assert bench.random_token_ids(2, 8, None, rng).max() < bench.SAFE_VOCAB


def test_footprint_in_subprocess(onnx_path: Path):
    fp = bench.measure_footprint(onnx_path, batch=2, seq=16, threads=1)
    assert fp.load_ms > 0
    assert 0 < fp.session_rss_mb < fp.peak_rss_mb
    assert (fp.batch, fp.seq, fp.threads) == (2, 16, 1)
    assert bench.file_size_bytes(onnx_path) == onnx_path.stat().st_size


# ---------------------------------------------------------------------------------- realistic inputs


def test_token_source_whole_words(export_dir: Path):
    src = bench.load_token_source(export_dir / "tokenizer.json")
    vocab = json.loads((export_dir / "tokenizer.json").read_text())["model"]["vocab"]
    cls, sep = vocab["[CLS]"], vocab["[SEP]"]
    assert (src.prefix, src.suffix, src.pad_id) == ([cls], [sep], vocab["[PAD]"])
    words = {i for t, i in vocab.items() if t.isalpha()}
    assert set(src.stream.tolist()) == words


def test_make_batches_fixed_and_uniform(export_dir: Path, onnx_path: Path):
    src = bench.load_token_source(export_dir / "tokenizer.json")
    sess = bench.load_session(onnx_path, 1)
    fixed = bench.make_batches(sess, batch=3, seq=12, source=src, n=2)
    ids, mask = fixed[0]["input_ids"], fixed[0]["attention_mask"]
    assert ids.shape == (3, 12) and mask.all()
    assert (ids[:, 0] == src.prefix[0]).all() and (ids[:, -1] == src.suffix[0]).all()
    assert not fixed[0]["token_type_ids"].any()
    for feed in bench.make_batches(sess, batch=4, seq=20, seq_dist="uniform", source=src, n=8, seed=1):
        ids, mask = feed["input_ids"], feed["attention_mask"]
        lengths = mask.sum(1)
        assert ids.shape[1] == lengths.max() <= 20 and lengths.min() >= 3  # padded to the batch's longest
        for row, n in zip(ids, lengths):
            assert row[0] == src.prefix[0] and row[n - 1] == src.suffix[0] and (row[n:] == src.pad_id).all()


def test_make_batches_from_text(export_dir: Path, onnx_path: Path, tmp_path: Path):
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat.\n\nthe dog ran.\na very very very very very very long sad boring movie plot\n")
    src = bench.load_token_source(export_dir / "tokenizer.json", text)
    assert len(src.lines) == 3
    sess = bench.load_session(onnx_path, 1)
    natural = {len(line) + 2 for line in src.lines}
    for feed in bench.make_batches(sess, batch=2, seq=64, seq_dist="text", source=src, n=6):
        assert set(feed["attention_mask"].sum(1).tolist()) <= natural
    capped = bench.make_batches(sess, batch=2, seq=6, seq_dist="text", source=src, n=6)
    assert all(f["attention_mask"].sum(1).max() <= 6 for f in capped)
    with pytest.raises(ValueError, match="--text|text file"):
        bench.make_batches(sess, batch=1, seq=8, seq_dist="text", source=None)


def test_resolve_targets(export_dir: Path, onnx_path: Path, tmp_path: Path):
    [t] = bench.resolve_targets([str(export_dir)])
    assert t.name == f"{export_dir.name}/model" and t.path == onnx_path
    assert bench.resolve_targets([f"student={export_dir}"])[0].name == "student/model"
    assert bench.resolve_targets([f"s={onnx_path}"])[0].name == "s"
    with pytest.raises(ValueError, match="NAME=PATH"):
        bench.resolve_targets([str(export_dir), str(onnx_path)])
    with pytest.raises(FileNotFoundError, match="missing.onnx"):
        bench.resolve_targets([str(tmp_path / "missing.onnx")])
    with pytest.raises(FileNotFoundError, match="no \\*.onnx"):
        bench.resolve_targets([str(tmp_path)])


def test_settings_validation(tmp_path: Path):
    with pytest.raises(ValueError, match="seq-dist"):
        bench.BenchSettings(seq_dist="gaussian")
    with pytest.raises(ValueError, match="--text"):
        bench.BenchSettings(seq_dist="text")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        bench.BenchSettings(text=tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------- compare logic


MACHINE = {"id": "abc", "cpu_model": "Test CPU", "arch": "x86_64", "isa": ["avx2"], "physical_cores": 4, "versions": {"onnxruntime": "1.31.1"}}


def fake_report(p50s: dict[tuple[str, int], float], accuracy: dict[str, float] | None = None, machine=MACHINE) -> dict:
    """A bench report with entries (model, batch) -> p50 at seq 128, 4 threads."""
    results = [
        {"model": m, "batch": b, "seq": 128, "threads": 4, "seq_dist": "fixed", "p50_ms": v, "p90_ms": v * 1.1, "p99_ms": v * 1.2, "mean_ms": v}
        for (m, b), v in p50s.items()
    ]
    acc = [{"source": "glue", "task": t, "split": "validation", "metric": "accuracy", "variant": "onnx_int8", "value": v} for t, v in (accuracy or {}).items()]
    return {"schema": bench.SCHEMA, "machine": copy.deepcopy(machine), "results": results, "accuracy": acc}


BASE = {("export/model_quantized", 1): 10.0, ("export/model_quantized", 8): 40.0}


def test_compare_pass_within_limit():
    c = bench.compare_reports(fake_report({k: v * 1.09 for k, v in BASE.items()}), fake_report(BASE), max_regression=0.10)
    assert c.exit_code == bench.EXIT_OK
    assert [d.status for d in c.diffs] == ["ok", "ok"]
    assert c.diffs[0].change == pytest.approx(0.09)
    assert "PASS" in c.to_markdown()


def test_compare_regression():
    current = dict(BASE) | {("export/model_quantized", 8): 48.0}  # +20%
    c = bench.compare_reports(fake_report(current), fake_report(BASE), max_regression=0.10)
    assert c.exit_code == bench.EXIT_REGRESSION
    [bad] = [d for d in c.diffs if d.status == "regressed"]
    assert bad.key == "export/model_quantized b=8 s=128 t=4 fixed" and bad.change == pytest.approx(0.20)
    md = c.to_markdown()
    assert "FAIL: regression" in md and "REGRESSED" in md and "+20.0%" in md
    assert bench.compare_reports(fake_report(current), fake_report(BASE), max_regression=0.25).exit_code == bench.EXIT_OK


def test_compare_other_metric_and_improvement():
    current = {k: v * 0.5 for k, v in BASE.items()}
    c = bench.compare_reports(fake_report(current), fake_report(BASE), metric="p99_ms")
    assert c.exit_code == bench.EXIT_OK and {d.status for d in c.diffs} == {"improved"}
    with pytest.raises(ValueError, match="p50_ms"):
        bench.compare_reports(fake_report(current), fake_report(BASE), metric="p42")


def test_compare_missing_and_new_entries():
    current = {("export/model_quantized", 1): 10.0, ("export/model_optimized", 1): 12.0}
    c = bench.compare_reports(fake_report(current), fake_report(BASE))
    assert c.exit_code == bench.EXIT_MISSING
    status = {d.key: d.status for d in c.diffs}
    assert status["export/model_quantized b=8 s=128 t=4 fixed"] == "missing"
    assert status["export/model_optimized b=1 s=128 t=4 fixed"] == "new"  # new entries never fail
    assert "FAIL: missing entries" in c.to_markdown()


def test_regression_wins_over_missing():
    current = {("export/model_quantized", 1): 20.0}
    assert bench.compare_reports(fake_report(current), fake_report(BASE)).exit_code == bench.EXIT_REGRESSION


def test_compare_machine_mismatch():
    other = copy.deepcopy(MACHINE) | {"cpu_model": "Other CPU", "id": "zzz"}
    slower = {k: v * 3 for k, v in BASE.items()}
    c = bench.compare_reports(fake_report(slower, machine=other), fake_report(BASE))
    assert c.exit_code == bench.EXIT_MACHINE and not c.latency_compared and c.diffs == []
    assert c.machine_differences == ["cpu_model: Test CPU -> Other CPU"]
    assert "NOT compared" in c.to_markdown()
    forced = bench.compare_reports(fake_report(slower, machine=other), fake_report(BASE), allow_machine_mismatch=True)
    assert forced.exit_code == bench.EXIT_REGRESSION and "compared anyway" in forced.to_markdown()


def test_onnxruntime_upgrade_is_a_machine_difference():
    upgraded = copy.deepcopy(MACHINE)
    upgraded["versions"]["onnxruntime"] = "1.32.0"
    assert bench.machine_differences(upgraded, MACHINE) == ["onnxruntime: 1.31.1 -> 1.32.0"]


def test_compare_accuracy_gate():
    base = fake_report(BASE, {"sst2": 91.0, "mrpc": 85.0})
    ok = bench.compare_reports(fake_report(BASE, {"sst2": 90.6, "mrpc": 85.5}), base, max_accuracy_drop=0.5)
    assert ok.exit_code == bench.EXIT_OK
    dropped = bench.compare_reports(fake_report(BASE, {"sst2": 90.0, "mrpc": 85.0}), base, max_accuracy_drop=0.5)
    assert dropped.exit_code == bench.EXIT_REGRESSION
    [bad] = [d for d in dropped.diffs if d.status == "regressed"]
    assert bad.kind == "accuracy" and bad.key == "glue:sst2[validation]/accuracy/onnx_int8" and bad.change == pytest.approx(1.0)
    assert "-1.00 pts" in dropped.to_markdown()
    missing = bench.compare_reports(fake_report(BASE, {"sst2": 91.0}), base, max_accuracy_drop=0.5)
    assert missing.exit_code == bench.EXIT_MISSING
    # Without --max-accuracy-drop accuracy is not gated; and accuracy is gated even across machines.
    assert bench.compare_reports(fake_report(BASE, {"sst2": 50.0}), base).exit_code == bench.EXIT_OK
    other = copy.deepcopy(MACHINE) | {"physical_cores": 8}
    across = bench.compare_reports(fake_report(BASE, {"sst2": 80.0, "mrpc": 85.0}, machine=other), base, max_accuracy_drop=0.5)
    assert across.exit_code == bench.EXIT_REGRESSION and not across.latency_compared


def test_accuracy_gate_on_onnx_files_alone_leaves_the_pytorch_reference_unscored():
    """A baseline scored from the PyTorch model and its export, a run that scored the shipped files alone
    (``homoexport score EXPORT_DIR``): the PyTorch entries are not a failure, the ONNX ones are still gated."""
    base = fake_report(BASE, {"sst2": 91.0, "mrpc": 85.0})
    base["accuracy"] += [{**r, "variant": "pytorch", "value": r["value"] + 0.2} for r in base["accuracy"]]
    onnx_only = bench.compare_reports(fake_report(BASE, {"sst2": 90.8, "mrpc": 85.0}), base, max_accuracy_drop=0.5)
    assert onnx_only.exit_code == bench.EXIT_OK
    assert sorted(d.key for d in onnx_only.diffs if d.status == "unscored") == ["glue:mrpc[validation]/accuracy/pytorch",
                                                                               "glue:sst2[validation]/accuracy/pytorch"]
    assert "this run scored the ONNX files only" in onnx_only.to_markdown()
    assert bench.compare_reports(fake_report(BASE, {"sst2": 90.0, "mrpc": 85.0}), base, max_accuracy_drop=0.5).exit_code == bench.EXIT_REGRESSION
    # A task the run did not score at all is still missing, PyTorch entry included.
    dropped_task = bench.compare_reports(fake_report(BASE, {"sst2": 91.0}), base, max_accuracy_drop=0.5)
    assert dropped_task.exit_code == bench.EXIT_MISSING
    assert {d.key: d.status for d in dropped_task.diffs}["glue:mrpc[validation]/accuracy/pytorch"] == "missing"
    # A run that scored PyTorch but lost one score, or a baseline with PyTorch scores alone: nothing to compare, missing.
    partial = fake_report(BASE, {"sst2": 91.0, "mrpc": 85.0})
    partial["accuracy"].append({**partial["accuracy"][0], "variant": "pytorch"})
    assert {d.key: d.status for d in bench.compare_reports(partial, base, max_accuracy_drop=0.5).diffs}[
        "glue:mrpc[validation]/accuracy/pytorch"] == "missing"
    pytorch_only = {**base, "accuracy": [r for r in base["accuracy"] if r["variant"] == "pytorch"]}
    assert bench.compare_reports(fake_report(BASE, {"sst2": 20.0, "mrpc": 20.0}), pytorch_only, max_accuracy_drop=0.5).exit_code == bench.EXIT_MISSING


def test_load_report_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="baseline not found"):
        bench.load_report(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        bench.load_report(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"results": []}')
    with pytest.raises(ValueError, match="not a homoexport bench report"):
        bench.load_report(tmp_path / "other.json")


# ----------------------------------------------------------------------------------- CLI exit codes


def cli_bench(*args: str):
    return CliRunner().invoke(app, ["bench", "--batch", "1,2", "--seq", "8", "--threads", "1", "--warmup", "1", "--repeats", "3", *args])


def test_cli_bench_report_and_exit_codes(export_dir: Path, tmp_path: Path):
    base_path = tmp_path / "base.json"
    r = cli_bench(f"tiny={export_dir}", "--out", str(base_path), "--plot", str(tmp_path / "plots"))
    assert r.exit_code == 0, r.output
    assert "| tiny/model | 1 | 2 | 8 |" in r.output  # the markdown table on stdout
    report = json.loads(base_path.read_text())
    assert report["schema"] == bench.SCHEMA and report["machine"]["id"]
    assert [(e["model"], e["batch"], e["seq"], e["threads"]) for e in report["results"]] == [("tiny/model", 1, 8, 1), ("tiny/model", 2, 8, 1)]
    info = report["models"]["tiny/model"]
    assert info["file_bytes"] > 0 and info["peak_rss_mb"] > 0 and info["load_ms"] > 0 and "tokenizer.json" in info["inputs"]
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["latency_models.png", "latency_tiny_model.png"]

    # Stored baselines (their model files gone, so figures are compared, probe-normalized), derived from the
    # measured one: the same numbers but 1000x faster -> regression (1); an extra entry -> missing (3);
    # another machine -> 4. The limit is 10% against the 1000x faster baseline and loose otherwise, so
    # timing noise cannot change the outcome.
    report["models"]["tiny/model"]["path"] = str(tmp_path / "gone.onnx")
    fast = copy.deepcopy(report)
    for e in fast["results"]:
        e["p50_ms"] /= 1000
    extra = copy.deepcopy(report)
    extra["results"].append(dict(report["results"][0], batch=64))
    elsewhere = copy.deepcopy(report)
    elsewhere["machine"]["cpu_model"] = "Some Other CPU"
    for name, baseline, limit, code in (("fast", fast, "10%", 1), ("extra", extra, "10000%", 3), ("elsewhere", elsewhere, "10%", 4)):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(baseline))
        r = cli_bench(f"tiny={export_dir}", "--compare", str(path), "--max-regression", limit)
        assert r.exit_code == code, (name, r.output)
        assert {1: "REGRESSED", 3: "MISSING", 4: "cpu_model: Some Other CPU"}[code] in r.output

    # Usage errors exit 2 before anything is measured.
    assert cli_bench(str(export_dir / "nope.onnx")).exit_code == 2
    assert cli_bench(str(export_dir), "--max-regression", "10").exit_code == 2
    assert cli_bench(str(export_dir), "--compare", str(tmp_path / "none.json")).exit_code == 2
    assert cli_bench(str(export_dir), "--duration", "1").exit_code == 2  # --repeats given too


# ----------------------------------------------------------------------------------------- no torch

NO_TORCH = "import sys\nfor m in ('torch', 'transformers', 'optimum'):\n    sys.modules[m] = None  # any import of them now fails\n"


def test_bench_module_imports_no_torch():
    r = run_python("import homoexport.deployment.bench, homoexport.reporting.report, sys; assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    assert r.returncode == 0, r.stderr


def test_measurement_runs_without_torch(onnx_path: Path):
    code = NO_TORCH + (
        "from homoexport.deployment.bench import measure_latency, measure_footprint\n"
        f"s = measure_latency({str(onnx_path)!r}, batch=1, seq=8, threads=1, warmup=1, repeats=2)\n"
        f"f = measure_footprint({str(onnx_path)!r}, 1, 8, 1)\n"
        "assert s.n == 2 and f.peak_rss_mb > 0\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr


def test_bench_command_runs_without_torch(export_dir: Path, tmp_path: Path):
    code = NO_TORCH + (
        "from homoexport.cli import app\n"
        f"app(['bench', {str(export_dir)!r}, '--seq', '8', '--threads', '1', '--repeats', '2', '--out', {str(tmp_path / 'b.json')!r}])\n"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["n"] == 2


def test_corrupt_onnx_is_one_line(tmp_path: Path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"this is not a protobuf")
    result = CliRunner().invoke(app, ["bench", str(bad), "--repeats", "2"])
    assert result.exit_code == 2 and "cannot load ONNX model" in " ".join(result.output.split()) and "Traceback" not in result.output


def test_bench_of_a_directory_writes_its_json_there_by_default(export_dir: Path):
    (export_dir / "bench.json").unlink(missing_ok=True)
    result = cli_bench(str(export_dir))
    assert result.exit_code == 0, result.output
    data = json.loads((export_dir / "bench.json").read_text())
    assert data["schema"] == "homoexport.bench/1" and data["results"]


def _trivial_onnx(path: Path) -> Path:
    """A graph with the encoder's inputs that does almost nothing: a much faster 'model' of the same name."""
    from onnx import TensorProto, helper, save

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"]) for n in ("input_ids", "attention_mask", "token_type_ids")]
    out = helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq"])
    graph = helper.make_graph([helper.make_node("Cast", ["input_ids"], ["last_hidden_state"], to=TensorProto.FLOAT)], "trivial", inputs, [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    save(model, str(path))
    return path


def test_compare_runs_baseline_and_candidate_side_by_side_when_the_files_exist(export_dir: Path, tmp_path: Path):
    base_path = tmp_path / "base.json"
    assert cli_bench(f"tiny={export_dir / 'model.onnx'}", "--out", str(base_path)).exit_code == 0
    same = cli_bench(f"tiny={export_dir / 'model.onnx'}", "--compare", str(base_path), "--max-regression", "50%")
    assert same.exit_code == 0 and "timed interleaved in this run" in " ".join(same.output.split()), same.output
    # The baseline file is a near-empty graph: the real model is many times slower than it, measured side by side.
    report = json.loads(base_path.read_text())
    report["models"]["tiny"]["path"] = str(_trivial_onnx(tmp_path / "trivial.onnx"))
    fast = tmp_path / "fast.json"
    fast.write_text(json.dumps(report))
    slower = cli_bench(f"tiny={export_dir / 'model.onnx'}", "--compare", str(fast), "--max-regression", "50%")
    assert slower.exit_code == 1 and "REGRESSED" in slower.output


def test_stored_comparison_is_normalized_by_the_calibration_probe():
    current = {"machine": {}, "probe_ms": {"start": 16.0, "end": 16.0}, "results": [{"model": "m", "batch": 1, "seq": 8, "threads": 1, "p50_ms": 2.0}]}
    baseline = {"machine": {}, "probe_ms": {"start": 8.0, "end": 8.0}, "results": [{"model": "m", "batch": 1, "seq": 8, "threads": 1, "p50_ms": 1.0}]}
    c = bench.compare_reports(current, baseline, max_regression=0.05)
    assert c.exit_code == bench.EXIT_OK and c.mode == "stored, probe-normalized"  # 2x slower on a machine running 2x slower
    unprobed = bench.compare_reports({**current, "probe_ms": None}, {**baseline, "probe_ms": None}, max_regression=0.05)
    assert unprobed.exit_code == bench.EXIT_REGRESSION and unprobed.mode == "stored"


def test_probes_of_another_workload_are_not_compared(caplog):
    """A baseline written with an older probe workload: its probe says nothing about today's machine speed."""
    result = [{"model": "m", "batch": 1, "seq": 8, "threads": 1, "p50_ms": 1.0}]
    current = {"machine": {}, "probe_ms": {"start": 16.0, "end": 16.0, "steady": True, "workload": bench.PROBE_WORKLOAD}, "results": result}
    baseline = {"machine": {}, "probe_ms": {"start": 8.0, "end": 8.0, "steady": True}, "results": result}
    with caplog.at_level("WARNING", logger="homoexport.deployment.bench"):
        c = bench.compare_reports(current, baseline, max_regression=0.05)
    assert c.mode == "stored" and c.exit_code == bench.EXIT_OK  # equal figures, not scaled by 8/16 into a false improvement
    assert "another workload" in caplog.text and bench.PROBE_WORKLOAD in caplog.text
    assert not bench.machine_busy(current, baseline)  # 2x the old probe's figure is no evidence of load
    assert bench.machine_busy({**current, "probe_ms": {**current["probe_ms"], "end": 30.0, "steady": False}}, baseline)  # load during the run still is
    same = {**baseline, "probe_ms": {**baseline["probe_ms"], "workload": bench.PROBE_WORKLOAD}}
    assert bench.compare_reports(current, same, max_regression=0.05).mode == "stored, probe-normalized"


def test_probe_graph_is_a_chain_of_encoder_like_blocks():
    import onnx

    model_bytes, feed = bench.probe_graph(blocks=3, rows=4, width=8, inner=16)
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["MatMul", "Relu", "MatMul", "Add", "LayerNormalization"] * 3
    assert feed["x"].shape == (4, 8)


def test_the_edge_measure_command_needs_no_torch():
    """`homoexport measure` runs on an edge box with onnxruntime and numpy only: its module imports without torch."""
    r = run_python(NO_TORCH + "import homoexport.deployment.budget as b\nassert callable(b.measure_candidates) and callable(b.calibration_probe)\n")
    assert r.returncode == 0, r.stderr


def test_machine_busy_reads_the_calibration_probes():
    quiet = {"probe_ms": {"start": 4.0, "end": 4.2, "steady": True}}
    assert not bench.machine_busy({"probe_ms": {"start": 4.3, "end": 4.1, "steady": True}}, quiet)
    assert bench.machine_busy({"probe_ms": {"start": 8.0, "end": 8.5, "steady": True}}, quiet)  # steady load, 2x slower
    assert bench.machine_busy({"probe_ms": {"start": 4.0, "end": 6.0, "steady": False}}, quiet)  # load came during the run
    assert not bench.machine_busy({"probe_ms": {"start": 3.0, "end": 3.1, "steady": True}}, quiet)  # faster than the baseline
    assert not bench.machine_busy({"probe_ms": None}, quiet)


def test_busy_side_by_side_compare_times_one_thread_under_the_entrys_key(export_dir: Path, monkeypatch):
    model = export_dir / "model.onnx"
    threads_seen = []
    real = bench.load_session
    monkeypatch.setattr(bench, "load_session", lambda path, threads=None, spinning=True: threads_seen.append((threads, spinning)) or real(path, threads, spinning))
    settings = bench.BenchSettings(batches=(1,), seqs=(8,), threads=(2,), repeats=6, warmup=1)
    ratios = bench.interleaved_ratios({"tiny": (model, model)}, settings, rounds=3, busy=True)
    assert list(ratios) == ["tiny b=1 s=8 t=2 fixed"] and 0.2 < ratios["tiny b=1 s=8 t=2 fixed"] < 5
    assert threads_seen == [(1, False), (1, False)]
    threads_seen.clear()
    bench.interleaved_ratios({"tiny": (model, model)}, settings, rounds=3)
    assert threads_seen == [(2, False), (2, False)]
