"""Task-specific HomoDistil on tiny classifiers: data loaders, losses, dense continuation, resume, CLI."""

from __future__ import annotations

import gc
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import WORDS, linear_output_dtypes, max_weight_difference, save_model_dir, synthetic_sentences, torchrun_distill
from transformers import AutoConfig, AutoModelForSequenceClassification, PreTrainedModel
from typer.testing import CliRunner

from homoexport.cli import app
from homoexport.config.recipe import LossSpec, validate_recipe
from homoexport.distillation.task import TaskLoss, distill_task
from homoexport.distillation.task_data import UNLABELLED, TaskDataError, load_files, unlabelled_rows
from homoexport.errors import UsageError
from homoexport.evaluation.glue_data import GlueDataError


def write_rows(path: Path, n: int, seed: int, labels=("neg", "pos"), pair: bool = False) -> Path:
    rng = random.Random(seed)
    sentences = synthetic_sentences(n, seed=seed, max_words=10)
    rows = []
    for s in sentences:
        row = {"sentence": s, "label": labels[int("good" in s or "great" in s)]}
        if pair:
            row["other"] = " ".join(rng.choice(WORDS) for _ in range(5))
        rows.append(row)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def task_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_rows(tmp_path / "train.jsonl", 48, 0), write_rows(tmp_path / "dev.jsonl", 16, 1)


@pytest.fixture()
def teacher_dir(tmp_path: Path) -> Path:
    d = save_model_dir(tmp_path / "teacher", kind="cls", num_labels=2)
    model = AutoModelForSequenceClassification.from_pretrained(d)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(d)
    return d


def task_recipe(teacher: Path, files: tuple[Path, Path], out: Path, **overrides) -> dict:
    recipe = {
        "name": "tiny-task", "teacher": str(teacher), "student": {"hidden": 32, "heads": 2, "ffn": 64},
        "task": {"train_file": str(files[0]), "dev_file": str(files[1]), "epochs": 4, "max_length": 24, "export": False},
        "losses": {"kl": 1.0, "temperature": 2.0, "hidden": 1.0, "attention": 1.0, "embedding": 1.0},
        "pruning": {"t_f": 0.5, "interval": 2, "multiple": 8},
        "optimizer": {"lr": 1e-3, "warmup": 0.0},
        "training": {"batch_size": 8, "log_every": 1, "checkpoint_every": 5},
        "output": str(out),
    }
    for key, value in overrides.items():
        node = recipe
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return recipe


def test_file_loader_maps_named_labels_and_rejects_bad_input(tmp_path: Path, task_files):
    data = load_files(*task_files, "sentence", None, "label", ["neg", "pos"], regression=False)
    assert len(data.train) == 48 and set(data.train["label"]) <= {0, 1} and data.task.metrics == ("accuracy",)
    with pytest.raises(TaskDataError, match=r"train.jsonl: no column 'text'"):
        load_files(task_files[0], task_files[1], "text", None, "label", None, regression=False)
    bad = write_rows(tmp_path / "bad.jsonl", 40, 2, labels=("neg", "maybe"))
    with pytest.raises(TaskDataError, match=r"bad.jsonl: column 'label', row \d+: unknown label 'maybe' \(allowed: neg, pos, or class ids 0-1\)"):
        load_files(bad, task_files[1], "sentence", None, "label", ["neg", "pos"], regression=False)
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(TaskDataError, match="unknown file type '.xlsx'"):
        load_files(tmp_path / "x.xlsx", task_files[1], "sentence", None, "label", None, regression=False)
    csv = tmp_path / "reg.csv"
    csv.write_text("sentence,score\nthe cat,1.5\na dog,oops\n")
    with pytest.raises(TaskDataError, match=r"reg.csv: column 'score', row 2: 'oops' is not a number"):
        load_files(csv, csv, "sentence", None, "score", None, regression=True)
    one = write_rows(tmp_path / "one.jsonl", 1, 3)
    with pytest.raises(TaskDataError, match=r"one.jsonl: 1 row; a dev file needs at least 2"):
        load_files(task_files[0], one, "sentence", None, "label", ["neg", "pos"], regression=False)
    header_only = tmp_path / "empty.csv"
    header_only.write_text("sentence,label\n")
    with pytest.raises(TaskDataError, match=r"empty.csv: 0 rows$"):
        load_files(header_only, task_files[1], "sentence", None, "label", ["neg", "pos"], regression=False)
    blank = tmp_path / "blank.csv"
    blank.write_text("sentence,label\nthe cat,pos\na dog,\n")
    with pytest.raises(TaskDataError, match=r"blank.csv: column 'label', row 2: empty label"):
        load_files(blank, task_files[1], "sentence", None, "label", ["neg", "pos"], regression=False)


