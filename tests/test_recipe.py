"""Recipes: shipped recipes validate; typos and bad values name the key and the allowed values."""

from pathlib import Path

import pytest

from homoexport.config.recipe import RecipeError, load_recipe, validate_recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("path", sorted(RECIPES.rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.teacher


def test_paper_recipes_match_the_paper_table():
    shapes = {n: load_recipe(RECIPES / f"homobert-{n}.yaml").student for n in ("base", "small", "xsmall", "tiny")}
    assert [(s.hidden, s.ffn) for s in shapes.values()] == [(576, 2304), (256, 1024), (240, 960), (224, 896)]
    small = load_recipe(RECIPES / "homobert-small.yaml")
    assert small.teacher == "bert-base-uncased" and small.training.steps == 28000 and small.optimizer.eps == 1e-6


def test_unknown_key_names_path_and_allowed_keys():
    with pytest.raises(RecipeError) as err:
        validate_recipe({"teacher": "t", "pruning": {"scedule": "homotopic"}})
    msg = str(err.value)
    assert "pruning.scedule" in msg and "did you mean 'schedule'" in msg and "importance" in msg


def test_bad_literal_names_allowed_values():
    with pytest.raises(RecipeError, match=r"pruning\.importance.*'platon', 'ema' or 'sensitivity'"):
        validate_recipe({"teacher": "t", "pruning": {"importance": "magnitude"}})


def test_bad_value_and_missing_teacher():
    with pytest.raises(RecipeError, match="training.steps"):
        validate_recipe({"teacher": "t", "training": {"steps": 0}})
    with pytest.raises(RecipeError, match="teacher: required"):
        validate_recipe({})
    with pytest.raises(RecipeError, match="divisible"):
        validate_recipe({"teacher": "t", "student": {"hidden": 100, "heads": 3}})


def test_overrides_apply_before_validation(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("teacher: t\ntraining:\n  steps: 10\n")
    recipe = load_recipe(path, ["training.steps=20", "student.hidden=64", "losses.layer_mapping=uniform"])
    assert recipe.training.steps == 20 and recipe.student.hidden == 64 and recipe.losses.layer_mapping == "uniform"
    with pytest.raises(RecipeError, match="KEY.PATH=VALUE"):
        load_recipe(path, ["training.steps"])
    with pytest.raises(RecipeError, match="training.stepz"):
        load_recipe(path, ["training.stepz=3"])


def test_missing_recipe_file_names_it(tmp_path):
    with pytest.raises(RecipeError, match="recipe not found: .*nope.yaml"):
        load_recipe(tmp_path / "nope.yaml")


def test_resolved_recipe_round_trips(tmp_path):
    recipe = validate_recipe({"teacher": "t", "student": {"hidden": 32, "heads": 2}})
    (tmp_path / "r.yaml").write_text(recipe.resolved_yaml())
    assert load_recipe(tmp_path / "r.yaml") == recipe


@pytest.mark.parametrize("text, overrides, expected", [
    ("teacher: t\nstudent:\n  hidden: 192\n  heds: 6\n", [], "{path}:4: student.heds: unknown key (did you mean 'heads'?)"),
    ("teacher: t\ntraining:\n  batch_size: 8\n", ["training.batch_size=0"], "--set training.batch_size: Input should be greater than 0 (got 0)"),
    ("teacher: t\ninit: copy\nstudent:\n  layers: 3\n", [], "{path}:2: init=copy keeps the teacher's depth"),
    ("teacher: t\nstudent:\n  hidden: 64\n  heads: 5\n", [], "{path}:3: student: hidden (64) must be divisible by heads (5)"),
    ("teacher: t\ndata:\n  unit: sentence\n  batching: neighbours\n  group_size: 8\n", ["training.batch_size=12"], "--set training.batch_size: training.batch_size 12 is not a multiple"),
    ("teacher: t\ntask:\n  glue: rte\n  unlabelled:\n    - glue:mrpc\n    - 7\n", [], "{path}:6: task.unlabelled.1: "),
    ("name: x\n", [], "{path}: teacher: required key is missing"),
    ("teacher: t\n", ["trainig.steps=2"], "--set trainig.steps: trainig: unknown key (did you mean 'training'?)"),
    ("teacher: t\ntask:\n  glue: rte\n  data_dir: d\n", ["training.steps=2"], "--set training.steps: training.steps 2: a task recipe's length is task.epochs"),
], ids=["unknown-key", "set-option", "across-keys", "across-section-keys", "across-keys-set", "list-item", "missing-key", "misspelt-set-section",
        "task-steps"])
def test_errors_in_a_recipe_file_name_its_line_or_the_set_option(tmp_path, text, overrides, expected):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError) as err:
        load_recipe(path, overrides)
    assert expected.format(path=path) in str(err.value)


def test_materialize_at_is_a_share_and_off_with_a_student_masked_to_the_end():
    assert validate_recipe({"teacher": "t"}).pruning.materialize_at == 0.9
    assert validate_recipe({"teacher": "t", "pruning": {"materialize": False}}).pruning.materialize_at is None
    assert validate_recipe({"teacher": "t", "pruning": {"materialize_at": None}}).pruning.materialize_at is None
    with pytest.raises(RecipeError, match=r"pruning\.materialize_at"):
        validate_recipe({"teacher": "t", "pruning": {"materialize_at": 1.0}})
