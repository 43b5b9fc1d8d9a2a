"""GLUE readers, metrics, the fine-tune -> export -> score pipeline and its report, on tiny synthetic data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from datasets import Dataset, DatasetDict
from tiny import save_model_dir, synthetic_sentences
from typer.testing import CliRunner

from homoexport.cli import app
from homoexport.deployment.export import ExportSettings, export_model
from homoexport.evaluation import glue, glue_data
from homoexport.evaluation.glue import GlueSettings, aggregate_results, evaluate_onnx, evaluate_pytorch, load_classifier, run_glue, run_glue_suite
from homoexport.evaluation.glue_data import GLUE_ORDER, TASKS, GlueDataError, get_task, load_tsv, predictions, read_tsv, score

# --------------------------------------------------------------------------- synthetic GLUE files

MNLI_TRAIN_HEADER = "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse sentence1 sentence2 label1 gold_label"
MNLI_DEV_HEADER = "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse sentence2_parse sentence1 sentence2 label1 label2 label3 label4 label5 gold_label"


def _mnli_row(i: int, a: str, b: str, label: str, dev: bool) -> list[str]:
    votes = [label] * (5 if dev else 1)
    return [str(i), str(100 + i), f"{100 + i}e", "fiction", f"( {a} )", f"( {b} )", f"(ROOT {a})", f"(ROOT {b})", a, b, *votes, label]


def _rows(task: str, n: int, seed: int, dev: bool) -> tuple[list[str] | None, list[list[str]]]:
    """Header (None for CoLA) and rows of ``task`` in its original GLUE layout; every text has a quote."""
    a_s = [f'"{s}' for s in synthetic_sentences(n, seed=seed)]  # an unbalanced quote, as in MRPC/SST-2
    b_s = synthetic_sentences(n, seed=seed + 1)
    ab = "0 1".split()
    if task == "cola":
        return None, [["gj04", ab[i % 2], "*" if i % 2 == 0 else "", a] for i, a in enumerate(a_s)]
    if task == "sst2":
        return ["sentence", "label"], [[a, ab[i % 2]] for i, a in enumerate(a_s)]
    if task == "mrpc":
        return ["\ufeffQuality", "#1 ID", "#2 ID", "#1 String", "#2 String"], [[ab[i % 2], str(i), str(i + 7), a, b] for i, (a, b) in enumerate(zip(a_s, b_s))]
    if task == "qqp":
        return "id qid1 qid2 question1 question2 is_duplicate".split(), [[str(i), str(2 * i), str(2 * i + 1), a, b, ab[i % 2]] for i, (a, b) in enumerate(zip(a_s, b_s))]
    if task == "stsb":
        return (
            "index genre filename year old_index source1 source2 sentence1 sentence2 score".split(),
            [[str(i), "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", a, b, f"{(i % 11) / 2:.3f}"] for i, (a, b) in enumerate(zip(a_s, b_s))],
        )
    if task == "mnli":
        three = ("entailment", "neutral", "contradiction")
        return (MNLI_DEV_HEADER if dev else MNLI_TRAIN_HEADER).split(), [_mnli_row(i, a, b, three[i % 3], dev) for i, (a, b) in enumerate(zip(a_s, b_s))]
    two = {"qnli": ("entailment", "not_entailment"), "rte": ("entailment", "not_entailment"), "wnli": ("0", "1")}[task]
    first, second = ("question", "sentence") if task == "qnli" else ("sentence1", "sentence2")
    return ["index", first, second, "label"], [[str(i), a, b, two[i % 2]] for i, (a, b) in enumerate(zip(a_s, b_s))]


def write_task(data_dir: Path, task: str, n_train: int = 24, n_dev: int = 12) -> Path:
    """Write train + dev file(s) of ``task`` under ``data_dir/<Task>/`` as GLUE distributes them."""
    spec = TASKS[task]
    root = data_dir / spec.directory
    root.mkdir(parents=True, exist_ok=True)
    files = {"train.tsv": (n_train, 0, False)} | {name: (n_dev, 50 + 10 * i, True) for i, name in enumerate(spec.dev_files.values())}
    for name, (n, seed, dev) in files.items():
        header, rows = _rows(task, n, seed, dev)
        lines = ([ "\t".join(header)] if header else []) + ["\t".join(r) for r in rows]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data_dir


# ---------------------------------------------------------------------------------------- readers


@pytest.mark.parametrize("task", GLUE_ORDER)
def test_reader_reads_each_original_layout(tmp_path, task):
    spec = TASKS[task]
    data = load_tsv(spec, write_task(tmp_path, task))
    assert list(data) == ["train", *spec.dev_splits]
    assert len(data["train"]) == 24 and all(len(data[s]) == 12 for s in spec.dev_splits)
    pair = len(spec.text_columns) == 2
    assert data["train"].column_names == (["text_a", "text_b", "label"] if pair else ["text_a", "label"])
    assert data["train"][0]["text_a"] == '"' + synthetic_sentences(1, seed=0)[0]  # quotes kept verbatim: quoting is off
    if pair:
        assert data["train"][0]["text_b"] == synthetic_sentences(1, seed=1)[0]
    labels = data["train"]["label"]
    if spec.is_regression:
        assert data["train"].features["label"].dtype == "float32"
        assert labels[:3] == pytest.approx([0.0, 0.5, 1.0])
    else:
        assert data["train"].features["label"].dtype == "int64"
        assert list(labels[: spec.num_labels]) == list(range(spec.num_labels))  # raw labels map to hub class ids in order


def test_label_ids_match_the_hub():
    assert TASKS["mnli"].labels == ("entailment", "neutral", "contradiction")
    assert TASKS["wnli"].label_names == ("not_entailment", "entailment")
    assert TASKS["qnli"].label_names[0] == "entailment" and TASKS["rte"].label_names[1] == "not_entailment"
    assert TASKS["stsb"].num_labels == 1 and TASKS["mnli"].num_labels == 3
    assert get_task("SST-2") is TASKS["sst2"] and get_task("sts-b") is TASKS["stsb"]
    with pytest.raises(ValueError, match="unknown GLUE task 'squad'.*mnli, qqp"):
        get_task("squad")


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "task, lines, message",
    [
        ("sst2", ["sentence\tlabel", "good fun\t1", "bad\tfun\t0"], r"dev\.tsv:3: expected 2 tab-separated columns, found 3"),
        ("cola", ["gj04\t1\t\tfine", "gj04\t1\tshort"], r"dev\.tsv:2: expected 4 tab-separated columns, found 3"),
        ("mrpc", ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String", "2\t1\t2\ta\tb"], r"dev\.tsv:2: unknown label '2' for mrpc \(allowed: 0, 1\)"),
        ("rte", ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tneutral"], r"dev\.tsv:2: unknown label 'neutral' for rte"),
        ("stsb", ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore", "0\tg\tf\ty\to\ts\ts\ta\tb\thigh"], r"dev\.tsv:2: score 'high' is not a number"),
        ("qnli", ["index\tsentence\tquestion\tgold", "0\ta\tb\tentailment"], r"dev\.tsv:1: header has no column 'label'"),
    ],
)
def test_malformed_tsv_names_file_and_line(tmp_path, task, lines, message):
    path = _write(tmp_path / "dev.tsv", lines)
    with pytest.raises(GlueDataError, match=message) as err:
        read_tsv(TASKS[task], path)
    assert str(path) in str(err.value)


def test_missing_files_name_the_expected_layout(tmp_path):
    with pytest.raises(GlueDataError, match=r"MRPC: directory not found"):
        load_tsv(TASKS["mrpc"], tmp_path)
    (tmp_path / "MNLI").mkdir()
    _write(tmp_path / "MNLI" / "train.tsv", [MNLI_TRAIN_HEADER.replace(" ", "\t"), "\t".join(_mnli_row(0, "a", "b", "neutral", False))])
    with pytest.raises(GlueDataError, match=r"dev_matched\.tsv: file not found"):
        load_tsv(TASKS["mnli"], tmp_path)
    with pytest.raises(GlueDataError, match="no examples"):
        read_tsv(TASKS["sst2"], _write(tmp_path / "empty.tsv", ["sentence\tlabel"]))


def test_hub_columns_are_normalised(monkeypatch):
    import datasets

    def fake_load_dataset(name, config):
        assert (name, config) == ("nyu-mll/glue", "mnli")
        rows = {"premise": ["p1", "p2"], "hypothesis": ["h1", "h2"], "label": [2, 0], "idx": [0, 1]}
        features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                      "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]), "idx": datasets.Value("int32")})
        split = Dataset.from_dict(rows, features=features)
        return DatasetDict({"train": split, "validation_matched": split, "validation_mismatched": split, "test_matched": split})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = glue_data.load_hub(TASKS["mnli"])
    assert list(data) == ["train", "validation_matched", "validation_mismatched"]
    assert data["train"].column_names == ["text_a", "text_b", "label"]
    assert data["train"]["label"][:] == [2, 0] and data["train"]["text_b"][:] == ["h1", "h2"]


# ---------------------------------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_values():
    preds, labels = [1, 0, 1, 1], [1, 0, 0, 1]  # tp 2, tn 1, fp 1, fn 0
    assert score(TASKS["sst2"], preds, labels) == {"accuracy": 0.75}
    assert score(TASKS["mrpc"], preds, labels) == pytest.approx({"f1": 0.8, "accuracy": 0.75})  # P 2/3, R 1
    assert score(TASKS["cola"], preds, labels)["matthews_corr"] == pytest.approx(2 / math.sqrt(12))  # (2*1-1*0)/sqrt(3*2*2*1)
    assert score(TASKS["mnli"], [0, 1, 2, 2], [0, 2, 2, 1]) == {"accuracy": 0.5}
    # x = 1,2,3 vs y = 1,3,2: deviations (-1,0,1)·(-1,1,0) = 1 over sqrt(2*2) -> 0.5; the ranks are the values.
    assert score(TASKS["stsb"], [1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx({"pearson": 0.5, "spearman": 0.5})
    monotone = score(TASKS["stsb"], [1.0, 2.0, 3.0, 10.0], [1.0, 2.0, 3.0, 4.0])
    assert monotone["spearman"] == pytest.approx(1.0) and monotone["pearson"] < 0.99
    with pytest.raises(ValueError, match="shape"):
        score(TASKS["sst2"], [1, 0], [1, 0, 1])


def test_predictions_from_logits():
    assert predictions(TASKS["mnli"], np.array([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]])).tolist() == [1, 0]
    assert predictions(TASKS["stsb"], np.array([[4.5], [0.25]])).tolist() == [4.5, 0.25]


def test_aggregate_reports_points_std_and_int8_delta():
    task = TASKS["mrpc"]

    def run(seed, pt, fp32, int8):
        return {"seed": seed, "metrics": {b: {"validation": {"f1": v, "accuracy": v - 0.1}} for b, v in zip(glue.BACKENDS, (pt, fp32, int8))}}

    rows = aggregate_results(task, [run(1, 0.80, 0.80, 0.79), run(2, 0.84, 0.84, 0.82)])
    f1 = rows[0]
    assert [r["metric"] for r in rows] == ["f1", "accuracy"] and f1["primary"] and not rows[1]["primary"]
    assert f1["pytorch"] == pytest.approx(82.0) and f1["pytorch_std"] == pytest.approx(math.sqrt(8))  # (80, 84): sample std
    assert f1["onnx_int8"] == pytest.approx(80.5) and f1["int8_delta"] == pytest.approx(-1.5)
    assert f1["int8_delta_max_abs"] == pytest.approx(2.0) and f1["per_seed"]["onnx_int8"] == pytest.approx([79.0, 82.0])
    single = aggregate_results(task, [{"seed": 3, "metrics": {"pytorch": {"validation": {"f1": 0.5, "accuracy": 0.5}}}}])[0]
    assert single["pytorch_std"] is None and single["onnx_int8"] is None and single["int8_delta"] is None


# ------------------------------------------------------------------------------------ the pipeline


@pytest.fixture()
def encoder_dir(tmp_path):
    """A plain BertModel directory (no classification head), as a sentence encoder or a student is saved."""
    return save_model_dir(tmp_path / "encoder", kind="base")


FAST = GlueSettings(epochs=2, batch_size=8, eval_batch_size=8, learning_rate=1e-3, seeds=(1,), export=False, threads=1)


def test_new_head_is_explained_and_regression_has_one_output(encoder_dir, caplog):
    model = load_classifier(encoder_dir, TASKS["stsb"])
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"
    with caplog.at_level("INFO", logger="homoexport"):
        model = load_classifier(encoder_dir, TASKS["mnli"])
    assert model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    assert "new mnli head: initialised classifier.bias, classifier.weight" in caplog.text


def test_onnx_scores_match_pytorch(tmp_path, encoder_dir):
    task = TASKS["mrpc"]
    data = load_tsv(task, write_task(tmp_path / "data", "mrpc", n_dev=20))
    model = load_classifier(encoder_dir, task)
    model.save_pretrained(tmp_path / "cls")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    tokenizer.save_pretrained(tmp_path / "cls")
    export_model(tmp_path / "cls", tmp_path / "onnx", ExportSettings(task="text-classification"))
    dev = DatasetDict({"validation": data["validation"]})
    pt = evaluate_pytorch(model, tokenizer, task, dev, max_length=32, batch_size=8, threads=1)
    fp32 = evaluate_onnx(tmp_path / "onnx" / "model.onnx", task, dev, max_length=32, batch_size=8, threads=1)
    int8 = evaluate_onnx(tmp_path / "onnx" / "model_quantized.onnx", task, dev, max_length=32, batch_size=8, threads=1)
    assert fp32.metrics == pt.metrics
    assert set(int8.metrics["validation"]) == {"f1", "accuracy"}
    latency = fp32.latency["validation"]
    assert latency["n_samples"] == 20 and latency["n_batches"] == 3 and latency["threads"] == 1
    assert latency["throughput_samples_per_s"] == pytest.approx(20 / latency["forward_total_s"])
    with pytest.raises(FileNotFoundError, match="model_missing.onnx"):
        evaluate_onnx(tmp_path / "onnx" / "model_missing.onnx", task, dev)


def test_run_glue_writes_report_with_all_backends(tmp_path, encoder_dir):
    data_dir = write_task(tmp_path / "data", "sst2", n_train=32, n_dev=16)
    settings = GlueSettings(**{**FAST.__dict__, "export": True, "quantize": "static", "seeds": (1, 2), "eval_steps": 3, "keep_fp32": ("ffn-output",)})
    report = run_glue(encoder_dir, "sst2", tmp_path / "out", settings, data_dir=data_dir)
    saved = json.loads((tmp_path / "out" / "glue_report.json").read_text())
    assert saved["schema"] == "homoexport.glue_report/1" and saved["task"] == "sst2"
    (row,) = saved["results"]
    assert {"task", "metric", "pytorch", "onnx_fp32", "onnx_int8", "int8_delta", "pytorch_std", "seeds"} <= set(row)
    assert row["onnx_fp32"] == pytest.approx(row["pytorch"])  # the fp32 export predicts what PyTorch predicts
    assert row["int8_delta"] == pytest.approx(row["onnx_int8"] - row["pytorch"])
    assert row["seeds"] == [1, 2] and len(row["per_seed"]["onnx_int8"]) == 2
    assert set(saved["latency"]) == set(glue.BACKENDS) and saved["settings"]["eval_steps"] == 3
    for run in saved["runs"]:
        training = run["training"]
        assert training["steps"] == 8 and training["best_step"] in {3, 6, 8}
        assert [h["step"] for h in training["eval_history"]] == [3, 6, 8]  # the last step is evaluated too
        assert (tmp_path / "out" / run["paths"]["model"] / "config.json").is_file()
        assert (tmp_path / "out" / run["paths"]["onnx"] / "model_quantized.onnx").is_file()
        assert not (tmp_path / "out" / f"seed-{run['seed']}" / "checkpoints").exists()
        assert run["export"]["quantization"]["mode"] == "static" and run["export"]["parity"]["onnx_fp32_vs_pytorch"]["passed"]
        assert run["export"]["quantization"]["kept_fp32"]["groups"] == ["ffn-output"] and len(run["export"]["quantization"]["kept_fp32"]["nodes"]) == 2
        assert run["export"]["validation_inputs"]["source"] == "given" and run["export"]["validation_inputs"]["texts"] == 16  # gated on dev inputs
        calibration = (tmp_path / "out" / f"seed-{run['seed']}" / "calibration.tsv").read_text().splitlines()
        assert calibration[0] == "sentence" and len(calibration) == 33  # header + every (training) row, never dev
    assert "ONNX int8" in (tmp_path / "out" / "glue_report.md").read_text()
    assert "(ffn-output kept fp32)" in (tmp_path / "out" / "glue_report.md").read_text()
    assert report["results"] == saved["results"]


def test_failure_leaves_no_output(tmp_path, encoder_dir, monkeypatch):
    def broken_export(model_dir, onnx_dir, settings, train, dev):
        raise RuntimeError("export failed")

    monkeypatch.setattr(glue, "_export", broken_export)
    settings = GlueSettings(**{**FAST.__dict__, "export": True, "epochs": 1})
    with pytest.raises(RuntimeError, match="export failed"):
        run_glue(encoder_dir, "sst2", tmp_path / "out", settings, data_dir=write_task(tmp_path / "data", "sst2", 8, 4))
    assert not (tmp_path / "out").exists() and list(tmp_path.glob(".out*")) == []


def test_suite_orders_columns_like_glue_and_averages(tmp_path, encoder_dir):
    data_dir = tmp_path / "data"
    for task in ("stsb", "mnli", "cola"):
        write_task(data_dir, task, n_train=16, n_dev=9)
    settings = GlueSettings(**{**FAST.__dict__, "epochs": 1, "max_train_samples": 12, "max_eval_samples": 6})
    suite = run_glue_suite(encoder_dir, ["stsb", "cola", "mnli"], tmp_path / "suite", settings, data_dir=data_dir)
    assert suite["tasks"] == ["mnli", "cola", "stsb"]
    assert suite["columns"] == ["MNLI-m/mm (acc)", "CoLA (MCC)", "STS-B (Pearson/Spearman)", "Avg"]
    scores = suite["scores"]["pytorch"]
    assert scores["average"] == pytest.approx(np.mean([scores["mnli"], scores["cola"], scores["stsb"]]))
    mnli = [r for r in suite["results"] if r["task"] == "mnli"]
    assert [r["split"] for r in mnli] == ["validation_matched", "validation_mismatched"]
    assert scores["mnli"] == pytest.approx(np.mean([r["pytorch"] for r in mnli]))
    assert all(r["onnx_int8"] is None for r in suite["results"]) and list(suite["cells"]) == ["pytorch"]
    report = json.loads((tmp_path / "suite" / "stsb" / "glue_report.json").read_text())
    assert report["n_examples"] == {"train": 12, "validation": 6}
    assert [r["metric"] for r in report["results"]] == ["pearson", "spearman"]
    assert (tmp_path / "suite" / "glue_suite.md").read_text().count("|") > 10


# -------------------------------------------------------------------------------------------- CLI


def test_cli_glue_runs_and_rejects_bad_input(tmp_path, encoder_dir):
    runner = CliRunner()
    help_text = runner.invoke(app, ["glue", "--help"], env={"COLUMNS": "250"}).output
    for option in ("--task", "--data-dir", "--hub", "--seeds", "--max-train-samples", "--no-export", "--quantize"):
        assert option in help_text
    data_dir = write_task(tmp_path / "data", "rte", n_train=8, n_dev=6)
    bad = runner.invoke(app, ["glue", str(encoder_dir), "--task", "squad", "--data-dir", str(data_dir), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown GLUE task 'squad'" in bad.output
    both = runner.invoke(app, ["glue", str(encoder_dir), "--task", "rte", "--data-dir", str(data_dir), "--hub", "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "exactly one data source" in both.output
    kept = runner.invoke(app, ["glue", str(encoder_dir), "--task", "rte", "--data-dir", str(data_dir), "--keep-fp32", "ffn", "--out", str(tmp_path / "x")])
    assert kept.exit_code == 2 and "unknown keep-fp32 group 'ffn' (allowed: ffn-output)" in kept.output
    assert not (tmp_path / "x").exists()
    ok = runner.invoke(app, ["glue", str(encoder_dir), "--task", "rte", "--data-dir", str(data_dir), "--out", str(tmp_path / "run"),
                             "--epochs", "1", "--batch-size", "4", "--seeds", "3", "--no-export", "--threads", "1"])
    assert ok.exit_code == 0, ok.output
    assert "PyTorch" in ok.output and json.loads((tmp_path / "run" / "glue_report.json").read_text())["settings"]["seeds"] == [3]


# -------------------------------------------------------------------------------------- real data


@pytest.mark.real_data
def test_real_glue_files_parse_with_official_sizes(shared_dir):
    root = shared_dir / "data" / "glue"
    sizes = {"sst2": (67349, 872), "mrpc": (3668, 408), "rte": (2490, 277), "cola": (8551, 1043), "stsb": (5749, 1500)}
    for task, (n_train, n_dev) in sizes.items():
        data = load_tsv(TASKS[task], root)
        assert (len(data["train"]), len(data["validation"])) == (n_train, n_dev), task
    qnli = read_tsv(TASKS["qnli"], root / "QNLI" / "dev.tsv")  # QNLI ships dev only here
    assert np.bincount(qnli["label"][:]).tolist() == [2702, 2761]
    assert np.bincount(load_tsv(TASKS["sst2"], root)["validation"]["label"][:]).tolist() == [428, 444]
    assert np.bincount(load_tsv(TASKS["cola"], root)["validation"]["label"][:]).tolist() == [322, 721]