def test_unlabelled_rows_join_without_labels_and_never_repeat_dev_text(tmp_path: Path, task_files):
    data = load_files(*task_files, "sentence", None, "label", ["neg", "pos"], regression=False)
    extra_file = write_rows(tmp_path / "extra.jsonl", 30, 7)
    with extra_file.open("a") as f:  # a dev sentence in the unlabelled file is dropped
        f.write(json.dumps({"sentence": data.dev["text_a"][0], "label": "neg"}) + "\n")
    rows = unlabelled_rows([str(extra_file)], data, None, "sentence", None, None)
    assert len(rows) == 30 and set(rows["label"]) == {UNLABELLED} and data.dev["text_a"][0] not in rows["text_a"]
    assert rows.features == data.train.features
    assert len(unlabelled_rows([str(extra_file)], data, None, "sentence", None, 12, seed=1)) == 12
    # GLUE sources read the text of a task's file: a pair file gives a single-sentence task both of its texts.
    glue = tmp_path / "glue"
    (glue / "RTE").mkdir(parents=True)
    (glue / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tthe cat sat\ta cat\tentailment\n"
                                            "1\tdogs bark\tcats bark\tnot_entailment\n")
    assert unlabelled_rows(["glue:rte"], data, glue, "sentence", None, None)["text_a"] == ["the cat sat", "dogs bark", "a cat", "cats bark"]
    pairs = load_files(write_rows(tmp_path / "ptrain.jsonl", 8, 0, pair=True), write_rows(tmp_path / "pdev.jsonl", 4, 1, pair=True),
                       "sentence", "other", "label", ["neg", "pos"], regression=False)
    got = unlabelled_rows(["glue:RTE/train"], pairs, glue, "sentence", "other", None)
    assert got["text_b"] == ["a cat", "cats bark"] and got["label"] == [UNLABELLED] * 2
    (glue / "SST-2").mkdir()
    (glue / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood fun\t1\n")
    with pytest.raises(TaskDataError, match=r"glue:sst2: has no sentence pairs"):
        unlabelled_rows(["glue:sst2"], pairs, glue, "sentence", "other", None)
    # A test file's inputs, by its header (GLUE publishes no test labels); CoLA's test file has a header, its others none.
    (glue / "RTE" / "test.tsv").write_text("index\tsentence1\tsentence2\n0\tbirds fly\tsome birds fly\n")
    got = unlabelled_rows(["glue:rte/test"], pairs, glue, "sentence", "other", None)
    assert got["text_a"] == ["birds fly"] and got["text_b"] == ["some birds fly"] and got["label"] == [UNLABELLED]
    (glue / "CoLA").mkdir()
    (glue / "CoLA" / "test.tsv").write_text("index\tsentence\n0\tThe book was read.\n1\tRead book the was.\n")
    assert unlabelled_rows(["glue:cola/test"], data, glue, "sentence", None, None)["text_a"] == ["The book was read.", "Read book the was."]
    (glue / "CoLA" / "test.tsv").write_text("index\tsentence\n0\tA tab\there.\n")
    with pytest.raises(GlueDataError, match=r"CoLA/test.tsv:2: expected 2 tab-separated columns, found 3"):
        unlabelled_rows(["glue:cola/test"], data, glue, "sentence", None, None)
    with pytest.raises(TaskDataError, match=r"glue:rte/tests: unknown split 'tests' for rte \(allowed: train, dev, test\)"):
        unlabelled_rows(["glue:rte/tests"], data, glue, "sentence", None, None)
    with pytest.raises(TaskDataError, match=r"extra.jsonl: no column 'text'"):
        unlabelled_rows([str(extra_file)], data, None, "text", None, None)
    with pytest.raises(TaskDataError, match="no rows left once the dev set's text is removed"):
        unlabelled_rows([str(task_files[1])], data, None, "sentence", None, None)


def test_hard_label_term_skips_rows_the_teacher_labels_alone():
    spec = LossSpec(kl=1.0, temperature=2.0, hidden=0.0, attention=0.0, embedding=0.0)
    mask = torch.ones(2, 5)
    s, t = _outputs(torch.tensor([[0.0, 0.0], [3.0, -3.0]])), _outputs(torch.tensor([[1.0, -1.0], [0.0, 1.0]]))
    loss = TaskLoss(spec, 1.0, False, 8, 8, 2, 2)
    _, mixed = loss(s, t, mask, torch.tensor([1, UNLABELLED]), None)
    assert float(mixed["label"]) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-5)  # only the first row's gold label
    total, none = loss(s, t, mask, torch.tensor([UNLABELLED, UNLABELLED]), None)
    assert float(none["label"]) == 0.0 and torch.isfinite(total) and float(total) == pytest.approx(float(none["prediction"]))
    reg = TaskLoss(spec, 1.0, True, 8, 8, 2, 2)
    _, terms = reg(_outputs(torch.tensor([[1.0], [2.0]])), _outputs(torch.tensor([[3.0], [2.0]])), mask, torch.tensor([3.0, float("nan")]), None)
    assert float(terms["label"]) == pytest.approx(4.0)


def _outputs(logits, hidden_dim=8, layers=2):
    from types import SimpleNamespace

    torch.manual_seed(len(logits))
    hidden = tuple(torch.randn(2, 5, hidden_dim) for _ in range(layers + 1))
    return SimpleNamespace(logits=logits, hidden_states=hidden, attentions=None)


def test_task_loss_classification_and_regression():
    spec = LossSpec(kl=1.0, temperature=2.0, hidden=0.0, attention=0.0, embedding=0.0)
    mask = torch.ones(2, 5)
    t = _outputs(torch.tensor([[2.0, -1.0], [0.0, 1.0]]))
    same, terms = TaskLoss(spec, 0.0, False, 8, 8, 2, 2)(t, t, mask, torch.tensor([0, 1]), None)
    assert float(same) == pytest.approx(0.0, abs=1e-6) and set(terms) == {"prediction"}
    s = _outputs(torch.tensor([[0.0, 0.0], [0.0, 0.0]]))
    loss, terms = TaskLoss(spec, 0.5, False, 8, 8, 2, 2)(s, t, mask, torch.tensor([0, 1]), None)
    p_t = torch.softmax(t.logits / 2, -1)
    kl = (p_t * (p_t.log() - torch.log(torch.tensor(0.5)))).sum(-1).mean() * 4
    assert float(terms["prediction"]) == pytest.approx(float(kl), rel=1e-5)
    assert float(terms["label"]) == pytest.approx(float(torch.log(torch.tensor(2.0))), rel=1e-5)
    assert float(loss) == pytest.approx(float(kl) + 0.5 * float(terms["label"]), rel=1e-5)
    reg = TaskLoss(spec, 1.0, True, 8, 8, 2, 2)
    loss, terms = reg(_outputs(torch.tensor([[1.0], [2.0]])), _outputs(torch.tensor([[3.0], [2.0]])), mask, torch.tensor([1.0, 4.0]), None)
    assert float(terms["prediction"]) == pytest.approx(2.0) and float(terms["label"]) == pytest.approx(2.0)


def test_tiny_task_distillation_end_to_end(tmp_path: Path, teacher_dir: Path, task_files):
    recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run"))
    records = []
    report = distill_task(recipe, on_log=records.append)
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    assert type(student).__name__ == "BertForSequenceClassification"
    assert (student.config.hidden_size, student.config.num_attention_heads, student.config.intermediate_size) == (32, 2, 64)
    assert student.classifier.weight.shape == (2, 32) and student.config.id2label[1] == "pos"
    assert report["schema"] == "homoexport.task_distill/2" and report["steps"] == 24
    assert set(report["teacher"]["dev"]) == {"accuracy"} and report["curve"][-1]["step"] == 24
    # The run switched to the dense student once the target was reached, and the dense phase's steps trained it.
    dense_steps = [r["step"] for r in records if r["dense"]]
    assert dense_steps and dense_steps[0] <= 13 and all(r["widths"]["hidden"] == 32 for r in records if r["dense"])
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    # The saved student is what the loop scored.
    from homoexport.distillation.models import load_tokenizer
    from homoexport.distillation.task import evaluate, load_task_data
    from homoexport.distillation.task_data import TaskBatcher

    data = load_task_data(recipe, ["neg", "pos"], False)
    dev = TaskBatcher(data.dev, load_tokenizer(teacher_dir), 64, 24, shuffle=False)
    assert evaluate(student, dev, data.task) == pytest.approx(report["student"]["dev"])


def test_task_distillation_with_unlabelled_text(tmp_path: Path, teacher_dir: Path, task_files):
    extra = write_rows(tmp_path / "extra.jsonl", 24, 5)
    recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{
        "task.unlabelled": [str(extra)], "task.max_unlabelled_samples": 16, "task.hard_label": 0.5, "task.epochs": 2}))
    report = distill_task(recipe)
    assert report["steps"] == 2 * (48 + 16) // 8 and report["data"]["unlabelled_rows"] == 16 and report["data"]["train_rows"] == 64
    assert report["data"]["word_swapped_rows"] == 0
    assert "16 unlabelled rows from" in report["data"]["source"]
    assert all(np.isfinite(v) for v in report["student"]["dev"].values())


def _neighbour_table(tokenizer, close: dict[str, str]) -> torch.Tensor:
    """Random word embeddings in which each key of ``close`` sits next to its value."""
    torch.manual_seed(0)
    table = torch.randn(len(tokenizer.get_vocab()), 16)
    vocab = tokenizer.get_vocab()
    for word, near in close.items():
        table[vocab[word]] = table[vocab[near]] + 0.01
    return table


