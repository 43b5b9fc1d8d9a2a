"""`homoexport prune`: one-shot importance prune to a loadable stock BERT with a parity figure."""

import json

import pytest
from tiny import save_model_dir, synthetic_sentences
from transformers import AutoModel, AutoModelForMaskedLM
from typer.testing import CliRunner

from homoexport.cli import app
from homoexport.pruning.oneshot import prune_model


def test_prune_cli_on_tiny_mlm_model_with_text(tmp_path):
    model_dir = save_model_dir(tmp_path / "m", "mlm")
    text = tmp_path / "t.txt"
    text.write_text("\n".join(synthetic_sentences(200)))
    out = tmp_path / "p"
    result = CliRunner().invoke(app, ["prune", str(model_dir), "--hidden", "32", "--heads", "2", "--ffn", "48", "--out", str(out),
                                      "--data", str(text), "--batches", "2", "--batch-size", "4", "--seq", "32", "--importance", "platon"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "prune_report.json").read_text())
    assert report["parity_max_abs_diff"] <= 1e-4 and report["after"]["widths"] == {"hidden": 32, "heads": 2, "head_dim": 16, "ffn": 48}
    assert report["after"]["parameters"] < report["before"]["parameters"]
    model, info = AutoModelForMaskedLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and model.config.hidden_size == 32


def test_prune_keeps_unspecified_widths_and_scores_on_synthetic_ids(tmp_path):
    model_dir = save_model_dir(tmp_path / "m", "base")
    report = prune_model(model_dir, tmp_path / "p", ffn=64, batches=2, batch_size=4, block_size=16)
    assert report["after"]["widths"] == {"hidden": 64, "heads": 4, "head_dim": 16, "ffn": 64}
    assert "synthetic" in report["scored_on"] and report["schema"] == "homoexport.prune/1"


def test_prune_keeps_a_classifier_head(tmp_path):
    """A fine-tuned *ForSequenceClassification model is pruned with its head and saved as the same architecture."""
    from transformers import AutoModelForSequenceClassification

    model_dir = save_model_dir(tmp_path / "m", "cls", num_labels=3)
    prune_model(model_dir, tmp_path / "p", hidden=32, heads=2, ffn=64, batches=2, batch_size=4, block_size=16)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "p")
    assert model.config.architectures == ["BertForSequenceClassification"] and model.classifier.weight.shape == (3, 32)


def test_prune_errors_name_the_problem_and_write_nothing(tmp_path):
    model_dir = save_model_dir(tmp_path / "m", "base")
    runner = CliRunner()
    result = runner.invoke(app, ["prune", str(model_dir), "--hidden", "48", "--heads", "5", "--out", str(tmp_path / "a")])
    assert result.exit_code == 2 and "divisible" in result.output and not (tmp_path / "a").exists()
    result = runner.invoke(app, ["prune", str(model_dir), "--hidden", "128", "--heads", "4", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "hidden=128" in result.output and not (tmp_path / "b").exists()
    result = runner.invoke(app, ["prune", str(tmp_path / "nope"), "--hidden", "32", "--out", str(tmp_path / "c")])
    assert result.exit_code == 2 and "nope" in result.output


@pytest.mark.real_data
def test_prune_real_encoder_to_192(shared_dir, tmp_path):
    out = tmp_path / "p"
    report = prune_model(shared_dir / "models" / "all-MiniLM-L6-v2", out, hidden=192, heads=6, ffn=768, batches=2, batch_size=4, block_size=64)
    model = AutoModel.from_pretrained(out)
    c = model.config
    assert (c.hidden_size, c.num_attention_heads, c.intermediate_size) == (192, 6, 768)
    assert report["parity_max_abs_diff"] <= 1e-4
