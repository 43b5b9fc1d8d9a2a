"""Zero-shot STS: pooling read from sentence-transformers files, pooling arithmetic, pair files, scoring."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from tiny import WORDS, save_model_dir
from typer.testing import CliRunner

from homoexport.cli import app
from homoexport.errors import UsageError
from homoexport.evaluation.sts import Pooling, pool, read_pairs, read_pooling, run_sts


def write_st_files(directory: Path, mode: str = "cls", normalize: bool = True) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir(parents=True, exist_ok=True)
    flags = {"pooling_mode_mean_tokens": mode == "mean", "pooling_mode_cls_token": mode == "cls", "pooling_mode_max_tokens": mode == "max"}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **flags}))


def test_pooling_is_read_from_sentence_transformers_files(tmp_path: Path):
    assert read_pooling(tmp_path) == Pooling()  # nothing declared: mean, no normalization
    write_st_files(tmp_path, "cls", normalize=True)
    p = read_pooling(tmp_path)
    assert (p.mode, p.normalize) == ("cls", True) and p.source.endswith("1_Pooling/config.json")
    write_st_files(tmp_path, "max", normalize=False)
    assert (read_pooling(tmp_path).mode, read_pooling(tmp_path).normalize) == ("max", False)
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}))
    with pytest.raises(UsageError, match="exactly one of mean / CLS / max"):
        read_pooling(tmp_path)


def test_pool_excludes_padding_and_normalizes():
    hidden = np.array([[[1.0, 0.0], [3.0, 2.0], [100.0, 100.0]]])  # last token is padding
    mask = np.array([[1, 1, 0]])
    assert np.allclose(pool(hidden, mask, Pooling("mean")), [[2.0, 1.0]])
    assert np.allclose(pool(hidden, mask, Pooling("max")), [[3.0, 2.0]])
    assert np.allclose(pool(hidden, mask, Pooling("cls")), [[1.0, 0.0]])
    assert np.allclose(np.linalg.norm(pool(hidden, mask, Pooling("mean", normalize=True)), axis=1), 1.0)


def write_pairs(path: Path, n: int = 40) -> Path:
    rng = random.Random(0)
    lines = ["sentence1\tsentence2\tscore"]
    for _ in range(n):
        a = " ".join(rng.choice(WORDS) for _ in range(6))
        b = " ".join(w if rng.random() < 0.5 else rng.choice(WORDS) for w in a.split())
        same = sum(x == y for x, y in zip(a.split(), b.split()))
        lines.append(f"{a}\t{b}\t{same / 6 * 5:.2f}")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_pair_files_are_checked(tmp_path: Path):
    assert len(read_pairs(write_pairs(tmp_path / "p.tsv")).scores) == 40
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence1\tsentence2\tgold\na\tb\t1\n")
    with pytest.raises(UsageError, match=r"bad.tsv:1: header lacks score"):
        read_pairs(bad)
    bad.write_text("sentence1\tsentence2\tscore\na\tb\thigh\n")
    with pytest.raises(UsageError, match=r"bad.tsv:2: score 'high' is not a number"):
        read_pairs(bad)


def test_sts_scores_pytorch_and_onnx_alike(tmp_path: Path):
    from homoexport.deployment.export import ExportSettings, export_model

    model = save_model_dir(tmp_path / "m", kind="base")
    export_model(model, tmp_path / "onnx", ExportSettings(task="feature-extraction", quantize="none", latency_repeats=2))
    pairs = read_pairs(write_pairs(tmp_path / "p.tsv"))
    report = run_sts(model, pairs, teacher=model, export_dir=tmp_path / "onnx", threads=1)
    scores = {r["name"]: r["spearman"] for r in report["results"]}
    assert set(scores) == {"teacher (PyTorch)", "student (PyTorch)", "student (ONNX fp32)"}
    assert scores["teacher (PyTorch)"] == pytest.approx(scores["student (PyTorch)"])
    assert scores["student (ONNX fp32)"] == pytest.approx(scores["student (PyTorch)"], abs=0.5)
    assert report["schema"] == "homoexport.sts/1" and report["pooling"]["mode"] == "mean"
    # the export declares its pooling, as a sentence-transformers folder does
    assert read_pooling(tmp_path / "onnx").mode == "mean" and (tmp_path / "onnx" / "sentence_bert_config.json").is_file()


def test_int8_gate_speaks_in_sentence_embedding_terms(tmp_path: Path, monkeypatch):
    from homoexport.deployment.export import ExportSettings, export_model

    model = save_model_dir(tmp_path / "m", kind="base")
    export_model(model, tmp_path / "onnx", ExportSettings(task="feature-extraction", latency_repeats=2))
    pairs = write_pairs(tmp_path / "p.tsv")
    report = run_sts(model, read_pairs(pairs), export_dir=tmp_path / "onnx", threads=1)
    scores = {r["name"]: r["spearman"] for r in report["results"]}
    int8 = report["int8"]
    assert int8["spearman_drop_vs_pytorch"] == pytest.approx(scores["student (PyTorch)"] - scores["student (ONNX int8)"])
    assert 0.9 < int8["cosine_to_fp32_min"] <= int8["cosine_to_fp32_mean"] <= 1.0 + 1e-6
    ok = CliRunner().invoke(app, ["sts", str(model), "--pairs", str(pairs), "--onnx", str(tmp_path / "onnx"), "--max-int8-drop", "100"])
    assert ok.exit_code == 0, ok.output
    assert "int8 vs fp32 sentence embeddings: cosine mean" in ok.output
    import homoexport.evaluation.sts as sts

    # A drop beyond the limit is a regression (exit 1), said in one line, after the report is written.
    monkeypatch.setattr(sts, "run_sts", lambda *a, **k: {**report, "int8": {**int8, "spearman_drop_vs_pytorch": 1.5}})
    failed = CliRunner().invoke(app, ["sts", str(model), "--pairs", str(pairs), "--onnx", str(tmp_path / "onnx"), "--max-int8-drop", "1",
                                      "--out", str(tmp_path / "gated.json")])
    assert failed.exit_code == 1 and "error: the int8 file scores 1.50 STS" in failed.output
    assert (tmp_path / "gated.json").is_file()
    no_onnx = CliRunner().invoke(app, ["sts", str(model), "--pairs", str(pairs), "--max-int8-drop", "1"])
    assert no_onnx.exit_code == 2 and "needs --onnx" in no_onnx.output


def test_declared_pooling_round_trips(tmp_path: Path):
    from homoexport.evaluation.sts import write_pooling

    write_pooling(tmp_path, Pooling("cls", normalize=True), 64, 128)
    p = read_pooling(tmp_path)
    assert (p.mode, p.normalize) == ("cls", True)
    assert json.loads((tmp_path / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 64


def test_sts_command(tmp_path: Path):
    model = save_model_dir(tmp_path / "m", kind="base")
    result = CliRunner().invoke(app, ["sts", str(model), "--pairs", str(write_pairs(tmp_path / "p.tsv")), "--out", str(tmp_path / "sts.json")])
    assert result.exit_code == 0, result.output
    assert "| student (PyTorch) |" in result.output and json.loads((tmp_path / "sts.json").read_text())["results"]
    both = CliRunner().invoke(app, ["sts", str(model)])
    assert both.exit_code == 2 and "--data-dir" in both.output


@pytest.mark.real_data
def test_teacher_scores_its_published_level_on_stsb_dev(shared_dir: Path):
    from homoexport.evaluation.sts import stsb_dev

    teacher = shared_dir / "models" / "all-MiniLM-L6-v2"
    report = run_sts(teacher, stsb_dev(shared_dir / "data" / "glue"))
    assert 85.0 < report["results"][0]["spearman"] < 88.5  # measured 86.7 (mean pooling, no fine-tuning)


def test_a_distilled_student_carries_its_teachers_pooling(tmp_path: Path):
    from homoexport.evaluation.sts import carry_pooling

    teacher = save_model_dir(tmp_path / "t", kind="base")
    assert not carry_pooling(teacher, tmp_path / "s", 32, 128) and not (tmp_path / "s").exists()
    write_st_files(teacher, "max", normalize=True)
    (tmp_path / "s").mkdir()
    assert carry_pooling(teacher, tmp_path / "s", 32, 128)
    p = read_pooling(tmp_path / "s")
    assert (p.mode, p.normalize) == ("max", True)
    assert json.loads((tmp_path / "s" / "1_Pooling" / "config.json").read_text())["word_embedding_dimension"] == 32


def test_sentence_embedding_loss_terms():
    import torch

    from homoexport.config.recipe import LossSpec
    from homoexport.distillation.losses import DistillationLoss, EncoderOutputs, similarity_mse

    torch.manual_seed(0)
    mask = torch.ones(4, 6)
    mask[-1, -2:] = 0
    teacher = EncoderOutputs(hidden=tuple(torch.randn(4, 6, 16) for _ in range(3)))
    spec = LossSpec(hidden=0, attention=0, embedding=0, mlm=0, kl=0, sentence=1.0, similarity=1.0)
    loss = DistillationLoss(spec, 16, 16, 2, 2, has_mlm=False)
    same, terms = loss(teacher, teacher, mask, None, None)
    assert set(terms) == {"sentence", "similarity"} and float(same) == pytest.approx(0.0, abs=1e-6)
    other = EncoderOutputs(hidden=tuple(torch.randn(4, 6, 16) for _ in range(3)))
    value, terms = loss(other, teacher, mask, None, None)
    assert float(terms["sentence"]) > 0 and float(terms["similarity"]) > 0
    padded = teacher.hidden[-1].clone()
    padded[-1, -2:] = 1e3  # padding never reaches the sentence embedding
    assert float(loss(EncoderOutputs(hidden=(*teacher.hidden[:-1], padded)), teacher, mask, None, None)[0]) == pytest.approx(0.0, abs=1e-6)
    # the similarity structure compares embeddings of different widths, and ignores their scale
    s = torch.randn(5, 8)
    assert float(similarity_mse(s * 3, s)) == pytest.approx(0.0, abs=1e-6)
    assert float(similarity_mse(torch.randn(5, 8), torch.randn(5, 32))) > 0


@pytest.mark.parametrize("mode,normalize", [("mean", False), ("cls", True), ("max", False)])
def test_export_puts_the_declared_pooling_in_the_graph(tmp_path: Path, mode: str, normalize: bool):
    import onnxruntime as ort
    import torch
    from transformers import AutoModel, AutoTokenizer

    from homoexport.deployment.export import ExportSettings, export_model

    model_dir = save_model_dir(tmp_path / "m", kind="base")
    write_st_files(model_dir, mode, normalize)
    report = export_model(model_dir, tmp_path / "onnx", ExportSettings(quantize="none", latency_repeats=2, sentence_embedding=True))
    assert report["parity"]["sentence_embedding_vs_pytorch"]["passed"]
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(["the cat sat on the mat.", "a dog"], padding=True, return_tensors="np")
    feeds = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    got = session.run(["sentence_embedding"], feeds)[0]
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(model_dir)(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    expected = pool(hidden, batch["attention_mask"], Pooling(mode, normalize))
    assert got.shape == (2, 64) and np.allclose(got, expected, atol=1e-4)
    assert read_pooling(tmp_path / "onnx").mode == mode  # and the folder still declares it


def test_sentence_embedding_needs_a_feature_extraction_export():
    from homoexport.deployment.export import ExportInputError, ExportSettings

    with pytest.raises(ExportInputError, match="needs a feature-extraction export"):
        ExportSettings(task="text-classification", sentence_embedding=True)


def test_sentence_transformers_and_optimum_load_the_export_as_is(tmp_path: Path):
    """The export folder is a drop-in: SentenceTransformer(dir, backend="onnx") and ORTModelForFeatureExtraction load
    it with no conversion, and their sentence embeddings are the PyTorch student's (fp32) or close to it (int8)."""
    import torch
    from optimum.onnxruntime import ORTModelForFeatureExtraction
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from homoexport.deployment.export import ExportSettings, export_model

    model_dir = save_model_dir(tmp_path / "m", kind="base")
    write_st_files(model_dir, "mean", normalize=True)
    out = tmp_path / "onnx"
    export_model(model_dir, out, ExportSettings(latency_repeats=2, sentence_embedding=True))
    texts = ["the cat sat on the mat.", "a dog ran", "cats and dogs and mats"]
    tok = AutoTokenizer.from_pretrained(model_dir)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(model_dir)(**batch).last_hidden_state.numpy()
    expected = pool(hidden, batch["attention_mask"].numpy(), Pooling("mean", True))
    fp32 = SentenceTransformer(str(out), backend="onnx", device="cpu", model_kwargs={"file_name": "model.onnx"})
    assert np.allclose(fp32.encode(texts), expected, atol=1e-4)
    int8 = SentenceTransformer(str(out), backend="onnx", device="cpu", model_kwargs={"file_name": "model_quantized.onnx"})
    cosine = np.sum(int8.encode(texts) * expected, axis=1)  # both are unit vectors
    assert cosine.min() > 0.98
    ort_model = ORTModelForFeatureExtraction.from_pretrained(out, file_name="model.onnx")
    ort_hidden = ort_model(**tok(texts, padding=True, return_tensors="pt")).last_hidden_state.numpy()
    assert np.allclose(pool(ort_hidden, batch["attention_mask"].numpy(), Pooling("mean", True)), expected, atol=1e-4)


def test_the_int8_gate_of_a_cls_model_compares_its_cls_embeddings(tmp_path: Path, monkeypatch):
    """export reads the declared pooling before quantizing, and the gate scores every int8 candidate on it."""
    import homoexport.deployment.export as ex

    seen: list[Pooling | None] = []
    real = ex.int8_agreement

    def spy(task, fp32, int8, masks, pooling=None):
        seen.append(pooling)
        return real(task, fp32, int8, masks, pooling)

    monkeypatch.setattr(ex, "int8_agreement", spy)
    model_dir = save_model_dir(tmp_path / "m", kind="base")
    write_st_files(model_dir, "cls", normalize=True)
    report = ex.export_model(model_dir, tmp_path / "onnx", ex.ExportSettings(task="feature-extraction", latency_repeats=2))
    assert seen and all(p is not None and (p.mode, p.normalize) == ("cls", True) for p in seen)
    assert report["parity"]["int8_vs_fp32"]["passed"]