def test_word_neighbours_are_whole_words_nearest_in_the_embedding_table(tmp_path: Path):
    from tiny import make_tokenizer

    from homoexport.distillation.augment import WordNeighbours

    tok = make_tokenizer(tmp_path / "tok")
    neighbours = WordNeighbours(tok, _neighbour_table(tok, {"good": "great"}), k=3)
    assert neighbours.of("Good")[0] == "great" and neighbours.of("great")[0] == "good"
    every = {w for word in ("the", "movie", "sat", "good") for w in neighbours.of(word)}
    assert every and all(w.isalpha() and len(w) > 1 and not w.startswith("##") for w in every)
    assert neighbours.of("zebra") == [] and len(neighbours.of("dog")) == 3


def test_word_swapped_copies_keep_case_skip_originals_and_dev_text(tmp_path: Path):
    from datasets import Dataset
    from tiny import make_tokenizer

    from homoexport.distillation.augment import WordNeighbours, augmented_rows, swap_words

    tok = make_tokenizer(tmp_path / "tok")
    neighbours = WordNeighbours(tok, _neighbour_table(tok, {"good": "great", "great": "good", "dog": "cat", "cat": "dog"}), k=1)
    rng = np.random.default_rng(0)
    assert swap_words("Dog GOOD, zebra-cat!", neighbours, 1.0, rng) == "Cat GREAT, zebra-dog!"  # zebra: not in the vocabulary
    assert swap_words("good dog", neighbours, 1e-9, rng) == "good dog"
    rows = Dataset.from_dict({"text_a": ["good dog", "cat", "zebra"], "text_b": ["dog", "good", "cat"], "label": [1, 0, 1]})
    copies = augmented_rows(rows, neighbours, copies=2, replace_prob=1.0, label=UNLABELLED, seed=0, exclude={("great cat", "cat")})
    # k=1: every copy of a row is the same, so the second copies are dropped; the first copy of row 0 is a dev pair.
    assert list(zip(copies["text_a"], copies["text_b"])) == [("dog", "great"), ("zebra", "dog")]
    assert set(copies["label"]) == {UNLABELLED}
    single = augmented_rows(rows.remove_columns("text_b"), neighbours, copies=3, replace_prob=0.5, label=UNLABELLED, seed=1)
    assert "text_b" not in single.column_names and set(single["text_a"]) <= {"great dog", "good cat", "great cat", "dog"}
    # The copies are a function of the seed, so a resumed run trains on the same rows.
    many = Dataset.from_dict({"text_a": [f"good dog cat great good dog {i}" for i in range(20)], "label": [1] * 20})
    first, again, other = (augmented_rows(many, neighbours, 2, 0.5, UNLABELLED, seed=s)["text_a"] for s in (1, 1, 2))
    assert first == again and first != other


def test_task_distillation_with_word_swapped_copies(tmp_path: Path, teacher_dir: Path, task_files):
    recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{
        "task.augment": {"copies": 2}, "task.hard_label": 0.5, "task.epochs": 1}))
    report = distill_task(recipe)
    copies = report["data"]["word_swapped_rows"]
    assert report["data"]["unlabelled_rows"] == 0
    assert 0 < copies <= 96 and report["data"]["train_rows"] == 48 + copies and report["steps"] == -(-(48 + copies) // 8)
    assert f"{copies} word-swapped copies" in report["data"]["source"]
    assert all(np.isfinite(v) for v in report["student"]["dev"].values())
    with pytest.raises(UsageError, match="copies"):
        validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run2", **{"task.augment": {"copies": 0}}))
    with pytest.raises(UsageError, match="swap_prob"):
        validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run2", **{"task.augment": {"copies": 1, "swap_prob": 0.2}}))


def test_task_distillation_masked_to_the_end_passes_parity(tmp_path: Path, teacher_dir: Path, task_files):
    recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"pruning.materialize": False, "task.epochs": 2}))
    report = distill_task(recipe)
    assert report["parity_max_abs_diff"] is not None and report["parity_max_abs_diff"] <= 1e-4


def test_the_old_task_materialize_key_reads_as_pruning_materialize(tmp_path: Path, teacher_dir: Path, task_files, caplog):
    with caplog.at_level("WARNING", logger="homoexport"):
        recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.materialize": False}))
    assert recipe.pruning.materialize is False and "task.materialize is now pruning.materialize" in caplog.text


def test_bf16_precision_autocasts_the_passes_and_saves_an_fp32_student(tmp_path: Path, teacher_dir: Path, task_files, monkeypatch):
    seen = linear_output_dtypes(monkeypatch)
    report = distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "bf16", **{"training.precision": "bf16"})))
    assert report["precision"] == "bf16" and torch.bfloat16 in seen
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "bf16" / "student")
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    assert all(np.isfinite(r["dev"]["accuracy"]) for r in report["curve"])
    # The dev scores are computed outside autocast, in fp32, as the exported student computes.
    from homoexport.distillation.models import load_tokenizer
    from homoexport.distillation.task import evaluate, load_task_data
    from homoexport.distillation.task_data import TaskBatcher

    data = load_task_data(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "x")), ["neg", "pos"], False)
    assert evaluate(student, TaskBatcher(data.dev, load_tokenizer(teacher_dir), 64, 24, shuffle=False), data.task) == report["student"]["dev"]

    seen.clear()
    report = distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "fp32", **{"training.precision": "fp32"})))
    assert report["precision"] == "fp32" and seen == {torch.float32}


def test_auto_precision_is_bf16_only_where_the_device_multiplies_it_natively(monkeypatch, caplog):
    from homoexport.distillation import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "bf16"
    assert precision.resolve_precision("fp32", torch.device("cpu")) == "fp32"
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve_precision("auto", torch.device("cpu")) == "fp32"
    with caplog.at_level("WARNING"):
        assert precision.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert "emulated and slower than fp32" in caplog.text
    with precision.precision_context("bf16")():
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
    with precision.precision_context("fp32")():
        assert torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.float32


class Killed(Exception):
    pass


