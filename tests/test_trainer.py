"""HomoDistil training: exact target widths, monotone masks, zeroed pruned weights, resume, data parallel."""

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny import linear_output_dtypes, max_weight_difference, save_model_dir, synthetic_sentences, torchrun_distill
from transformers import AutoModel
from typer.testing import CliRunner

from homoexport.cli import app
from homoexport.config.recipe import validate_recipe
from homoexport.distillation.trainer import distill
from homoexport.pruning.mask_groups import MaskedModel


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n".join(synthetic_sentences(600, seed=1)))
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {"mlm": save_model_dir(root / "mlm", "mlm"), "base": save_model_dir(root / "base", "base", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)}


def recipe_dict(teacher: Path, corpus: Path, out: Path, **over) -> dict:
    r = {
        "teacher": str(teacher),
        "student": {"hidden": 32, "heads": 2, "ffn": 48},
        "data": {"train": [str(corpus)], "block_size": 32, "eval_blocks": 8},
        "pruning": {"interval": 3, "t_f": 0.25, "multiple": 8},
        "optimizer": {"lr": 1e-3, "warmup": 0},
        "training": {"steps": 24, "batch_size": 8, "log_every": 1},
        "output": str(out),
    }
    for key, value in over.items():
        section, _, field = key.partition("__")
        if field:
            r.setdefault(section, {})[field] = value
        else:
            r[section] = value
    return r


def test_distill_reaches_targets_with_monotone_masks_and_zero_pruned_weights(teachers, corpus, tmp_path, monkeypatch):
    seen = []
    original = MaskedModel.apply

    def checked_apply(self):
        original(self)
        assert self.pruned_weights_are_zero()
        seen.append((id(self), [m.clone() for m in self.masks.tensors()]))

    monkeypatch.setattr(MaskedModel, "apply", checked_apply)
    records = []
    report = distill(validate_recipe(recipe_dict(teachers["mlm"], corpus, tmp_path / "run")), on_log=records.append)
    assert len(seen) >= 24 and len({model for model, _ in seen}) >= 2  # pruning went on over a materialised student
    for (model, before), (same, after) in zip(seen, seen[1:]):
        assert model != same or all(not (a & ~b).any() for a, b in zip(after, before)), "a pruned unit came back"
    assert report["student"]["widths"] == {"hidden": 32, "heads": 2, "head_dim": 16, "ffn": 48}
    assert report["parity_max_abs_diff"] <= 1e-4 and report["mlm_kl_active"]
    widths = [r["widths"]["hidden"] for r in records]
    assert widths[0] == 64 and widths[-1] == 32 and widths == sorted(widths, reverse=True)
    # Student == teacher at step 0, so the KL starts near 0 and grows with pruning (the decrease at a fixed
    # width is the next test); here every term must stay finite.
    assert all(torch.isfinite(torch.tensor(v)) for r in records for k, v in r.items() if k.startswith("loss"))
    student = AutoModel.from_pretrained(tmp_path / "run" / "student")
    assert student.config.hidden_size == 32 and student.config.intermediate_size == 48
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 24
    assert "# versions:" in (tmp_path / "run" / "recipe.resolved.yaml").read_text()


def test_loss_decreases_at_fixed_width(teachers, corpus, tmp_path):
    """With pruning done at step 0 (one-shot), distillation must pull the student back toward the teacher."""
    records = []
    r = recipe_dict(teachers["base"], corpus, tmp_path / "run", pruning={"schedule": "one_shot", "score_batches": 2},
                    training={"steps": 40, "batch_size": 8, "log_every": 1})
    report = distill(validate_recipe(r), on_log=records.append)
    assert not report["mlm_kl_active"] and "no MLM head" in report["mlm_kl_note"]
    first = sum(r["loss"] for r in records[:5]) / 5
    last = sum(r["loss"] for r in records[-5:]) / 5
    assert last < 0.85 * first
    assert all(r["widths"]["hidden"] == 32 for r in records)


class Killed(Exception):
    """Stands for a kill -9 after a step (its checkpoint, if due, already written)."""


def kill_after(step: int):
    def on_log(record):
        if record["step"] >= step:
            raise Killed(record["step"])

    return on_log


