"""Teacher assistants (MiniDisc): weight-shared widths equal their materialised models, the λ-tradeoff
picks the expected candidate, and the two-stage run reaches the target and resumes after a kill."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_model, random_batch, save_model_dir, synthetic_sentences
from transformers import AutoModel
from typer.testing import CliRunner

from homoexport.cli import app
from homoexport.config.recipe import RecipeError, validate_recipe, with_assistant_option
from homoexport.distillation import assistant, trainer
from homoexport.distillation.assistant import (
    Candidate,
    EncodeModule,
    assistant_widths,
    auto_candidates,
    choose,
    distill_with_assistant,
    masked_call,
    masked_overrides,
    nested_masks,
    run_sandwich,
    split_steps,
    width_key,
)
from homoexport.pruning.mask_groups import Masks, UnitScores, Widths, prepare
from homoexport.pruning.surgery import materialize

FULL = Widths(64, 8, 8, 128)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(synthetic_sentences(400, seed=3)))
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return save_model_dir(tmp_path_factory.mktemp("teacher") / "mlm", "mlm", heads=8)


def recipe_dict(teacher: Path, corpus: Path, out: Path, **assistant) -> dict:
    return {
        "teacher": str(teacher),
        "student": {"hidden": 16, "heads": 2, "ffn": 32},
        "data": {"train": [str(corpus)], "block_size": 32, "eval_blocks": 8},
        "pruning": {"interval": 2, "t_f": 0.25, "multiple": 8},
        "optimizer": {"lr": 1e-3, "warmup": 0},
        "training": {"steps": 12, "batch_size": 4, "log_every": 1, "checkpoint_every": 2},
        "assistant": {"mode": "auto", "candidates": 3, "sandwich_steps": 3, "sampled_widths": 1, "score_batches": 2, "eval_batches": 2,
                      **assistant},
        "output": str(out),
    }


def _random_scores(layers: int, seed: int) -> UnitScores:
    g = torch.Generator().manual_seed(seed)
    return UnitScores(hidden=torch.rand(FULL.hidden, generator=g), attn=torch.rand(layers, FULL.heads, FULL.head_dim, generator=g),
                      ffn=torch.rand(layers, FULL.ffn, generator=g))


@pytest.mark.parametrize("kind", ["base", "mlm"])
def test_shared_weight_student_equals_materialised_model_at_every_width(kind):
    model = make_model(kind, heads=8)
    masked = prepare(model)
    widths = [Widths(48, 6, 8, 96), Widths(32, 4, 8, 64), Widths(32, 8, 4, 40), Widths(16, 2, 8, 32)]
    masks = nested_masks(masked.layout, _random_scores(2, seed=1), widths)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = random_batch(model.config.vocab_size)
    encoder = EncodeModule(model)
    positions = batch["attention_mask"].bool()
    for w in widths:
        m = masks[width_key(w)]
        with torch.no_grad():
            shared = masked_call(encoder, masked_overrides(masked, m, "model."), batch, positions if kind == "mlm" else None)
        clone = copy.deepcopy(masked)
        clone.set_masks(m)
        dense = materialize(clone)
        assert dense.config.hidden_size == w.hidden and dense.config.intermediate_size == w.ffn
        with torch.no_grad():
            ref = EncodeModule(dense)(batch, positions if kind == "mlm" else None)
        for a, b in zip(shared.hidden, ref.hidden):
            assert (a[..., m.hidden] - b).abs().max().item() <= 1e-4
        assert (shared.hidden[-1][..., ~m.hidden] == 0).all()
        if kind == "mlm":
            assert (shared.mlm_logits - ref.mlm_logits).abs().max().item() <= 1e-4
    # The shared weights were never written: every width still sees the full model's weights.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nested_masks_are_nested():
    masked = prepare(make_model("base", heads=8))
    widths = [Widths(48, 6, 8, 96), Widths(32, 4, 8, 64), Widths(16, 2, 8, 32)]
    masks = nested_masks(masked.layout, _random_scores(2, seed=2), widths)
    ordered = [masks[width_key(w)] for w in widths]
    assert all(small.is_subset_of(big) for big, small in zip(ordered, ordered[1:]))
    assert ordered[0].is_subset_of(Masks.full(masked.layout))


def test_gradients_reach_shared_weights_only_through_kept_units():
    model = make_model("base", heads=8).train()
    masked = prepare(model)
    w = Widths(16, 2, 8, 32)
    m = nested_masks(masked.layout, _random_scores(2, seed=3), [w])[width_key(w)]
    out = masked_call(EncodeModule(model), masked_overrides(masked, m, "model."), random_batch(model.config.vocab_size))
    out.hidden[-1].sum().backward()
    grad = model.encoder.layer[0].intermediate.dense.weight.grad  # [ffn, hidden]
    assert grad[~m.ffn[0]].abs().sum() == 0 and grad[m.ffn[0]].abs().sum() > 0


def _rows(qualities, sparsities, roles=None):
    roles = roles or ["candidate"] * len(qualities)
    return [Candidate(Widths(16 * (i + 1), 1, 16 * (i + 1), 32), 0, s, r, q) for i, (q, s, r) in enumerate(zip(qualities, sparsities, roles))]


def test_lambda_tradeoff_picks_expected_candidate():
    q, s = [0.95, 0.90, 0.70], [0.2, 0.5, 0.8]
    assert choose(_rows(q, s), 0.0) == 0  # quality only: the widest
    assert choose(_rows(q, s), 0.5) == 1  # 0.95+0.10=1.05 < 0.90+0.25=1.15 > 0.70+0.40=1.10
    assert choose(_rows(q, s), 10.0) == 2  # sparsity dominates
    rows = _rows(q, s)
    choose(rows, 0.5)
    assert rows[1].score == pytest.approx(1.15)
    # The target row is scored for the table but never chosen, however good its score.
    assert choose(_rows([0.95, 0.90, 0.99], [0.2, 0.5, 0.9], ["candidate", "candidate", "target"]), 1.0) == 1
    assert choose(_rows([0.5, 0.5], [0.3, 0.3]), 1.0) == 0  # ties go to the wider candidate


def test_candidate_widths_lie_between_target_and_teacher():
    target = Widths(16, 2, 8, 32)
    cands = auto_candidates(FULL, target, 3, multiple=8)
    assert [c.heads for c in cands] == [6, 5, 4]  # 2 + round(6 * i / 4), i = 3, 2, 1
    for c in cands:
        assert c.is_stock and c.head_dim == 8 and 16 < c.hidden < 64 and 32 <= c.ffn <= 128 and c.ffn % 8 == 0
    assert assistant_widths(32, FULL, target) == Widths(32, 4, 8, 64)
    with pytest.raises(ValueError, match="between"):
        assistant_widths(8, FULL, target, heads=1)
    with pytest.raises(ValueError, match="strictly"):
        assistant_widths(16, FULL, target)


def test_assistant_option_and_recipe_section(tmp_path):
    r = validate_recipe({"teacher": "x", "assistant": {"mode": "auto", "lambda": 0.25}})
    assert r.assistant.lambda_ == 0.25 and "lambda: 0.25" in r.resolved_yaml()
    assert with_assistant_option(r, "off").assistant.mode == "off"
    fixed = with_assistant_option(r, "192").assistant
    assert fixed.mode == "fixed" and fixed.hidden == 192
    with pytest.raises(ValueError, match="auto, off or a hidden size"):
        with_assistant_option(r, "big")
    with pytest.raises(RecipeError, match="did you mean 'lambda'"):
        validate_recipe({"teacher": "x", "assistant": {"lamda": 1}})
    with pytest.raises(RecipeError, match="needs assistant.hidden"):
        validate_recipe({"teacher": "x", "assistant": {"mode": "fixed"}})
    assert split_steps(12, 0.5) == (6, 6) and split_steps(3, 0.9) == (2, 1)


def test_sandwich_is_deterministic_so_a_kill_inside_it_redoes_it_identically(teacher, corpus, tmp_path):
    r = validate_recipe(recipe_dict(teacher, corpus, tmp_path / "run"))
    a, b = run_sandwich(r), run_sandwich(r)
    assert [c["quality"] for c in a["candidates"]] == [c["quality"] for c in b["candidates"]]
    assert a["chosen"] == b["chosen"] and len(a["candidates"]) == 4 and a["candidates"][-1]["role"] == "target"
    assert all(c["score"] == pytest.approx(c["quality"] + r.assistant.lambda_ * c["sparsity"]) for c in a["candidates"])


class Killed(Exception):
    """Stands for a kill -9 after a step."""


def _killing(stage_dir: str, after: int):
    """trainer.distill, but the run into ``stage_dir`` dies after ``after`` steps (its checkpoint, if due, written)."""
    real = trainer.distill

    def kill(record):
        if record["step"] >= after:
            raise Killed(record["step"])

    def distill(recipe, out_dir=None, **kw):
        if Path(out_dir).name == stage_dir and not kw.get("resume"):
            kw["on_log"] = kill
        return real(recipe, out_dir=out_dir, **kw)

    return distill


@pytest.mark.parametrize("killed_stage", [assistant.STAGE1_DIR, assistant.STAGE2_DIR])
def test_two_stage_run_reaches_target_and_resumes_after_a_kill(teacher, corpus, tmp_path, monkeypatch, killed_stage):
    r = validate_recipe(recipe_dict(teacher, corpus, tmp_path / "run"))
    monkeypatch.setattr(trainer, "distill", _killing(killed_stage, 3))
    with pytest.raises(Killed):
        distill_with_assistant(r)
    assert (tmp_path / "run" / assistant.SANDWICH_FILE).is_file() and not (tmp_path / "run" / "student").exists()
    assert (tmp_path / "run" / assistant.STAGE1_DIR / "report.json").is_file() == (killed_stage == assistant.STAGE2_DIR)
    with pytest.raises(FileExistsError, match="--resume"):
        distill_with_assistant(r)
    calls = []
    monkeypatch.setattr(assistant, "run_sandwich", lambda *a, **k: calls.append(1))  # must be reused, not rerun
    report = distill_with_assistant(r, resume=True)
    assert not calls
    chosen = report["selection"]["chosen"]["widths"]
    assert report["assistant"]["widths"] == chosen and 16 < chosen["hidden"] < 64
    assert report["student"]["widths"] == {"hidden": 16, "heads": 2, "head_dim": 8, "ffn": 32}
    assert report["parity_max_abs_diff"] <= 1e-4 and report["steps"] == 12
    killed = report["stages"]["stage1" if killed_stage == assistant.STAGE1_DIR else "stage2"]
    assert killed["resumed_from_step"] == 2
    student = AutoModel.from_pretrained(tmp_path / "run" / "student")
    assert student.config.hidden_size == 16 and student.config.intermediate_size == 32
    stage2_teacher = json.loads((tmp_path / "run" / assistant.STAGE2_DIR / "report.json").read_text())["teacher"]
    assert stage2_teacher["widths"] == chosen
    assert json.loads((tmp_path / "run" / "report.json").read_text())["schema"] == "homoexport.assistant_report/1"
    assert (tmp_path / "run" / assistant.PLOT_FILE).is_file()
    # `homoexport report` shows the candidates and the metric-vs-sparsity plot with the choice
    from homoexport.reporting.report import write_report

    md = write_report([tmp_path / "run"], tmp_path / "rep")[0].read_text()
    assert "Teacher-assistant candidates" in md and md.count("| chosen |") == 1 and "| target |" in md
    assert "](assistant_tradeoff_run.png)" in md and (tmp_path / "rep" / "assistant_tradeoff_run.png").is_file()


def test_cli_fixed_assistant(teacher, corpus, tmp_path):
    import yaml

    path = tmp_path / "r.yaml"
    d = recipe_dict(teacher, corpus, tmp_path / "run")
    d["training"] = {"steps": 4, "batch_size": 4, "log_every": 1}
    path.write_text(yaml.safe_dump(d))
    result = CliRunner().invoke(app, ["distill", str(path), "--assistant", "32", "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["assistant"]["widths"]["hidden"] == 32 and report["student"]["widths"]["hidden"] == 16
    assert not (tmp_path / "run" / assistant.SANDWICH_FILE).exists()
    a = load_file(tmp_path / "run" / "student" / "model.safetensors")
    b = load_file(tmp_path / "run" / assistant.STAGE2_DIR / "student" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    bad = CliRunner().invoke(app, ["distill", str(path), "--assistant", "big", "--overwrite"])
    assert bad.exit_code == 2 and "auto, off or a hidden size" in bad.output