def test_task_resume_is_exact(tmp_path: Path, teacher_dir: Path, task_files, caplog):
    """Killed after a checkpoint taken in the dense phase: the resumed run ends where an uninterrupted one does, and
    keeps the same best student (task.keep_best, whose record travels in the checkpoint)."""
    keep = {"task.keep_best": True, "training.eval_every": 3}
    with caplog.at_level("WARNING", logger="homoexport"):
        whole = distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "a", **keep)), resume=True)
    assert "--resume: no checkpoint under" in caplog.text and "starting a new run" in caplog.text

    def kill_at_15(record):
        if record["step"] == 15:
            raise Killed

    recipe_b = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "b", **keep))
    with pytest.raises(Killed):
        distill_task(recipe_b, on_log=kill_at_15)
    assert [p.name for p in (tmp_path / "b" / "checkpoints").glob("*.pt")] == ["step-00000015.pt"]
    dense_state = torch.load(tmp_path / "b" / "checkpoints" / "step-00000015.pt", weights_only=False)
    assert dense_state["dense"] and dense_state["pruner"]["importance"]["mean"] == {}  # scores dropped at the dense switch
    assert dense_state["elapsed_s"] > 0
    dense_state["elapsed_s"] = 1000.0  # stands for the hours the killed process trained: the report adds them
    torch.save(dense_state, tmp_path / "b" / "checkpoints" / "step-00000015.pt")
    changed = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "b", **keep, **{"task.epochs": 2}))
    with pytest.raises(UsageError, match=r"task.epochs: 4.0 then, 2.0 now\); restore those values \(`homoexport distill .*recipe.resolved.yaml"):
        distill_task(changed, resume=True)
    # How often a run logs and saves does not change what it computes: a resume may change it.
    recipe_b = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "b", **keep, **{"training.log_every": 2, "training.checkpoint_every": 7}))
    resumed = distill_task(recipe_b, resume=True)
    assert resumed["resumed_from_step"] == 15 and resumed["wall_time_from_step"] == 0
    assert resumed["wall_time_s"] == pytest.approx(1000.0 + resumed["wall_time_s_since_resume"], abs=0.02)
    assert whole["wall_time_s_since_resume"] is None
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a" / "student").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b" / "student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["student"]["dev"] == whole["student"]["dev"] and resumed["keep_best"] == whole["keep_best"] is not None


def test_task_resume_is_exact_from_a_materialised_student_still_being_pruned(tmp_path: Path, teacher_dir: Path, task_files):
    """pruning.materialize_at: the run goes on over smaller materialised students while it prunes; killed after a
    checkpoint taken there, the resume replays those switches and ends where an uninterrupted run does."""
    whole = distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "a")))

    def kill_at_10(record):
        if record["step"] == 10:
            raise Killed

    with pytest.raises(Killed):
        distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "b")), on_log=kill_at_10)
    state = torch.load(tmp_path / "b" / "checkpoints" / "step-00000010.pt", weights_only=False)
    assert not state["dense"] and state["pruner"]["stages"] and state["pruner"]["importance"]["mean"]
    assert state["student"]["bert.embeddings.word_embeddings.weight"].shape[1] < AutoConfig.from_pretrained(teacher_dir).hidden_size
    resumed = distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "b")), resume=True)
    assert resumed["resumed_from_step"] == 10 and resumed["parity_max_abs_diff"] == whole["parity_max_abs_diff"] <= 1e-4
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a" / "student").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b" / "student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed["student"]["dev"] == whole["student"]["dev"]


def test_the_full_width_student_is_freed_at_the_dense_switch(tmp_path: Path, teacher_dir: Path, task_files):
    """After the switch nothing holds the masked student (nor, through it, its optimizer state): only the teacher is
    still a full-width model."""
    full = AutoConfig.from_pretrained(teacher_dir).hidden_size
    counts: dict[bool, int] = {}

    def count_full_width_models(record):
        gc.collect()
        counts.setdefault(record["dense"], sum(isinstance(o, PreTrainedModel) and hasattr(o, "classifier") and o.config.hidden_size == full
                                                  for o in gc.get_objects()))  # classifiers only: each holds an encoder model

    distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run")), on_log=count_full_width_models)
    assert counts == {False: 2, True: 1}


def test_keep_best_deploys_the_best_dev_student_at_the_final_width(tmp_path: Path, teacher_dir: Path, task_files, monkeypatch):
    from homoexport.distillation import task as task_module

    real, seen = task_module.evaluate, []
    scripted = iter([50.0, 60.0, 55.0, 90.0, 70.0, 90.0, 65.0, 40.0] + [30.0] * 50)  # dev accuracy, call by call after the teacher's

    def evaluate(model, dev, task):
        metrics = real(model, dev, task)
        if seen or getattr(model, "_is_teacher", False):
            metrics = {**metrics, "accuracy": next(scripted)}
        seen.append((metrics["accuracy"], {k: v.clone() for k, v in model.state_dict().items()}))
        return metrics

    monkeypatch.setattr(task_module, "evaluate", evaluate)
    recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.keep_best": True, "training.eval_every": 2}))
    report = distill_task(recipe)
    final = [c for c in report["curve"] if c["widths"] == report["curve"][-1]["widths"]]
    best = max(final, key=lambda c: c["dev"]["accuracy"])  # the first of equal scores
    assert best["step"] != report["steps"] and report["keep_best"]["step"] == best["step"]
    assert report["student"]["dev"] == best["dev"] and report["keep_best"]["last_step_dev"] == report["curve"][-1]["dev"]
    assert report["dev_drop"] == report["teacher"]["dev"]["accuracy"] - best["dev"]["accuracy"]
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student").state_dict()
    at_best = next(state for score, state in seen[1:] if score == best["dev"]["accuracy"] and state["classifier.weight"].shape ==
                   saved["classifier.weight"].shape and state["bert.embeddings.word_embeddings.weight"].shape[1] == 32)
    assert all(torch.equal(saved[k], at_best[k]) for k in saved)
    assert not (tmp_path / "run" / "best-student").exists()
    # Off (the default), the last student ships and the report says nothing about a best one.
    assert distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "last")))["keep_best"] is None


def test_a_checkpoint_from_before_task_keep_best_resumes_as_it_was_trained(tmp_path: Path, teacher_dir: Path, task_files):
    from homoexport.distillation.checkpoint import check_same_recipe, resumable_fields

    r = task_recipe(teacher_dir, task_files, tmp_path / "run")
    old = resumable_fields(validate_recipe(r))
    old["task"].pop("keep_best")
    check_same_recipe(old, validate_recipe(r), tmp_path / "step.pt")
    with pytest.raises(UsageError, match=r"recipe changed.*task\.keep_best"):
        check_same_recipe(old, validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.keep_best": True})),
                          tmp_path / "step.pt")


@pytest.mark.parametrize("kill_at", [5, 15])
def test_a_checkpoint_from_before_materialize_at_resumes_as_it_was_trained(tmp_path: Path, teacher_dir: Path, task_files, kill_at):
    """Checkpoints written before the pruner kept its stages: masked (the full-width masks and scores) or dense (the
    final masks over the full width, scores dropped). Both resume where the uninterrupted run ends."""
    single = {"pruning.materialize_at": None}
    whole = distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "a", **single)))

    def kill(record):
        if record["step"] == kill_at:
            raise Killed

    with pytest.raises(Killed):
        distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "b", **single)), on_log=kill)
    path = tmp_path / "b" / "checkpoints" / f"step-{kill_at:08d}.pt"
    state = torch.load(path, weights_only=False)
    assert state["dense"] == (kill_at == 15)
    pruner = state["pruner"]
    old = {"masks": pruner["stages"][-1] if state["dense"] else pruner["masks"], "importance": dict(pruner["importance"])}
    old["importance"].pop("residues")
    torch.save({**state, "pruner": old}, path)
    resumed = distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "b", **single)), resume=True)
    assert resumed["resumed_from_step"] == kill_at and resumed["student"]["dev"] == whole["student"]["dev"]
    a = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a" / "student").state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b" / "student").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_task_resume_refuses_auto_resolving_to_another_precision(tmp_path: Path, teacher_dir: Path, task_files, monkeypatch):
    from homoexport.distillation import precision

    monkeypatch.setattr(precision, "native_bf16", lambda device: True)  # auto was bf16 where the run started
    recipe = task_recipe(teacher_dir, task_files, tmp_path / "run")

    def kill_at_6(record):
        if record["step"] == 6:
            raise Killed

    with pytest.raises(Killed):
        distill_task(validate_recipe(recipe), on_log=kill_at_6)
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)  # and is fp32 here
    with pytest.raises(ValueError, match=r"trained in bf16.*training\.precision auto is fp32.*--set training\.precision=bf16"):
        distill_task(validate_recipe(recipe), resume=True)
    pinned = task_recipe(teacher_dir, task_files, tmp_path / "run", **{"training.precision": "bf16"})
    assert distill_task(validate_recipe(pinned), resume=True)["resumed_from_step"] == 5