def test_kill_and_resume_reproduces_uninterrupted_run_bitwise(teachers, corpus, tmp_path, caplog):
    base = recipe_dict(teachers["mlm"], corpus, tmp_path / "full", training={"steps": 16, "batch_size": 8, "log_every": 1, "checkpoint_every": 4})
    distill(validate_recipe(base))
    killed = dict(base, output=str(tmp_path / "killed"))
    with pytest.raises(Killed):
        distill(validate_recipe(killed), on_log=kill_after(10))  # "dies" after step 10; last checkpoint at 8
    assert sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("*.pt")) == ["step-00000008.pt"]  # only the newest is kept
    state = torch.load(tmp_path / "killed" / "checkpoints" / "step-00000008.pt", weights_only=False)
    assert state["stages"] and state["dense_from"] is None  # the resume replays the switches to smaller students
    assert not (tmp_path / "killed" / "student").exists()
    with caplog.at_level("INFO", logger="homoexport"):
        report = distill(validate_recipe(killed), resume=True)
    assert report["resumed_from_step"] == 8 and "at step 8 of 16" in caplog.text
    assert report["wall_time_s"] > report["wall_time_s_since_resume"] > 0 and report["wall_time_from_step"] == 0  # steps 1-8 count
    a = load_file(tmp_path / "full" / "student" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "student" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))


def test_the_student_turns_dense_at_its_final_width_and_trains_on_as_the_masked_one_would(teachers, corpus, tmp_path):
    """pruning.materialize: once the target is reached for good, the loop trains the materialised student (parity-checked),
    with the Adam moments sliced, so the run goes on as the masked one does; without dropout the two students agree."""
    r = recipe_dict(teachers["base"], corpus, tmp_path / "dense", training={"steps": 16, "batch_size": 8, "log_every": 1, "precision": "fp32"})
    records = []
    report = distill(validate_recipe(r), on_log=records.append)
    first_dense = next(rec["step"] for rec in records if rec["dense"])
    assert report["dense_from_step"] == first_dense < 16 and report["parity_max_abs_diff"] <= 1e-4
    assert all(rec["dense"] == (rec["step"] >= first_dense) for rec in records)
    assert all(rec["widths"]["hidden"] == 32 for rec in records if rec["dense"])
    masked = dict(r, output=str(tmp_path / "masked"), pruning={**r["pruning"], "materialize": False})
    kept_masked = distill(validate_recipe(masked))
    assert kept_masked["dense_from_step"] is None
    assert report["final_loss_terms"] == pytest.approx(kept_masked["final_loss_terms"], rel=1e-4, abs=1e-6)
    assert max_weight_difference(tmp_path / "dense" / "student", tmp_path / "masked" / "student") < 1e-5


@pytest.mark.parametrize("materialize_at,masked_phase", [(None, (2, 1)), (0.9, (1, 1))])
def test_the_full_width_student_and_its_optimizer_state_are_freed_at_the_dense_switch(teachers, corpus, tmp_path, materialize_at, masked_phase):
    """After the switch only the teacher is a full-width model, and the only Adam moments are the dense student's; with
    pruning.materialize_at the full-width student is gone before the last masked step, at the first switch on the way down."""
    import gc

    from transformers import AutoConfig, PreTrainedModel

    full = AutoConfig.from_pretrained(teachers["base"]).hidden_size
    seen: dict[bool, tuple[int, int]] = {}

    def count(record):
        gc.collect()
        models = sum(isinstance(o, PreTrainedModel) and o.config.hidden_size == full and o.base_model is o for o in gc.get_objects())
        moments = sum(isinstance(o, torch.optim.Optimizer) and not hasattr(o, "optimizer") and any(o.state.values())  # not accelerate's wrapper
                      for o in gc.get_objects())
        seen[record["dense"]] = (models, moments)  # each phase's last step

    r = recipe_dict(teachers["base"], corpus, tmp_path / "run", training={"steps": 16, "batch_size": 8, "log_every": 1, "precision": "fp32"})
    r["pruning"]["materialize_at"] = materialize_at
    distill(validate_recipe(r), on_log=count)
    assert seen == {False: masked_phase, True: (1, 1)}


