"""The shipped task recipes train what the benchmark measured, so the figures their comments quote hold for them."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

from homoexport.config.recipe import Recipe, load_recipe, validate_recipe
from homoexport.distillation.checkpoint import resumable_fields
from homoexport.distillation.task import load_task_data

REPO = Path(__file__).resolve().parents[1]


def _benchmark():
    spec = importlib.util.spec_from_file_location("task_distill", REPO / "benchmarks" / "task_distill.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["task_distill"] = module
    spec.loader.exec_module(module)
    return module


def _trained(recipe: Recipe) -> dict:
    """What decides the trained student, less the epochs (compared as steps): not its name, paths, logging or export
    (the benchmark scores its students apart)."""
    fields = resumable_fields(recipe)
    fields.pop("name"), fields.pop("teacher")
    fields["task"].pop("epochs"), fields["task"].pop("export")
    fields["training"].pop("log_every", None)
    return fields


def _steps(recipe: Recipe) -> int:
    assert recipe.task is not None
    data = load_task_data(recipe, None, regression=False)
    return round(recipe.task.epochs * math.ceil(len(data.train) / recipe.training.batch_size))


@pytest.mark.real_data
@pytest.mark.parametrize("name, arm", [("rte", "alx"), ("mrpc", "al")])
def test_a_shipped_task_recipe_is_the_benchmark_arm_it_quotes(name, arm, shared_dir):
    bench = _benchmark()
    glue = shared_dir / "data" / "glue"
    shipped = load_recipe(REPO / "recipes" / "tasks" / f"{name}.yaml", [f"task.data_dir={glue}"])
    variant = {k: v for k, v in bench.VARIANTS[arm].items() if k != "precision"}  # the shipped recipe's precision is auto
    measured = validate_recipe(bench.task_recipe(name, Path(shipped.teacher), glue, "192", shipped.training.seed, "homotopic",
                                                 Path(shipped.output_dir()), precision="auto", **variant))
    assert _trained(shipped) == _trained(measured)
    assert _steps(shipped) == _steps(measured)
    # The rows the committed runs of that arm trained on (their reports' counts), not only the benchmark's code of today.
    committed = json.loads((REPO / "benchmarks" / "results" / "task_distill.json").read_text())["rows"]
    runs = [r for r in committed if r["task"] == name and r["arm"] == arm]
    assert runs and shipped.task is not None
    data = load_task_data(shipped, None, regression=False)
    assert {(r["data"]["train_rows"], r["data"]["unlabelled_rows"]) for r in runs} == {(len(data.train), data.unlabelled)}


@pytest.mark.real_data
@pytest.mark.parametrize("task", ["cola", "mrpc", "rte", "stsb", "qnli"])
def test_glue_test_inputs_are_every_row_of_the_file_in_order(task, shared_dir):
    """``glue:TASK/test`` reads the rows that csv's own reader finds in the file (quoting off, as GLUE needs)."""
    import csv

    from homoexport.evaluation.glue_data import TASKS, read_test_texts

    path = shared_dir / "data" / "glue" / TASKS[task].directory / "test.tsv"
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    first, second = read_test_texts(TASKS[task], path)
    columns = {"cola": ("sentence", None), "mrpc": ("#1 String", "#2 String"), "qnli": ("question", "sentence")}.get(task, ("sentence1", "sentence2"))
    assert first == [r[columns[0]] for r in rows] and second == ([r[columns[1]] for r in rows] if columns[1] else None)