def test_cli_task_distill_and_errors(tmp_path: Path, teacher_dir: Path, task_files):
    import yaml

    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.family": [56], "task.export": True,
                                                                                              "task.keep_best": True, "training.eval_every": 3,
                                                                                              "task.keep_fp32": ["ffn-output"]})))
    result = CliRunner().invoke(app, ["distill", str(path), "--no-progress", "--budget", "accuracy-drop=100"])
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "dev accuracy: teacher" in out and "int8 ONNX" in out and (tmp_path / "run" / "student" / "config.json").is_file()
    assert f"task.keep_best: the student of step {json.loads((tmp_path / 'run' / 'report.json').read_text())['keep_best']['step']} of" in out
    assert "students of tiny-task" in out and "accuracy-drop <= 100 points of accuracy (int8 ONNX): chose" in out
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert (tmp_path / "run" / "export" / "model_quantized.onnx").is_file() and 0 <= report["deployed"]["dev"]["accuracy"] <= 100
    assert report["deployed"] == report["family"][-1]["int8"] and report["plan"] is None
    # `homoexport report` puts the dev scores side by side: teacher, student, the shipped int8 file.
    assert CliRunner().invoke(app, ["report", str(tmp_path / "run"), "--out", str(tmp_path / "rep")]).exit_code == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    shipped = report["deployed"]["dev"]["accuracy"]
    assert f"| teacher (PyTorch) | {report['teacher']['dev']['accuracy']:.2f} |" in md and f"| {shipped:.2f} |" in md
    assert f"Budget accuracy-drop <= 100: chose `{report['selection']['chosen']}`." in md
    # Every student of the curve was exported into its own directory, scored as int8 and timed beside the others.
    kept, final = report["family"][0], report["family"][-1]
    assert 32 < kept["widths"]["hidden"] <= 56 and kept["int8"]["path"] == str(Path(kept["path"]) / "export" / "model_quantized.onnx")
    for member in report["family"]:
        assert Path(member["int8"]["path"]).is_file() and member["int8"]["p50_ms"] > 0 and member["int8"]["file_mb"] > 0
        export = json.loads((Path(member["int8"]["path"]).parent / "export_report.json").read_text())
        gate = export["validation_inputs"]
        assert gate["source"] == "given" and gate["texts"] == 16  # the int8 gate ran on the dev inputs
        assert export["quantization"]["kept_fp32"]["groups"] == ["ffn-output"] and export["quantization"]["kept_fp32"]["nodes"]
        # The int8 file agrees with its PyTorch student on this easy task within a few examples (16 dev rows).
        assert abs(member["int8"]["dev"]["accuracy"] - member["dev"]["accuracy"]) <= 100 * 3 / 16
    # The wider student's file is bigger; compared on the fp32 files, whose size does not hang on the int8 build order
    # that the export picks by latency (on a busy machine the two members may pick differently).
    assert (Path(kept["int8"]["path"]).parent / "model.onnx").stat().st_size > (Path(final["int8"]["path"]).parent / "model.onnx").stat().st_size
    # A resume of the finished run with only task.keep_fp32 changed trains nothing and exports every student again,
    # also when the run has moved since.
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "run", moved)
    log = (moved / "train_log.jsonl").read_text()
    path.write_text(yaml.safe_dump(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.family": [56], "task.export": True,
                                                                                              "task.keep_best": True, "training.eval_every": 3})))
    result = CliRunner().invoke(app, ["distill", str(path), "--no-progress", "--budget", "accuracy-drop=100", "--resume", "--out", str(moved)])
    assert result.exit_code == 0, result.output
    again = json.loads((moved / "report.json").read_text())
    assert (moved / "train_log.jsonl").read_text() == log and again["curve"] == report["curve"]
    assert "keep_fp32: []" in (moved / "recipe.resolved.yaml").read_text()
    assert [m["path"] for m in again["family"]] == [m["path"].replace(str(tmp_path / "run"), str(moved)) for m in report["family"]]
    for member in again["family"]:
        final = member["path"] == str(moved / "student")
        assert Path(member["int8"]["path"]).parent == (moved / "export" if final else Path(member["path"]) / "export")
        export = json.loads((Path(member["int8"]["path"]).parent / "export_report.json").read_text())
        assert export["quantization"]["kept_fp32"] == {"groups": [], "nodes": []} and member["int8"]["p50_ms"] > 0
    assert again["deployed"] == again["family"][-1]["int8"] and again["deployed"]["path"] == str(moved / "export" / "model_quantized.onnx")
    assert again["selection"]["chosen"] == report["selection"]["chosen"].replace(str(tmp_path / "run"), str(moved))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(task_recipe(teacher_dir, task_files, tmp_path / "run2", **{"task.label_column": "gold"})))
    result = CliRunner().invoke(app, ["distill", str(bad), "--no-progress"])
    assert result.exit_code == 2 and "no column 'gold'" in " ".join(result.output.split()) and "train.jsonl" in result.output
    encoder = save_model_dir(tmp_path / "encoder", kind="base")
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(task_recipe(encoder, task_files, tmp_path / "run3")))
    result = CliRunner().invoke(app, ["distill", str(plain), "--no-progress"])
    assert result.exit_code == 2 and "not a *ForSequenceClassification model" in " ".join(result.output.split())


def test_batches_cover_every_row_once_group_lengths_and_repeat(tmp_path: Path, task_files, teacher_dir: Path):
    from homoexport.distillation.models import load_tokenizer
    from homoexport.distillation.task_data import TaskBatcher

    rows = load_files(*task_files, "sentence", None, "label", ["neg", "pos"], regression=False).train
    batcher = TaskBatcher(rows, load_tokenizer(teacher_dir), 4, 32, seed=3)
    batcher.BUCKET_BATCHES = 3
    for epoch in (0, 1):
        batches = batcher.batches(epoch)
        assert sorted(np.concatenate(batches).tolist()) == list(range(len(rows)))
    assert [b.tolist() for b in batcher.batches(0)] != [b.tolist() for b in batcher.batches(1)]
    fresh = TaskBatcher(rows, load_tokenizer(teacher_dir), 4, 32, seed=3)
    fresh.BUCKET_BATCHES = 3
    assert all(torch.equal(fresh.batch_at(s)["input_ids"], batcher.batch_at(s)["input_ids"]) for s in (0, 5, 13, 20))
    padded = sum(batcher.batch_at(s)["input_ids"].numel() for s in range(batcher.steps_per_epoch))
    assert padded < 1.2 * batcher.lengths.sum()  # length grouping: little padding