def test_kill_after_the_dense_switch_and_resume_reproduces_the_run_bitwise(teachers, corpus, tmp_path, caplog):
    base = recipe_dict(teachers["mlm"], corpus, tmp_path / "full", training={"steps": 16, "batch_size": 8, "log_every": 1, "checkpoint_every": 2})
    full = distill(validate_recipe(base))
    assert full["dense_from_step"] is not None and full["dense_from_step"] < 14
    killed = dict(base, output=str(tmp_path / "killed"))
    with pytest.raises(Killed):
        distill(validate_recipe(killed), on_log=kill_after(15))  # last checkpoint at 14, after the switch
    state = torch.load(tmp_path / "killed" / "checkpoints" / "step-00000014.pt", weights_only=False)
    assert state["dense_from"] is not None and state["importance"]["mean"] == {}  # scores dropped at the dense switch
    with caplog.at_level("INFO", logger="homoexport"):
        report = distill(validate_recipe(killed), resume=True)
    assert report["resumed_from_step"] == 14 and "dense student" in caplog.text
    assert report["dense_from_step"] == full["dense_from_step"] and report["parity_max_abs_diff"] == full["parity_max_abs_diff"]
    assert max_weight_difference(tmp_path / "full" / "student", tmp_path / "killed" / "student") == 0.0


def test_a_checkpoint_from_before_pruning_materialize_resumes_only_as_it_was_trained(tmp_path):
    """Checkpoints written before the key existed: the task loop kept it as task.materialize, the task-agnostic loop
    never switched; either resumes under a recipe that says the same, and a different one names the key."""
    from homoexport.distillation.checkpoint import check_same_recipe, resumable_fields

    r = recipe_dict(Path("teacher"), Path("corpus.txt"), tmp_path / "run")
    old = resumable_fields(validate_recipe(r))
    old["pruning"].pop("materialize")
    with pytest.raises(ValueError, match=r"recipe changed.*pruning\.materialize"):
        check_same_recipe(old, validate_recipe(r), tmp_path / "step.pt")
    check_same_recipe(old, validate_recipe(dict(r, pruning={**r["pruning"], "materialize": False})), tmp_path / "step.pt")


def test_finished_run_drops_checkpoints_and_resume_says_finished(teachers, corpus, tmp_path, caplog):
    r = recipe_dict(teachers["mlm"], corpus, tmp_path / "run", training={"steps": 6, "batch_size": 8, "checkpoint_every": 2})
    first = distill(validate_recipe(r))
    assert first["schema"] == "homoexport.distill/1"
    assert not (tmp_path / "run" / "checkpoints").exists()  # resume needs nothing once the student is saved
    with caplog.at_level("INFO", logger="homoexport"):
        again = distill(validate_recipe(r), resume=True)
    assert again == first and "already finished all 6 steps" in caplog.text
    changed = dict(r, training={**r["training"], "steps": 8})
    with pytest.raises(ValueError, match="recipe changed"):
        distill(validate_recipe(changed), resume=True)
    kept = dict(r, output=str(tmp_path / "kept"), training={**r["training"], "keep_checkpoints": True})
    distill(validate_recipe(kept))
    assert [p.name for p in (tmp_path / "kept" / "checkpoints").iterdir()] == ["step-00000006.pt"]


def test_overwrite_replaces_the_old_run_so_resume_cannot_pick_up_stale_checkpoints(teachers, corpus, tmp_path):
    long = recipe_dict(teachers["mlm"], corpus, tmp_path / "run", training={"steps": 12, "batch_size": 8, "checkpoint_every": 4})
    distill(validate_recipe(long))
    short = recipe_dict(teachers["mlm"], corpus, tmp_path / "run", training={"steps": 8, "batch_size": 8, "checkpoint_every": 4, "log_every": 1})
    with pytest.raises(Killed):
        distill(validate_recipe(short), overwrite=True, on_log=kill_after(5))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000004.pt"]
    assert not (tmp_path / "run" / "report.json").exists() and not (tmp_path / "run" / "student").exists()
    assert distill(validate_recipe(short), resume=True)["resumed_from_step"] == 4


def test_resume_refuses_a_changed_recipe(teachers, corpus, tmp_path):
    r = recipe_dict(teachers["mlm"], corpus, tmp_path / "run", training={"steps": 8, "batch_size": 8, "checkpoint_every": 4, "log_every": 1})
    with pytest.raises(Killed):
        distill(validate_recipe(r), on_log=kill_after(5))
    changed = dict(r, optimizer={"lr": 5e-3, "warmup": 0})
    with pytest.raises(ValueError, match=r"recipe changed.*optimizer\.lr"):
        distill(validate_recipe(changed), resume=True)


