"""``homoexport export``: optimum export, ORT fusion, int8 quantization and the checks that stop a wrong model.

Tiny random BERTs (2 layers) with pruned-student shapes: head_dim 12 (hidden 48, 4 heads) and head_dim 8
(hidden 40, 5 heads), built in the test. Latency repeats are kept minimal; no timing is asserted.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny import make_model, make_tokenizer, synthetic_sentences
from typer.testing import CliRunner

from homoexport.deployment import export as ex

FAST = dict(latency_repeats=2)


def model_dir(directory: Path, kind: str, hidden: int = 48, heads: int = 4, **config) -> Path:
    """A tiny model saved with its tokenizer; vocab_size covers the tokenizer's largest id."""
    tok = make_tokenizer(directory)
    vocab_size = max(tok.get_vocab().values()) + 1
    make_model(kind, vocab_size=vocab_size, hidden=hidden, heads=heads, ffn=2 * hidden, **config).save_pretrained(directory)
    return directory


def no_partial_dirs(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if p.name.endswith(".partial")]


@pytest.fixture(scope="module")
def encoder_export(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A head_dim-12 encoder exported with the defaults (O2, dynamic int8, order auto)."""
    root = tmp_path_factory.mktemp("enc")
    src = model_dir(root / "model", "base", hidden=48, heads=4)
    report = ex.export_model(src, root / "export", ex.ExportSettings(**FAST))
    return src, root / "export", report


@pytest.fixture(scope="module")
def classifier_export(tmp_path_factory) -> tuple[Path, Path, dict]:
    """A head_dim-8 classifier exported with static int8 calibrated on a GLUE-style TSV of sentence pairs."""
    root = tmp_path_factory.mktemp("cls")
    src = model_dir(root / "model", "cls", hidden=40, heads=5)
    sentences = synthetic_sentences(40, seed=1)
    tsv = root / "calib.tsv"
    tsv.write_text("sentence1\tsentence2\tlabel\n" + "".join(f"{a}\t{b}\t0\n" for a, b in zip(sentences[::2], sentences[1::2])))
    pairs = tuple(zip(sentences[1::2], sentences[::2]))
    report = ex.export_model(src, root / "export", ex.ExportSettings(quantize="static", calibration_data=tsv, validation_texts=pairs, **FAST))
    return src, root / "export", report


def test_encoder_export_writes_loadable_validated_files(encoder_export):
    src, out, report = encoder_export
    for name in (ex.FP32_FILE, ex.OPTIMIZED_FILE, ex.QUANTIZED_FILE, ex.REPORT_FILE, "config.json", "tokenizer.json", "vocab.txt"):
        assert (out / name).is_file(), name
    assert not (out / ".work").exists()
    assert json.loads((out / ex.REPORT_FILE).read_text()) == json.loads(json.dumps(report, default=str))
    assert report["task"] == "feature-extraction" and report["task_source"].endswith("BertModel")
    assert report["model"]["head_dim"] == 12
    assert report["parity"]["onnx_fp32_vs_pytorch"]["max_abs_diff"] <= 1e-4
    assert report["parity"]["onnx_optimized_vs_pytorch"]["max_abs_diff"] <= 1e-4
    assert report["parity"]["int8_vs_fp32"]["cosine_min"] >= 0.97
    assert report["fusion"]["attention_nodes"] == 2 == report["fusion"]["layers"] and report["fusion"]["all_layers_fused"]
    assert set(report["latency_ms"]["by_file"]) == {ex.FP32_FILE, ex.OPTIMIZED_FILE, ex.QUANTIZED_FILE}
    assert report["files"][ex.QUANTIZED_FILE] < report["files"][ex.FP32_FILE]
    assert ex.deployed_model_path(out) == out / ex.QUANTIZED_FILE
    assert report["machine"]["isa"] == ex.cpu_info()["isa"]


def test_both_quantization_orders_are_built_and_the_faster_kept(encoder_export):
    _, out, report = encoder_export
    q = report["quantization"]
    cands = q["order_candidates"]
    assert set(cands) == {"fuse-first", "quantize-first"}
    # fuse-first quantizes the fused graph (the shape-inference trap is handled): QAttention in the int8 file
    assert cands["fuse-first"]["built"] and cands["fuse-first"]["operators"].get("QAttention") == 2
    assert cands["quantize-first"]["built"] and "QAttention" not in cands["quantize-first"]["operators"]
    assert q["order"] == min(cands, key=lambda o: cands[o]["p50_ms_b1"])
    int8_ops = ex.op_counts(out / ex.QUANTIZED_FILE)
    assert ("QAttention" in int8_ops) == (q["order"] == "fuse-first")
    assert q["target"] == ex.detect_target(ex.cpu_info()) and q["mode"] == "dynamic" and q["per_channel"] is True


def test_ort_model_loads_the_export_and_matches_pytorch(encoder_export):
    import torch
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from transformers import AutoModel, AutoTokenizer

    src, out, _ = encoder_export
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["the cat sat on the mat.", "a dog ran."], padding=True, return_tensors="pt")
    with torch.inference_mode():
        ref = AutoModel.from_pretrained(src).eval()(**batch).last_hidden_state.numpy()
    ort_fp32 = ORTModelForFeatureExtraction.from_pretrained(out, file_name=ex.FP32_FILE)
    got = ort_fp32(**batch).last_hidden_state.numpy()
    mask = batch["attention_mask"].numpy().astype(bool)
    assert np.abs(ref[mask] - got[mask]).max() <= 1e-4
    int8 = ORTModelForFeatureExtraction.from_pretrained(out, file_name=ex.QUANTIZED_FILE)(**batch).last_hidden_state.numpy()
    assert int8.shape == ref.shape and np.isfinite(int8).all()


def test_static_classifier_export_agrees_with_fp32(classifier_export):
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer

    _, out, report = classifier_export
    assert report["task"] == "text-classification" and report["model"]["head_dim"] == 8
    assert report["fusion"]["all_layers_fused"]
    q = report["quantization"]
    assert q["mode"] == "static" and q["format"] == "QDQ" and q["operators"] == ["MatMul"]
    assert q["calibration"]["samples"] == 20
    assert report["parity"]["int8_vs_fp32"]["agreement"] >= 0.9
    assert report["validation_inputs"] == {"texts": 20, "source": "given", "batches": [[20, report["validation_inputs"]["batches"][0][1]]]}
    # LayerNorm / GELU / Softmax stay float: only MatMul inputs get QuantizeLinear/DequantizeLinear pairs
    ops = ex.op_counts(out / ex.QUANTIZED_FILE)
    assert ops.get("QuantizeLinear", 0) > 0 and "QLinearLayerNormalization" not in ops
    tok = AutoTokenizer.from_pretrained(out)
    logits = ORTModelForSequenceClassification.from_pretrained(out, file_name=ex.QUANTIZED_FILE)(**tok(["a good movie."], return_tensors="pt")).logits
    assert tuple(logits.shape) == (1, 3)


@pytest.mark.parametrize("hidden,heads", [(32, 8), (36, 3)])
def test_fill_mask_fp32_export_of_pruned_head_dims(tmp_path, hidden, heads):
    """head_dim 4 and 12 with an odd head count; MLM head tied to the embeddings; quantization off."""
    src = model_dir(tmp_path / "m", "mlm", hidden=hidden, heads=heads)
    report = ex.export_model(src, tmp_path / "out", ex.ExportSettings(quantize="none", **FAST))
    assert report["task"] == "fill-mask"
    assert report["parity"]["onnx_fp32_vs_pytorch"]["max_abs_diff"] <= 1e-4
    assert report["fusion"]["attention_nodes"] == 2
    assert not (tmp_path / "out" / ex.QUANTIZED_FILE).exists()
    assert ex.deployed_model_path(tmp_path / "out").name == ex.OPTIMIZED_FILE


def test_o1_reports_why_attention_is_not_fused(tmp_path):
    src = model_dir(tmp_path / "m", "base")
    report = ex.export_model(src, tmp_path / "out", ex.ExportSettings(optimize="O1", quantize="dynamic", order="quantize-first", **FAST))
    assert report["fusion"]["attention_nodes"] == 0 and not report["fusion"]["all_layers_fused"]
    assert "O1" in report["fusion"]["reason"]
    assert report["quantization"]["order"] == "quantize-first"


def test_quantizing_the_fused_graph_needs_the_type_annotation(encoder_export, tmp_path):
    """The known trap: ORTQuantizer cannot type MatMuls fed by com.microsoft fused ops unless value_info is added."""
    from optimum.onnxruntime import ORTQuantizer

    _, out, _ = encoder_export
    qconfig = ex.quantization_config("dynamic", "avx2", per_channel=False)
    with pytest.raises(RuntimeError, match="Unable to find data type"):
        ORTQuantizer(out / ex.OPTIMIZED_FILE).quantize(qconfig, tmp_path / "plain")
    annotated = ex.annotate_types(out / ex.OPTIMIZED_FILE, tmp_path / "annotated" / "model.onnx")
    ORTQuantizer(annotated).quantize(qconfig, tmp_path / "annotated")
    assert ex.op_counts(tmp_path / "annotated" / "model_quantized.onnx").get("QAttention") == 2


def test_tokenizer_larger_than_vocab_fails_and_leaves_nothing(tmp_path):
    src = model_dir(tmp_path / "m", "base")
    make_model("base", vocab_size=20, hidden=48, heads=4, ffn=96).save_pretrained(src)  # same tokenizer, smaller embedding
    with pytest.raises(ex.ExportError, match=r"tokenizer .* ids up to \d+ but the model's vocab_size is 20"):
        ex.export_model(src, tmp_path / "out", ex.ExportSettings(**FAST))
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)


def test_corrupted_weights_file_fails_and_leaves_nothing(tmp_path):
    src = model_dir(tmp_path / "m", "base")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ex.ExportError, match="cannot load a feature-extraction model from"):
        ex.export_model(src, tmp_path / "out", ex.ExportSettings(**FAST))
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)


def test_nan_weights_fail_before_export(tmp_path):
    import torch
    from transformers import AutoModel

    src = model_dir(tmp_path / "m", "base")
    model = AutoModel.from_pretrained(src)
    with torch.no_grad():
        model.encoder.layer[1].output.dense.weight[0, 0] = float("nan")
    model.save_pretrained(src)
    with pytest.raises(ex.ExportError, match="NaN/inf"):
        ex.export_model(src, tmp_path / "out", ex.ExportSettings(**FAST))
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)


def test_task_without_trained_head_is_refused(tmp_path):
    src = model_dir(tmp_path / "m", "base")
    with pytest.raises(ex.ExportError, match="lacks weights for task 'text-classification'.*classifier"):
        ex.export_model(src, tmp_path / "out", ex.ExportSettings(task="text-classification", **FAST))
    assert not (tmp_path / "out").exists()


def test_parity_failure_stops_and_keeps_the_previous_export(tmp_path, monkeypatch):
    """An ONNX graph 1e-3 away from the PyTorch model (simulated by shifting the reference) is refused."""
    src = model_dir(tmp_path / "m", "base")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous export")
    reference = ex.torch_outputs
    monkeypatch.setattr(ex, "torch_outputs", lambda model, batch: reference(model, batch) + 1e-3)
    with pytest.raises(ex.ExportError, match="fp32 ONNX differs from PyTorch: max abs diff 0.001 > atol 0.0001"):
        ex.export_model(src, out, ex.ExportSettings(quantize="none", optimize="none", **FAST), overwrite=True)
    assert (out / "keep.txt").read_text() == "previous export" and no_partial_dirs(tmp_path)


def test_int8_tolerance_is_enforced(tmp_path):
    src = model_dir(tmp_path / "m", "base")
    with pytest.raises(ex.ExportError, match="no int8 model met the tolerance"):
        ex.export_model(src, tmp_path / "out", ex.ExportSettings(int8_min_cosine=1.0 + 1e-9, order="quantize-first", **FAST))
    assert not (tmp_path / "out").exists() and no_partial_dirs(tmp_path)


@pytest.mark.parametrize("order", ["fuse-first", "quantize-first"])
def test_keep_fp32_leaves_the_ffn_down_projections_unquantized(tmp_path, order):
    """Each layer's FFN output MatMul stays a float MatMul in the int8 file; every other linear is int8."""
    import onnx

    src = model_dir(tmp_path / "m", "cls", hidden=48, heads=4)
    report = ex.export_model(src, tmp_path / "out", ex.ExportSettings(keep_fp32=("ffn-output",), order=order, **FAST))
    kept = report["quantization"]["kept_fp32"]
    assert kept["groups"] == ["ffn-output"] and len(kept["nodes"]) == 2  # one per layer
    assert all("/output/dense/MatMul" in name and "attention" not in name for name in kept["nodes"])
    graph = onnx.load(str(tmp_path / "out" / ex.QUANTIZED_FILE)).graph
    float_matmuls = {n.name for n in graph.node if n.op_type == "MatMul"}
    assert set(kept["nodes"]) <= float_matmuls
    int8_linears = [n for n in graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul") and "intermediate/dense" in n.name]
    assert len(int8_linears) == 2
    assert report["options"]["keep_fp32"] == ["ffn-output"]


def test_keep_fp32_errors_are_named(tmp_path):
    src = model_dir(tmp_path / "m", "base")
    with pytest.raises(ex.ExportError, match="invalid keep-fp32 group 'ffn': expected one of ffn-output"):
        ex.export_model(src, tmp_path / "o", ex.ExportSettings(keep_fp32=("ffn",)))
    with pytest.raises(ex.ExportError, match="only applies to an int8 export"):
        ex.export_model(src, tmp_path / "o", ex.ExportSettings(keep_fp32=("ffn-output",), quantize="none"))
    assert not (tmp_path / "o").exists()


def test_bad_options_are_named(tmp_path):
    src = model_dir(tmp_path / "m", "base")
    with pytest.raises(ex.ExportError, match="invalid optimize level 'O9': expected one of none, O1, O2, O3"):
        ex.export_model(src, tmp_path / "o", ex.ExportSettings(optimize="O9"))
    with pytest.raises(ex.ExportError, match="needs --calibration-data"):
        ex.export_model(src, tmp_path / "o", ex.ExportSettings(quantize="static"))
    with pytest.raises(ex.ExportError, match="not a model directory"):
        ex.export_model(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "exists").mkdir()
    with pytest.raises(ex.ExportError, match="already exists"):
        ex.export_model(src, tmp_path / "exists")


def test_infer_task_and_detect_target():
    assert ex.infer_task(["BertModel"]) == "feature-extraction"
    assert ex.infer_task(["BertForMaskedLM"]) == "fill-mask"
    assert ex.infer_task(["BertForSequenceClassification"]) == "text-classification"
    with pytest.raises(ex.ExportError, match="pass --task"):
        ex.infer_task(["BertForQuestionAnswering"])
    cpu = {"cpu_model": "x", "arch": "x86_64"}
    assert ex.detect_target(cpu | {"isa": ["avx2", "avx512f", "avx512_vnni"]}) == "avx512_vnni"
    assert ex.detect_target(cpu | {"isa": ["avx2", "avx512f"]}) == "avx512"
    assert ex.detect_target(cpu | {"isa": ["avx", "avx2"]}) == "avx2"
    assert ex.detect_target({"cpu_model": "a", "arch": "aarch64", "isa": ["asimd"]}) == "arm64"
    with pytest.raises(ex.ExportError, match="--target"):
        ex.detect_target(cpu | {"isa": ["avx"]})
    assert ex.quantization_config("dynamic", "avx2", True).weights_dtype.name == "QUInt8"  # u8/u8 on AVX2
    assert ex.quantization_config("dynamic", "avx512_vnni", True).weights_dtype.name == "QInt8"


def test_read_texts_formats(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nthree\n")
    assert ex.read_texts(tmp_path / "a.txt", 2) == ["one", "two"]
    (tmp_path / "sst.tsv").write_text("sentence\tlabel\nfine film .\t1\n")
    assert ex.read_texts(tmp_path / "sst.tsv", 10) == ["fine film ."]
    (tmp_path / "qnli.tsv").write_text("index\tquestion\tsentence\tlabel\n0\twho ?\tnobody .\tentailment\n")
    assert ex.read_texts(tmp_path / "qnli.tsv", 10) == [("who ?", "nobody .")]
    (tmp_path / "bad.tsv").write_text("a\tb\n1\t2\n")
    with pytest.raises(ex.ExportError, match="no text column"):
        ex.read_texts(tmp_path / "bad.tsv", 10)


def test_validation_batches_keep_pairs_and_stay_small(tmp_path):
    tok = make_tokenizer(tmp_path)
    singles = synthetic_sentences(70, seed=2)
    batches = ex.validation_batches(tok, singles, 32)
    assert [len(b["input_ids"]) for b in batches] == [32, 32, 6, 32, 3]  # the texts, then consecutive ones as pairs
    assert batches[0]["token_type_ids"].max() == 0 and batches[-1]["token_type_ids"].max() == 1
    pairs = list(zip(singles[:40], singles[30:70]))
    assert [len(b["input_ids"]) for b in ex.validation_batches(tok, pairs, 32)] == [32, 8]
    with pytest.raises(ex.ExportInputError, match="mix single texts and text pairs"):
        ex.ExportSettings(validation_texts=(singles[0], pairs[0]))


def test_int8_metrics_and_fusion_explanations():
    mask = np.array([[1, 1, 0]])
    a = np.array([[[1.0, 0.0], [1.0, 0.0], [9.0, 9.0]]])
    b = np.array([[[0.0, 1.0], [0.0, 1.0], [-9.0, 9.0]]])
    m = ex.int8_agreement("feature-extraction", [a], [b], [mask])
    assert m["cosine_min"] == pytest.approx(0.0) and m["max_abs_diff"] == pytest.approx(1.0)  # padding ignored
    # A CLS-pooling embedding model is gated on its CLS vector: here the mean of the real tokens moves, the first does not.
    from homoexport.evaluation.sts import Pooling

    c = np.array([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    assert ex.int8_agreement("feature-extraction", [a], [c], [mask])["cosine_min"] < 0.8
    assert ex.int8_agreement("feature-extraction", [a], [c], [mask], Pooling("cls"))["cosine_min"] == pytest.approx(1.0)
    logits = np.array([[0.1, 0.9], [0.8, 0.2]])
    assert ex.int8_agreement("text-classification", [logits], [logits[:, ::-1]], [np.ones((2, 4))])["agreement"] == 0.0
    assert ex.attention_fusion_check("O2", {"Attention": 6}, 6, [])["all_layers_fused"]
    partial = ex.attention_fusion_check("O2", {"Attention": 4, "Softmax": 2}, 6, ["fuse_attention: failed to match qk path"])
    assert not partial["all_layers_fused"] and "4 of 6" in partial["reason"] and "failed to match qk path" in partial["reason"]


def test_cli_export_and_one_line_errors(tmp_path):
    from homoexport.cli import app

    src = model_dir(tmp_path / "m", "base")
    runner = CliRunner()
    result = runner.invoke(app, ["export", str(src), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "pass --onnx" in result.output
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t1\n" for t in synthetic_sentences(5, seed=3)))
    result = runner.invoke(app, ["export", str(src), "--onnx", "--out", str(tmp_path / "x"), "--quantize", "none", "--optimize", "none", "--no-progress",
                                 "--validation-data", str(tmp_path / "dev.tsv")])
    assert result.exit_code == 0, result.output
    assert ex.deployed_model_path(tmp_path / "x").name == ex.FP32_FILE
    assert json.loads((tmp_path / "x" / ex.REPORT_FILE).read_text())["validation_inputs"]["texts"] == 5 and "checks on 5 given inputs" in result.output
    result = runner.invoke(app, ["export", str(src), "--onnx", "--out", str(tmp_path / "y"), "--validation-data", str(tmp_path / "none.txt")])
    assert result.exit_code == 2 and "validation data not found" in result.output and not (tmp_path / "y").exists()
    result = runner.invoke(app, ["export", str(src), "--onnx", "--out", str(tmp_path / "x"), "--target", "sse2"])
    assert result.exit_code == 2 and "invalid target 'sse2'" in result.output and "Traceback" not in result.output


def test_int8_advice_follows_what_was_tried():
    dynamic = ex.int8_advice("dynamic", True, ())
    assert "--quantize static with --calibration-data" in dynamic and "--keep-fp32 ffn-output" in dynamic and "--per-channel" not in dynamic
    static = ex.int8_advice("static", True, ("ffn-output",))
    assert "--quantize static" not in static and "--keep-fp32" not in static and "calibration-data" in static and "--quantize none" in static
    assert "--per-channel" in ex.int8_advice("dynamic", False, ())
    assert "--validation-data" in ex.int8_advice("dynamic", True, (), builtin_texts=True) and "--validation-data" not in dynamic