def test_one_run_keeps_a_family_and_an_accuracy_drop_budget_picks_the_narrowest(tmp_path: Path, teacher_dir: Path, task_files):
    recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.family": [56, 48], "task.epochs": 4}))
    report = distill_task(recipe)
    family = report["family"]
    kept = [m for m in family if m["requested_hidden"]]
    assert kept and all(Path(m["path"], "config.json").is_file() for m in kept)
    assert [m["widths"]["hidden"] for m in family] == sorted((m["widths"]["hidden"] for m in family), reverse=True)
    assert family[-1]["path"] == str(tmp_path / "run" / "student") and report["selection"] is None
    member = AutoModelForSequenceClassification.from_pretrained(kept[0]["path"])
    assert member.config.hidden_size == kept[0]["widths"]["hidden"] < 64
    assert report["family_skipped"] == []
    generous = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run2", **{"task.family": [56, 48], "task.max_drop": 100.0}))
    chosen = distill_task(generous)["selection"]
    assert chosen["met"] and chosen["chosen"] == str(tmp_path / "run2" / "student")  # every member is within 100 points: the narrowest

    from homoexport.distillation.task import select_within_drop

    members = [{"path": "wide", "parameters": 10, "dev": {"accuracy": 90.0}}, {"path": "mid", "parameters": 6, "dev": {"accuracy": 89.5}},
               {"path": "narrow", "parameters": 3, "dev": {"accuracy": 85.0}}]
    assert select_within_drop(members, 90.4, "accuracy", 1.0)["chosen"] == "mid"
    missed = select_within_drop(members, 95.0, "accuracy", 1.0)
    assert missed["chosen"] is None and not missed["met"] and missed["best_drop"] == pytest.approx(5.0)


def test_family_widths_the_schedule_jumps_past_are_reported(tmp_path: Path, teacher_dir: Path, task_files, caplog):
    # One mask update takes the student from 64 straight to its target of 32: no stop at 56 or 48.
    recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.family": [56, 48], "pruning.interval": 100}))
    with caplog.at_level("WARNING", logger="homoexport"):
        report = distill_task(recipe)
    assert report["family_skipped"] == [48, 56] and len(report["family"]) == 1
    assert "task.family: no student was kept at hidden <= 48, 56" in caplog.text


def test_family_widths_that_no_run_passes_are_refused_before_anything_is_written(tmp_path: Path, teacher_dir: Path, task_files):
    from homoexport.config.recipe import RecipeError

    out = tmp_path / "run"
    with pytest.raises(RecipeError, match=r"task.family 24, 32: not wider than the final student's hidden size 32"):
        validate_recipe(task_recipe(teacher_dir, task_files, out, **{"task.family": [56, 32, 24]}))
    with pytest.raises(RecipeError, match="pruning.schedule one_shot"):
        validate_recipe(task_recipe(teacher_dir, task_files, out, **{"task.family": [56], "pruning.schedule": "one_shot"}))
    headless = task_recipe(teacher_dir, task_files, out, **{"task.family": [56]})
    headless["student"] = {"heads": 2, "ffn": 64}  # the hidden size is never pruned: no width to pass
    with pytest.raises(UsageError, match="set student.hidden or give a budget"):
        distill_task(validate_recipe(headless))
    assert not out.exists()