def test_resume_refuses_auto_resolving_to_another_precision(teachers, corpus, tmp_path, monkeypatch):
    from homoexport.distillation import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)  # auto is fp32 on the machine that started it
    r = recipe_dict(teachers["mlm"], corpus, tmp_path / "run", training={"steps": 8, "batch_size": 8, "checkpoint_every": 4, "log_every": 1})
    with pytest.raises(Killed):
        distill(validate_recipe(r), on_log=kill_after(5))
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # and bf16 on the one resuming it
    with pytest.raises(ValueError, match=r"trained in fp32.*training\.precision auto is bf16.*--set training\.precision=fp32"):
        distill(validate_recipe(r), resume=True)
    pinned = dict(r, training={**r["training"], "precision": "fp32"})  # what auto chose there: the same run
    report = distill(validate_recipe(pinned), resume=True)
    assert report["resumed_from_step"] == 4 and report["precision"] == "fp32"


def test_non_empty_output_needs_resume_or_overwrite(teachers, corpus, tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "x").write_text("")
    with pytest.raises(FileExistsError, match="--resume"):
        distill(validate_recipe(recipe_dict(teachers["mlm"], corpus, tmp_path / "run")))


@pytest.mark.parametrize("init,over", [("truncate", {"student": {"layers": 1}, "losses": {"layer_mapping": "uniform"}, "pruning": {"schedule": "none"}}),
                                       ("random", {"student": {"hidden": 32, "heads": 2, "ffn": 48, "layers": 1},
                                                   "losses": {"layer_mapping": "last", "relation": 1.0, "relation_heads": 4, "attention": 0.0,
                                                              "hidden": 0.0, "embedding": 0.0, "mlm": 1.0, "kl": 1.0},
                                                   "pruning": {"schedule": "none"}})])
def test_related_initialisations_train_and_save(teachers, corpus, tmp_path, init, over):
    r = recipe_dict(teachers["mlm"], corpus, tmp_path / "run", init=init, training={"steps": 4, "batch_size": 8, "log_every": 1}, **over)
    report = distill(validate_recipe(r))
    assert report["student"]["layers"] == 1
    if init == "random":
        assert "relation" in report["active_loss_terms"] and report["student"]["widths"]["hidden"] == 32


def test_cli_bad_data_path_fails_cleanly_and_leaves_no_student(teachers, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(teachers["mlm"], tmp_path / "missing.txt", tmp_path / "run")))
    result = CliRunner().invoke(app, ["distill", str(path), "--no-progress"])
    assert result.exit_code == 2 and "missing.txt" in result.output
    assert not (tmp_path / "run" / "student").exists()


def test_cli_empty_corpus_fails_cleanly(teachers, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(teachers["mlm"], empty, tmp_path / "run")))
    result = CliRunner().invoke(app, ["distill", str(path), "--no-progress"])
    assert result.exit_code == 2 and "empty.txt" in result.output


def test_cli_schedule_longer_than_the_run_names_both_keys_and_leaves_nothing(teachers, corpus, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe_dict(teachers["mlm"], corpus, tmp_path / "run", pruning__t_i=0.5, pruning__t_f=0.75)))
    result = CliRunner().invoke(app, ["distill", str(path), "--no-progress"])
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "pruning.t_i (0.5: 12 steps)" in message and "pruning.t_f (0.75: 18 steps)" in message and "24 steps" in message
    assert not (tmp_path / "run").exists()


def test_cli_recipe_typo_names_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("teacher: x\ntraning:\n  steps: 3\n")
    result = CliRunner().invoke(app, ["distill", str(path)])
    assert result.exit_code == 2 and "traning" in result.output and "did you mean 'training'" in result.output


def test_bf16_precision_autocasts_the_step_and_is_reported(teachers, corpus, tmp_path, monkeypatch):
    seen = linear_output_dtypes(monkeypatch)
    r = recipe_dict(teachers["mlm"], corpus, tmp_path / "bf16", training={"steps": 6, "batch_size": 8, "log_every": 1, "precision": "bf16"})
    report = distill(validate_recipe(r))
    assert report["precision"] == "bf16" and torch.bfloat16 in seen
    assert report["parity_max_abs_diff"] <= 1e-4  # the saved student is the fp32 weights, materialised exactly
    assert {p.dtype for p in AutoModel.from_pretrained(tmp_path / "bf16" / "student").parameters()} == {torch.float32}
    seen.clear()
    r = recipe_dict(teachers["mlm"], corpus, tmp_path / "fp32", training={"steps": 6, "batch_size": 8, "log_every": 1, "precision": "fp32"})
    assert distill(validate_recipe(r))["precision"] == "fp32" and seen == {torch.float32}