def test_the_accuracy_drop_reads_the_int8_score_and_respects_a_latency_plan():
    from homoexport.distillation.task import select_within_drop, within_plan

    def member(path: str, hidden: int, params: int, pytorch: float, int8: float | None) -> dict:
        return {"path": path, "parameters": params, "layers": 6, "widths": {"hidden": hidden, "heads": hidden // 32, "ffn": 4 * hidden},
                "dev": {"accuracy": pytorch}, **({"int8": {"dev": {"accuracy": int8}}} if int8 is not None else {})}

    # The mid student is within a point in PyTorch but not as int8, the file that ships: the wide one is chosen.
    members = [member("wide", 320, 10, 90.0, 89.8), member("mid", 256, 6, 89.6, 88.9), member("narrow", 192, 3, 85.0, 84.6)]
    chosen = select_within_drop(members, 90.4, "accuracy", 1.0)
    assert chosen["chosen"] == "wide" and chosen["scored"] == "int8 ONNX" and chosen["over_budget"] is None
    # A latency plan chose 192/6/768: every wider student is over the budget, so none within the drop may ship.
    fits = within_plan({"budget": "latency=8ms", "chosen": {"layers": 6, "hidden": 192, "heads": 6, "ffn": 768}})
    assert fits is not None and [fits(m) for m in members] == [False, False, True]
    missed = select_within_drop(members, 90.4, "accuracy", 1.0, fits)
    assert not missed["met"] and missed["over_budget"] == "wide" and missed["best_drop"] == pytest.approx(0.6)
    assert select_within_drop(members, 85.0, "accuracy", 1.0, fits)["chosen"] == "narrow"
    assert within_plan(None) is None
    scored_in_pytorch = select_within_drop([member("only", 192, 3, 85.0, None)], 85.5, "accuracy", 1.0)
    assert scored_in_pytorch["scored"] == "PyTorch" and scored_in_pytorch["met"]


def test_a_latency_plan_is_recorded_and_bounds_the_accuracy_drop_choice(tmp_path: Path, teacher_dir: Path, task_files, monkeypatch):
    import yaml

    from homoexport.deployment.budget import SCHEMA
    from homoexport.distillation import task

    layers = json.loads((teacher_dir / "config.json").read_text())["num_hidden_layers"]
    plan = {"schema": SCHEMA, "budget": "latency=8ms", "teacher_shape": {"layers": layers},
            "chosen": {"name": "x", "layers": layers, "hidden": 32, "heads": 2, "ffn": 64}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.family": [56], "task.max_drop": 1.0})))
    # Scores that make the kept (wider) student the only one within a point of the teacher, and the final one far off.
    monkeypatch.setattr(task, "deployed_score", lambda member, metric: 1000.0 if member["widths"]["hidden"] > 32 else -1000.0)
    result = CliRunner().invoke(app, ["distill", str(path), "--no-progress", "--plan", str(tmp_path / "plan.json")])
    assert result.exit_code == 7, result.output  # the run finished and wrote everything, but missed its budget: CI can gate on it
    assert "error: the budget was missed (above); everything was written to" in " ".join(result.output.split())
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["plan"]["budget"] == "latency=8ms" and report["student"]["widths"]["hidden"] == 32 and len(report["family"]) == 2
    # The wider student is within the drop but the plan says it does not fit the budget: it is named, not deployed.
    kept = report["family"][0]["path"]
    assert not report["selection"]["met"] and report["selection"]["over_budget"] == kept and report["selection"]["scored"] == "PyTorch"
    assert "is within it but over the budget" in " ".join(result.output.split())


def test_score_a_finished_classifier_on_a_dev_file_without_training(tmp_path: Path, teacher_dir: Path, task_files):
    result = CliRunner().invoke(app, ["score", str(teacher_dir), "--dev-file", str(task_files[1]), "--out", str(tmp_path / "scored")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "scored" / "glue_report.json").read_text())
    row = report["results"][0]
    assert report["task"] == "custom" and report["runs"][0]["training"]["scored_as_given"] and report["n_examples"]["dev"] == 16
    assert row["metric"] == "accuracy" and all(0 <= row[b] <= 100 for b in ("pytorch", "onnx_fp32", "onnx_int8"))
    assert (tmp_path / "scored" / "seed-42" / "onnx" / "model_quantized.onnx").is_file() and "scored as given" in result.output
    both = CliRunner().invoke(app, ["score", str(teacher_dir), "--dev-file", str(task_files[1]), "--task", "sst2", "--out", str(tmp_path / "x")])
    assert both.exit_code == 2 and "not both" in both.output
    bad = CliRunner().invoke(app, ["score", str(teacher_dir), "--dev-file", str(task_files[1]), "--label-column", "gold", "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "no column 'gold'" in bad.output and not (tmp_path / "y").exists()

    # The exported files themselves, scored as they are (as on the target machine): the same scores, nothing exported again.
    onnx_dir = tmp_path / "scored" / "seed-42" / "onnx"
    again = CliRunner().invoke(app, ["score", str(onnx_dir), "--dev-file", str(task_files[1]), "--out", str(tmp_path / "files")])
    assert again.exit_code == 0, again.output
    given = json.loads((tmp_path / "files" / "glue_report.json").read_text())
    assert set(given["scored_files"]) == {"onnx_fp32", "onnx_int8"} and not (tmp_path / "files" / "seed-42").exists()
    assert all(given["results"][0][b] == row[b] for b in ("onnx_fp32", "onnx_int8")) and given["results"][0]["pytorch"] is None
    assert "scored as given (no training, no export)" in " ".join(again.output.split()) and "vs PyTorch" not in again.output
    one = CliRunner().invoke(app, ["score", str(onnx_dir / "model_quantized.onnx"), "--dev-file", str(task_files[1]), "--out", str(tmp_path / "one")])
    assert one.exit_code == 0, one.output
    assert list(json.loads((tmp_path / "one" / "glue_report.json").read_text())["scored_files"]) == ["onnx_int8"]  # told apart by its operators



def test_scoring_given_onnx_files_checks_them_before_reading_data(tmp_path: Path, teacher_dir: Path, task_files):
    from homoexport.evaluation.glue import given_onnx

    first = CliRunner().invoke(app, ["score", str(teacher_dir), "--dev-file", str(task_files[1]), "--out", str(tmp_path / "scored")])
    assert first.exit_code == 0, first.output
    onnx_dir = tmp_path / "scored" / "seed-42" / "onnx"
    assert given_onnx(onnx_dir).files == {"onnx_fp32": onnx_dir / "model_optimized.onnx", "onnx_int8": onnx_dir / "model_quantized.onnx"}
    assert given_onnx(teacher_dir) is None
    shutil.copy(onnx_dir / "model.onnx", teacher_dir / "model.onnx")
    assert given_onnx(teacher_dir) is None  # PyTorch weights beside it: the model is scored (and exported) again

    def score(path, *more):
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        result = CliRunner().invoke(app, ["score", str(path), *more, "--out", str(out)])
        assert not out.exists()
        return result.exit_code, " ".join(result.output.split())

    # A GLUE task is checked against the config's outputs before its data is read (this data directory does not exist).
    code, text = score(onnx_dir, "--task", "mnli", "--data-dir", str(tmp_path / "no-glue"))
    assert code == 2 and "exported from a classifier with 2 outputs; mnli needs 3" in text
    # `glue --no-train` takes the same inputs as `score --task` (here one .onnx file).
    result = CliRunner().invoke(app, ["glue", str(onnx_dir / "model_quantized.onnx"), "--task", "mnli", "--no-train", "--data-dir",
                                      str(tmp_path / "no-glue"), "--out", str(tmp_path / "glue-out")])
    assert result.exit_code == 2 and "mnli needs 3" in " ".join(result.output.split()) and not (tmp_path / "glue-out").exists()
    code, text = score(onnx_dir, "--dev-file", str(task_files[1]), "--quantize", "static")
    assert code == 2 and "ONNX files are scored as they are" in text
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    shutil.copy(onnx_dir / "model.onnx", renamed / "student.onnx")
    code, text = score(renamed, "--dev-file", str(task_files[1]))
    assert code == 2 and f"give the file to score, e.g. {renamed / 'student.onnx'}" in text
    code, text = score(renamed / "student.onnx", "--dev-file", str(task_files[1]))
    assert code != 0 and "no config.json beside them" in text
    shutil.copy(onnx_dir / "config.json", renamed / "config.json")  # shipped without the tokenizer
    code, text = score(renamed / "student.onnx", "--dev-file", str(task_files[1]))
    assert code != 0 and "no tokenizer beside them" in text
    encoder = tmp_path / "encoder"
    shutil.copytree(onnx_dir, encoder)
    config = json.loads((encoder / "config.json").read_text())
    (encoder / "config.json").write_text(json.dumps(config | {"architectures": ["BertModel"]}))
    code, text = score(encoder, "--dev-file", str(task_files[1]))
    assert code == 2 and "not exported from a classifier (config: BertModel)" in text


def test_ctrl_c_says_how_to_resume(tmp_path: Path, teacher_dir: Path, task_files, monkeypatch):
    import yaml

    from homoexport.distillation import task

    def interrupted(recipe, out_dir=None, **kwargs):
        (Path(out_dir) / "checkpoints").mkdir(parents=True)
        (Path(out_dir) / "checkpoints" / "step-00000005.pt").write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(task, "distill_task", interrupted)
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(task_recipe(teacher_dir, task_files, tmp_path / "run")))
    result = CliRunner().invoke(app, ["distill", str(path), "--no-progress", "--out", str(tmp_path / "run")])
    assert result.exit_code == 130
    assert f"error: interrupted; the newest checkpoint is {tmp_path / 'run' / 'checkpoints' / 'step-00000005.pt'}: run the same command " \
           "with --resume to continue" in result.output


def test_the_shipped_file_is_timed_against_the_latency_budget():
    from homoexport.distillation.task import latency_check

    plan = {"budget": "latency=8ms", "chosen": {"predicted": {"p50_ms": 7.5}}}
    over = latency_check(plan, {"p50_ms": 9.4}, 128)
    assert over == {"budget": "latency=8ms", "limit_ms": 8.0, "p50_ms": 9.4, "predicted_p50_ms": 7.5, "seq": 128, "met": False}
    assert latency_check(plan, {"p50_ms": 7.9}, 128)["met"]
    assert latency_check({"budget": "memory=30MB", "chosen": {}}, {"p50_ms": 9.4}, 128) is None
    assert latency_check(None, {"p50_ms": 9.4}, 128) is None and latency_check(plan, None, 128) is None


def test_budget_runs_check_data_and_output_before_planning(tmp_path: Path, teacher_dir: Path, task_files, monkeypatch):
    """A plan takes minutes of measuring: a bad column, a taken output directory or training.steps in a task recipe is
    named before it starts."""
    import yaml

    from homoexport.config.recipe import RecipeError
    from homoexport.deployment import budget

    def no_plan(*args, **kwargs):
        raise AssertionError("planned before the inputs were checked")

    monkeypatch.setattr(budget, "plan_for_recipe", no_plan)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.label_column": "gold"})))
    result = CliRunner().invoke(app, ["distill", str(bad), "--no-progress", "--budget", "latency=8ms"])
    assert result.exit_code == 2 and "no column 'gold'" in result.output and not (tmp_path / "run").exists()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(task_recipe(teacher_dir, task_files, tmp_path / "taken")))
    result = CliRunner().invoke(app, ["distill", str(good), "--no-progress", "--budget", "latency=8ms"])
    assert result.exit_code == 2 and f"error: output directory {tmp_path / 'taken'} is not empty" in result.output  # on one line
    result = CliRunner().invoke(app, ["distill", str(good), "--no-progress", "--set", "training.steps=2"])
    assert result.exit_code == 2 and "a task recipe's length is task.epochs" in " ".join(result.output.split())
    with pytest.raises(RecipeError, match="training.steps 2"):
        validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"training.steps": 2}))
    validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"training.steps": 1000}))  # as resolved recipes carry it


def test_log_handlers_are_set_before_the_plan(tmp_path: Path, teacher_dir: Path, task_files, monkeypatch):
    """The plan imports onnxruntime's quantizer, whose module calls logging.basicConfig: a root handler set before
    it makes that call a no-op, so log lines are not printed twice."""
    import logging

    import yaml

    from homoexport.deployment import budget
    from homoexport.deployment.budget import BudgetError

    seen = {}

    def record(*args, **kwargs):
        seen["root"] = [type(h).__name__ for h in logging.getLogger().handlers]
        seen["ours"] = [type(h).__name__ for h in logging.getLogger("homoexport").handlers]
        raise BudgetError("stop here")

    for name in ("", "homoexport"):  # as in a fresh process
        log = logging.getLogger(name)
        for h in [h for h in log.handlers if type(h).__name__ in ("RichHandler", "_OtherLibraries")]:
            monkeypatch.setattr(log, "handlers", [x for x in log.handlers if x is not h])
    monkeypatch.setattr(budget, "plan_for_recipe", record)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(task_recipe(teacher_dir, task_files, tmp_path / "run")))
    result = CliRunner().invoke(app, ["distill", str(good), "--no-progress", "--budget", "latency=8ms"])
    assert result.exit_code != 0 and "stop here" in result.output
    assert "_OtherLibraries" in seen["root"] and "RichHandler" in seen["ours"]


def test_task_keep_fp32_names_the_export_groups(tmp_path: Path, teacher_dir: Path, task_files):
    from homoexport.config.recipe import RecipeError, TaskSpec
    from homoexport.deployment.export import FP32_GROUPS

    assert set(TaskSpec.model_fields["keep_fp32"].annotation.__args__[0].__args__) == set(FP32_GROUPS)
    with pytest.raises(RecipeError, match="keep_fp32.*ffn-output"):
        validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"task.keep_fp32": ["attention"]}))


def test_accuracy_drop_budget_from_the_command_line(tmp_path: Path, teacher_dir: Path, task_files):
    from homoexport.deployment.budget import BudgetError, plan_for_recipe, split_accuracy_drop

    assert split_accuracy_drop("latency=8ms,accuracy-drop=1") == ("latency=8ms", 1.0)
    assert split_accuracy_drop("accuracy-drop=0.5") == (None, 0.5)
    with pytest.raises(BudgetError, match="accuracy-drop takes points"):
        split_accuracy_drop("accuracy-drop=abc")
    recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run"))
    planned, plan = plan_for_recipe(recipe, budget="accuracy-drop=1")
    assert plan is None and planned.task.max_drop == 1.0 and planned.student.hidden == 32
    plain = validate_recipe({"teacher": str(teacher_dir), "student": {"hidden": 32}})
    with pytest.raises(BudgetError, match="needs a task recipe"):
        plan_for_recipe(plain, budget="accuracy-drop=1")


def test_task_recipe_refuses_terms_the_task_loop_cannot_compute(tmp_path: Path, teacher_dir: Path, task_files):
    from homoexport.config.recipe import RecipeError

    with pytest.raises(RecipeError, match="losses.relation"):
        validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", **{"losses.relation": 1.0}))


def test_a_shallower_task_student_starts_from_teacher_layers_and_maps_them(tmp_path: Path, teacher_dir: Path, task_files):
    from homoexport.config.recipe import RecipeError

    recipe = validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "run", init="truncate", truncate_layers=[1],
                                         **{"student.layers": 1, "losses.layer_mapping": "uniform", "task.epochs": 2}))
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    report = distill_task(recipe)
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    assert student.config.num_hidden_layers == 1 and student.config.hidden_size == 32
    assert report["student"]["layers"] == 1 and report["student"]["dev"]
    assert teacher.config.num_hidden_layers == 2
    with pytest.raises(RecipeError, match="init must be copy"):
        validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "r2", init="random"))
    with pytest.raises(UsageError, match="one_to_one needs equal depths"):
        distill_task(validate_recipe(task_recipe(teacher_dir, task_files, tmp_path / "r3", init="truncate", **{"student.layers": 1})))


@pytest.mark.slow
def test_two_process_task_distillation_matches_one_process(tmp_path: Path, task_files):
    """torchrun with 2 CPU processes (gloo): each takes half of every batch and the gradients are summed, so
    without dropout the student equals one process's at the same batch (row-level losses: logits KL + labels).
    In fp32: bf16 rounds a whole batch and its halves differently."""
    import yaml

    teacher = save_model_dir(tmp_path / "teacher", kind="cls", num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = AutoModelForSequenceClassification.from_pretrained(teacher)
    model.config.id2label, model.config.label2id = {0: "neg", 1: "pos"}, {"neg": 0, "pos": 1}
    model.save_pretrained(teacher)
    overrides = {"losses": {"kl": 1.0, "temperature": 2.0, "hidden": 0.0, "attention": 0.0, "embedding": 0.0}, "task.hard_label": 0.5,
                 "task.epochs": 2, "training.checkpoint_every": 4, "training.precision": "fp32"}
    single = distill_task(validate_recipe(task_recipe(teacher, task_files, tmp_path / "one", **overrides)))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(task_recipe(teacher, task_files, tmp_path / "two", **overrides)))
    torchrun_distill(path, port=29541)
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["processes"] == 2 and two["steps"] == single["steps"]
    assert two["student"]["widths"] == single["student"]["widths"]
    assert max_weight_difference(tmp_path / "one" / "student", tmp_path / "two" / "student") < 1e-4
    logged = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, two["steps"] + 1))  # one writer: no record twice
    assert not (tmp_path / "two" / "checkpoints").exists()