@pytest.mark.slow
def test_two_process_gloo_matches_single_process(teachers, corpus, tmp_path):
    """2 CPU processes (gloo, launched with torchrun; accelerate's own CPU multi-process launcher needs MPI):
    same masks on both ranks (checked by the trainer at every update) and, without dropout, the same
    student as one process at the same global batch. In fp32: bf16 rounds a whole batch and its halves differently."""
    r = recipe_dict(teachers["base"], corpus, tmp_path / "one", training={"steps": 8, "batch_size": 8, "log_every": 1, "precision": "fp32"})
    r["pruning"]["interval"] = 2
    single = distill(validate_recipe(r))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(dict(r, output=str(tmp_path / "two"))))
    torchrun_distill(path, port=29533)
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2 and two["student"]["widths"] == single["student"]["widths"]
    assert max_weight_difference(tmp_path / "one" / "student", tmp_path / "two" / "student") < 1e-4


def test_cli_distill_with_params_budget_plans_then_trains(teachers, corpus, tmp_path, monkeypatch):
    """`distill --budget params=…` chooses the widths (no timing needed for a params budget) and records the plan."""
    r = recipe_dict(teachers["base"], corpus, tmp_path / "run", training={"steps": 6, "batch_size": 8, "log_every": 1})
    r["student"] = {}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    teacher_params = sum(p.numel() for p in AutoModel.from_pretrained(teachers["base"]).parameters())
    budget = int(teacher_params * 0.8)
    monkeypatch.setenv("HOMOEXPORT_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["distill", str(path), "--no-progress", "--budget", f"params={budget}"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["plan"] is not None
    assert report["student"]["parameters"] <= budget < teacher_params
    assert report["student"]["widths"]["hidden"] < 64


def test_cli_distill_budget_over_depths_trains_a_shallower_student(teachers, corpus, tmp_path, monkeypatch):
    """`distill --budget … --layers 1` plans at depth 1 and trains that student from a teacher layer (init truncate)."""
    r = recipe_dict(teachers["base"], corpus, tmp_path / "run", training={"steps": 6, "batch_size": 8, "log_every": 1})
    r["student"] = {}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(r))
    monkeypatch.setenv("HOMOEXPORT_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["distill", str(path), "--no-progress", "--budget", "params=50M", "--layers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["plan"]["chosen"]["layers"] == 1 and [d["layers"] for d in report["plan"]["depths"]] == [1]
    assert AutoModel.from_pretrained(tmp_path / "run" / "student").config.num_hidden_layers == 1
    resolved = yaml.safe_load((tmp_path / "run" / "recipe.resolved.yaml").read_text())
    assert (resolved["init"], resolved["student"]["layers"], resolved["losses"]["layer_mapping"]) == ("truncate", 1, "uniform")
    bad = CliRunner().invoke(app, ["distill", str(path), "--no-progress", "--layers", "1", "--out", str(tmp_path / "other")])
    assert bad.exit_code == 2 and "need a budget" in bad.output


def test_sentence_embedding_terms_train_a_base_encoder(teachers, corpus, tmp_path):
    """A teacher without an MLM head (a sentence encoder) distilled on its pooled embeddings and their similarity structure."""
    r = recipe_dict(teachers["base"], corpus, tmp_path / "run", losses={"hidden": 0.0, "attention": 0.0, "embedding": 0.0, "sentence": 1.0,
                                                                          "similarity": 1.0},
                    training={"steps": 8, "batch_size": 8, "log_every": 1})
    records = []
    report = distill(validate_recipe(r), on_log=records.append)
    assert set(report["active_loss_terms"]) == {"sentence", "similarity"} and report["grouping_s"] is None
    assert all("loss_sentence" in rec and "loss_similarity" in rec for rec in records)
    assert report["parity_max_abs_diff"] <= 1e-4
    # The same on sentence rows (one padded row per sentence): padding never counts, parity holds.
    r["data"] = {**r["data"], "unit": "sentence"}
    r["output"] = str(tmp_path / "sentences")
    report = distill(validate_recipe(r))
    assert report["parity_max_abs_diff"] <= 1e-4 and report["student"]["widths"]["hidden"] == 32


def test_neighbour_batches_and_the_contrastive_term_train_a_sentence_encoder(teachers, corpus, tmp_path, caplog):
    """Rows grouped by the teacher's embedding share a batch; the contrastive term is logged and the run resumes exactly."""
    r = recipe_dict(teachers["base"], corpus, tmp_path / "run", losses={"hidden": 0.0, "attention": 0.0, "embedding": 0.0, "contrastive": 1.0},
                    data={"train": [str(corpus)], "block_size": 32, "eval_blocks": 8, "unit": "sentence", "batching": "neighbours",
                          "cache_dir": str(tmp_path / "cache")},
                    training={"steps": 8, "batch_size": 16, "log_every": 1, "checkpoint_every": 4, "precision": "fp32"})
    records = []
    with caplog.at_level("INFO", logger="homoexport"):
        report = distill(validate_recipe(r), on_log=records.append)
    assert "groups of 8 sentences by the teacher's embedding" in caplog.text
    assert len(list((tmp_path / "cache").glob("groups-*.json"))) == 1  # kept beside the packed rows for the next run
    assert len(list((tmp_path / "cache").glob("sentences-*.npy"))) == 1  # the teacher's vectors, read by row at each step
    caplog.clear()
    assert set(report["active_loss_terms"]) == {"contrastive"} and report["grouping_s"] >= 0 and report["teacher_sentences_s"] >= 0
    losses = [rec["loss_contrastive"] for rec in records]
    assert losses[0] == pytest.approx(0.0, abs=1e-6) and losses[-1] > 0  # a copy of the teacher ranks as it does, until pruned
    killed = dict(r, output=str(tmp_path / "killed"))
    with pytest.raises(Killed):
        distill(validate_recipe(killed), on_log=kill_after(6))
    with caplog.at_level("INFO", logger="homoexport"):
        distill(validate_recipe(killed), resume=True)
    assert "groups of 8 sentences from" in caplog.text and "rows with the teacher" not in caplog.text  # read back, not recomputed
    assert "rows once" not in caplog.text
    assert max_weight_difference(tmp_path / "run" / "student", tmp_path / "killed" / "student") == 0.0


def test_snapshots_keep_the_student_along_the_run_without_changing_it(teachers, corpus, tmp_path):
    """snapshot_every saves the materialised student at those steps; the run itself is the same as without them."""
    base = recipe_dict(teachers["base"], corpus, tmp_path / "plain", training={"steps": 8, "batch_size": 8, "log_every": 1})
    distill(validate_recipe(base))
    snap = {**base, "output": str(tmp_path / "snap"), "training": {**base["training"], "snapshot_every": 1}}
    distill(validate_recipe(snap))
    records = [json.loads(line) for line in (tmp_path / "snap" / "train_log.jsonl").read_text().splitlines()]
    stock = {r["step"] for r in records if r["widths"]["heads"] * r["widths"]["head_dim"] == r["widths"]["hidden"]}
    shots = sorted(p.name for p in (tmp_path / "snap" / "snapshots").iterdir())
    assert shots == [f"step-{s:08d}" for s in sorted(stock) if s < 8] and "step-00000007" in shots  # none at non-stock widths
    last = AutoModel.from_pretrained(tmp_path / "snap" / "snapshots" / "step-00000007")  # at the target from step 7
    assert last.config.hidden_size == validate_recipe(base).student.hidden
    a = load_file(tmp_path / "plain" / "student" / "model.safetensors")
    b = load_file(tmp_path / "snap" / "student" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_training_clock_counts_the_whole_run_or_says_from_which_step():
    from homoexport.distillation.checkpoint import TrainingClock

    now = time.time()
    assert TrainingClock(started=now - 5).report()["wall_time_s_since_resume"] is None
    carried = TrainingClock(100.0, 600, started=now - 5).report()
    assert carried["wall_time_s"] == pytest.approx(105, abs=1) and carried["wall_time_from_step"] == 0
    legacy = TrainingClock(None, 600, started=now - 5).report()  # a checkpoint written before they carried the time
    assert legacy["wall_time_from_step"] == 600 and legacy["wall_time_s"] == legacy["wall_time_s_since_resume"] == pytest.approx(5, abs=1)
